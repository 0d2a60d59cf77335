"""The worker's lease on the Redis broker, as a Celery bootstep (see service/worker_leases.py).

The step runs when the worker is built, before its consumer connects: the consumer's connection
must already carry this incarnation's unacked keys.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import bootsteps

from config.keys import worker_transport_options
from service.worker_leases import LeaseKeeper, WorkerLeases, is_redis_broker, new_incarnation

log = structlog.get_logger(__name__)


class WorkerLease(bootsteps.StartStopStep):
    """Per-incarnation unacked keys, a lease renewed from a thread, and the sweep for dead ones."""

    label = "provisioner worker lease"
    # Started once the pool has forked its processes: they need no copy of the lease's thread.
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.keeper: LeaseKeeper | None = None
        broker_url = str(worker.app.conf.broker_url or "")
        if not is_redis_broker(broker_url):
            return  # RabbitMQ requeues a dead consumer's deliveries itself
        incarnation = new_incarnation(str(worker.hostname))
        options = dict(worker.app.conf.broker_transport_options or {})
        options.update(worker_transport_options(incarnation))
        worker.app.conf.broker_transport_options = options
        leases = WorkerLeases(broker_url)
        # Registered now, before the consumer can take a message under these keys.
        leases.register(incarnation)
        self.keeper = LeaseKeeper(leases, incarnation)
        log.info("worker.lease_taken", incarnation=incarnation)

    def start(self, worker: Any) -> None:
        if self.keeper is not None:
            self.keeper.start()

    # The keeper is never stopped: a warm shutdown may wait minutes for running steps, and a
    # lease that lapsed meanwhile would let a sweeper hand those steps to another worker. The
    # thread is a daemon; the lease lapses when the process is gone.
