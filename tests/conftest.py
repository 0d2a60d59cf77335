"""Test session set-up: its own Redis database, its own SQLite file or PostgreSQL schema."""

from __future__ import annotations

from tests.support.environment import prepare

# Before anything else imports the settings or the Celery app.
ENVIRONMENT = prepare()
