"""The doctor's broker checks: the connection, each queue's depth and consumers, and on the
Redis broker the workers' leases and the raw entries set aside."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from kombu import Connection
from redis import Redis

from config.keys import AUDIT_QUEUE, COMMANDS_QUEUE, SAGA_QUEUE, processing_key
from config.settings import Settings
from service.doctor.findings import TIMEOUT_S, Finding, describe
from service.worker_leases import WorkerLeases, is_redis_broker

# Messages waiting in one queue beyond which the consumers are not keeping up.
QUEUE_BACKLOG_LIMIT = 1000

QUEUES: tuple[tuple[str, str], ...] = (
    (SAGA_QUEUE, "provisioner worker"),
    (COMMANDS_QUEUE, "provisioner listen"),
    (AUDIT_QUEUE, "provisioner consume"),
)


class BrokerChecks:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def broker(self) -> Iterator[Finding]:
        url = self._settings.broker_url
        try:
            with Connection(url, connect_timeout=TIMEOUT_S) as connection:
                connection.ensure_connection(max_retries=1, timeout=TIMEOUT_S)
                transport = connection.transport_cls
                yield Finding("broker", True, f"connected ({transport})")
                for queue, consumer in QUEUES:
                    yield self._queue(connection, queue, consumer)
            if is_redis_broker(url):
                yield self._workers(url)
                yield self._unreadable(url)
        except Exception as exc:
            yield Finding(
                "broker",
                False,
                f"cannot connect: {describe(exc)}",
                "start the broker, or fix PROVISIONER_BROKER_URL (nothing runs without it)",
            )

    def _queue(self, connection: Connection, queue: str, consumer: str) -> Finding:
        name = f"queue {queue}"
        channel = connection.channel()  # a fresh channel: a refused passive declare closes it
        try:
            _, messages, consumers = channel.queue_declare(queue=queue, passive=True)
        except Exception as exc:
            if (
                getattr(exc, "code", None) == 404
                or "NOT_FOUND" in str(exc)
                or "no queue" in str(exc)
            ):
                # Redis drops an empty list, RabbitMQ has no queue until someone declares it.
                return Finding(name, True, "empty (not declared, or no message waiting)")
            return Finding(name, False, f"cannot inspect: {describe(exc)}", "check the broker")
        finally:
            with contextlib.suppress(Exception):  # a channel the broker closed already
                channel.close()
        details: dict[str, Any] = {"messages": messages}
        on_redis = connection.transport.driver_type == "redis"
        if on_redis:
            details["consumers"] = None  # the Redis transport cannot tell
            if queue == SAGA_QUEUE:
                details["unacked"] = self._redis_unacked()
        else:
            details["consumers"] = consumers
        summary = (
            f"{messages} waiting"
            + ("" if on_redis else f", {consumers} consumer(s)")
            + (
                f", {details['unacked']} delivered and unacknowledged"
                if details.get("unacked")
                else ""
            )
        )
        if not on_redis and messages and not consumers:
            return Finding(
                name, False, summary, f"nothing consumes it: start `{consumer}`", details
            )
        if messages >= QUEUE_BACKLOG_LIMIT:
            return Finding(
                name,
                False,
                summary,
                f"its consumers are not keeping up: start more `{consumer}` processes (or check "
                "that the running ones are not stuck)",
                details,
            )
        return Finding(name, True, summary, None, details)

    def _redis_unacked(self) -> int | None:
        """Steps delivered and not yet acknowledged, over every worker (running, waiting out a
        retry countdown, or held by a dead worker until its lease lapses)."""
        try:
            leases = WorkerLeases(self._settings.broker_url)
            try:
                return sum(i.unacked for i in leases.incarnations())
            finally:
                leases.close()
        except Exception:
            return None

    @staticmethod
    def _workers(url: str) -> Finding:
        """Redis broker: the workers' leases, and steps a dead worker still holds."""
        leases = WorkerLeases(url)
        try:
            found = leases.incarnations()
        except Exception as exc:
            return Finding("workers", False, f"cannot read the leases: {describe(exc)}")
        finally:
            leases.close()
        alive = [i for i in found if i.alive]
        dead = [i for i in found if not i.alive and i.unacked]
        summary = f"{len(alive)} worker(s) holding a lease"
        details: dict[str, Any] = {
            "alive": [i.name for i in alive],
            "dead_holding_steps": {i.name: i.unacked for i in dead},
        }
        if dead and not alive:
            held = sum(i.unacked for i in dead)
            return Finding(
                "workers",
                False,
                f"{summary}; {held} step(s) held by dead worker(s) wait for a live one",
                "start `provisioner worker`: it hands the dead workers' steps out again",
                details,
            )
        if dead:
            # A live worker sweeps every WORKER_LEASE_RENEW_S: this clears itself in seconds.
            summary += f"; {len(dead)} dead worker(s)' steps are being handed out again"
        return Finding("workers", True, summary, None, details)

    @staticmethod
    def _unreadable(url: str) -> Finding:
        """Redis broker: raw entries on a queue's list that are no kombu message, set aside by
        service/reliable_redis.py (kept, never put back)."""
        keys = [f"{processing_key(queue)}:unreadable" for queue, _ in QUEUES]
        client = Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        try:
            sizes = {key: int(client.llen(key)) for key in keys}
        except Exception as exc:
            return Finding("unreadable messages", False, f"cannot read: {describe(exc)}")
        finally:
            client.close()
        found = {key: size for key, size in sizes.items() if size}
        if not found:
            return Finding("unreadable messages", True, "none set aside")
        where = ", ".join(f"{size} in {key}" for key, size in found.items())
        return Finding(
            "unreadable messages",
            False,
            f"set aside, not kombu messages: {where}",
            "read them with `redis-cli LRANGE <key> 0 -1`, find who pushes raw data onto the "
            "queue, then `redis-cli DEL <key>`",
            {"keys": found},
        )
