"""Adapters and entry points: database, Redis, kombu, providers, handlers, CLI."""
