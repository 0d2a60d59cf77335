"""The only module that builds the Celery app. ``celery -A tasks.app`` points here."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from config.celery import celery_config
from config.settings import get_settings
from service.reliable_redis import transport_for
from tasks.worker_lease import WorkerLease

app = Celery("provisioner")
app.config_from_object(celery_config(get_settings()))
app.conf.include = ["tasks.steps"]
# On Redis, workers take steps with BLMOVE, not BRPOP: a worker killed at the moment it is handed
# a step cannot lose it (service/reliable_redis.py).
app.conf.broker_transport = transport_for(str(app.conf.broker_url or ""))
app.steps["worker"].add(WorkerLease)


@worker_process_init.connect
def _fresh_connections_after_fork(**_: Any) -> None:
    from service.bootstrap import forget_container

    forget_container()


# Register the tasks whenever the app is imported (producers and workers alike).
import tasks.steps  # noqa: E402, F401
