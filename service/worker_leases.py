"""Worker leases on the Redis broker: a dead worker's delivered steps go back to the queue.

kombu's Redis transport moves a delivered message into an "unacked" hash and gives it back only
when the consumer rejects it, stops cleanly, or after the visibility timeout (an hour). A worker
SIGKILLed mid-step would leave its steps there for that hour, its sagas stalled. Age cannot tell
a dead worker's step from a live worker's long one (both carry the attempt's epoch: a second run
would not be fenced). A lease can:

- each worker process (an *incarnation*) keeps its deliveries under keys of its own
  (``config.keys.worker_transport_options``), registers itself in ``WORKER_REGISTRY_KEY`` and
  holds a lease it renews from a thread;
- every live worker sweeps the registry: an incarnation whose lease has lapsed is dead, and its
  deliveries are pushed back to the front of their queues with kombu's own restore, then its keys
  are dropped.

A redelivered step is what ``acks_late`` already promises after a crash: the step runs again under
the same attempt, counting a try, and its provider's ``exists()`` makes the rerun harmless.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from dataclasses import dataclass
from typing import Any, cast

import structlog
from kombu import Connection
from redis import Redis

from config.keys import (
    WORKER_LEASE_RENEW_S,
    WORKER_LEASE_TTL_MS,
    WORKER_REGISTRY_KEY,
    WORKER_SWEEP_MUTEX_MS,
    worker_key,
    worker_transport_options,
)

log = structlog.get_logger(__name__)

REDIS_SCHEMES = ("redis://", "rediss://")


def is_redis_broker(broker_url: str) -> bool:
    return broker_url.startswith(REDIS_SCHEMES)


def new_incarnation(node: str) -> str:
    """This process's identity among workers: its node name, made unique per start."""
    return f"{node}~{os.getpid()}~{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, slots=True)
class Incarnation:
    """What the registry says about one worker process."""

    name: str
    alive: bool
    unacked: int


def _bytes_to_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class WorkerLeases:
    """The registry of worker incarnations on one Redis broker, and the restore of dead ones."""

    def __init__(self, broker_url: str, *, ttl_ms: int = WORKER_LEASE_TTL_MS) -> None:
        self._broker_url = broker_url
        self._redis = Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)
        self._ttl_ms = ttl_ms
        self._holder = f"{socket.gethostname()}:{os.getpid()}"

    # --- one incarnation's own lease ---
    def register(self, incarnation: str) -> None:
        # Lease first: an entry in the registry without a lease looks dead to a sweeper.
        pipe = self._redis.pipeline()
        pipe.set(worker_key(incarnation, "lease"), self._holder, px=self._ttl_ms)
        pipe.sadd(WORKER_REGISTRY_KEY, incarnation)
        pipe.execute()

    def renew(self, incarnation: str) -> bool:
        """Extend the lease; False if it had lapsed (a sweeper may have handed out our steps)."""
        pipe = self._redis.pipeline()
        pipe.set(worker_key(incarnation, "lease"), self._holder, px=self._ttl_ms, xx=True)
        pipe.sadd(WORKER_REGISTRY_KEY, incarnation)
        renewed, _ = pipe.execute()
        if not renewed:
            # Too late to undo; take the lease back so no sweeper takes what we deliver next.
            self.register(incarnation)
            return False
        return True

    # --- everyone else's ---
    def incarnations(self) -> list[Incarnation]:
        names = sorted(_bytes_to_str(n) for n in self._redis.smembers(WORKER_REGISTRY_KEY))
        if not names:
            return []
        pipe = self._redis.pipeline()
        for name in names:
            pipe.exists(worker_key(name, "lease"))
            pipe.hlen(worker_key(name, "unacked"))
        answers = pipe.execute()
        return [
            Incarnation(name, bool(answers[2 * i]), int(answers[2 * i + 1]))
            for i, name in enumerate(names)
        ]

    def sweep(self, *, own: str | None = None) -> dict[str, int]:
        """Restore every dead incarnation's deliveries; {incarnation: messages restored}."""
        restored: dict[str, int] = {}
        for incarnation in self.incarnations():
            if incarnation.alive or incarnation.name == own:
                continue
            mutex = worker_key(incarnation.name, "sweep")
            if not self._redis.set(mutex, self._holder, nx=True, px=WORKER_SWEEP_MUTEX_MS):
                continue  # another worker is on it
            try:
                count = self.restore(incarnation.name)
            finally:
                self._redis.delete(mutex)
            restored[incarnation.name] = count
            if count:
                log.warning(
                    "worker.dead_worker_steps_restored", incarnation=incarnation.name, steps=count
                )
        return restored

    def restore(self, incarnation: str) -> int:
        """Hand a dead incarnation's deliveries out again, then forget it."""
        with Connection(
            self._broker_url, transport_options=worker_transport_options(incarnation)
        ) as connection:
            channel = cast(Any, connection.default_channel)
            tags = channel.client.hkeys(channel.unacked_key)
            for tag in tags:
                # kombu's own restore: in a transaction watching the hash, back to the end the
                # queue is read from (these were delivered first), marked redelivered.
                channel.qos.restore_by_tag(tag, client=channel.client)
        pipe = self._redis.pipeline()
        pipe.hlen(worker_key(incarnation, "unacked"))
        pipe.exists(worker_key(incarnation, "lease"))
        left, alive = pipe.execute()
        if not left and not alive:
            pipe = self._redis.pipeline()
            pipe.srem(WORKER_REGISTRY_KEY, incarnation)
            pipe.delete(
                worker_key(incarnation, "unacked"),
                worker_key(incarnation, "unacked_index"),
                worker_key(incarnation, "unacked_mutex"),
            )
            pipe.execute()
        return len(tags)

    def close(self) -> None:
        self._redis.close()


class LeaseKeeper:
    """The thread that keeps one incarnation's lease and sweeps for dead ones."""

    def __init__(
        self, leases: WorkerLeases, incarnation: str, *, every_s: float = WORKER_LEASE_RENEW_S
    ) -> None:
        self._leases = leases
        self._incarnation = incarnation
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="provisioner-worker-lease", daemon=True
        )
        # The worker forks pool processes while this thread runs. A fork in the middle of a
        # round would leave the child with a lock the thread held (structlog's write lock, the
        # Redis pool's) and no thread to release it: so no fork happens mid-round.
        self._round = threading.Lock()
        os.register_at_fork(
            before=self._round.acquire,
            after_in_parent=self._round.release,
            after_in_child=self._round.release,
        )

    @property
    def incarnation(self) -> str:
        return self._incarnation

    def start(self) -> None:
        self._leases.register(self._incarnation)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while True:
            with self._round:
                self._one_round()
            if self._stop.wait(self._every_s):
                return

    def _one_round(self) -> None:
        # The lease must outlive every hiccup: a failure is logged and the next round tries again.
        try:
            if not self._leases.renew(self._incarnation):
                log.error(
                    "worker.lease_lapsed",
                    incarnation=self._incarnation,
                    hint="this process was frozen longer than the lease, or Redis lost its "
                    "keys (a restart); steps it held may have been handed to another worker",
                )
            self._leases.sweep(own=self._incarnation)
        except Exception as exc:
            log.warning("worker.lease_round_failed", error=str(exc))
