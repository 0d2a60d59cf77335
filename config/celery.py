"""Celery configuration only; ``tasks/app.py`` is the one place that builds the app."""

from __future__ import annotations

from typing import Any

from config.keys import SAGA_QUEUE, VISIBILITY_TIMEOUT_S
from config.settings import Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT_S},
        "task_default_queue": SAGA_QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        # The saga's outcome lives in the database; no result backend to run or to fill.
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        # A step is acknowledged only once it has run, and handed back if its worker dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One message per process: a long step (a hang) must not sit on prefetched steps of
        # other tenants.
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "enable_utc": True,
    }
