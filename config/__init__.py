"""Settings, Redis key names, Celery configuration and logging: importable from every layer."""
