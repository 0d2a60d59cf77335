"""The provisioning domain: steps, states, rules and planning. No Celery, Redis or SQL here."""
