"""Worker leases on the Redis broker (service/worker_leases.py): a dead worker's deliveries are
handed out again once its lease lapses, a live worker's never are.

The kombu-level tests use the session's Redis database as a Redis broker of their own (a queue
nobody else reads), whatever the session's broker is. The end-to-end story, a whole worker
SIGKILLed mid-step and its saga finishing with no operator, is in tests/chaos/test_worker_kills.py.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest
from kombu import Connection, Message
from redis import Redis

from config.keys import WORKER_REGISTRY_KEY, worker_key
from sagas.messages import CommandType
from service.bootstrap import Container
from service.faults import FaultMode
from service.handlers import Request
from service.worker_leases import WorkerLeases, is_redis_broker, new_incarnation
from tests.support.events import EventTap, new_slug, settled
from tests.support.leases import deliver_and_die
from tests.support.stack import wait_until
from tests.support.workers import WorkerGroup

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(services: Container) -> Iterator[str]:
    url = services.settings.redis_url
    yield url
    client = Redis.from_url(url, decode_responses=True)
    for name in client.smembers(WORKER_REGISTRY_KEY):
        if str(name).startswith("lease-test"):
            client.srem(WORKER_REGISTRY_KEY, name)


def take(broker: str, queue: str) -> Message:
    with Connection(broker) as conn:
        received = conn.SimpleQueue(queue)
        message = received.get(timeout=5)
        message.ack()
        received.close()
        return message


def test_a_dead_incarnations_deliveries_go_back_to_their_queue(broker: str) -> None:
    queue = f"lease-test-{uuid.uuid4().hex[:8]}"
    dead = new_incarnation("lease-test-dead@host")
    live = new_incarnation("lease-test-live@host")
    sweeper = WorkerLeases(broker)
    sweeper.register(dead)
    sweeper.register(live)

    deliver_and_die(broker, dead, queue, "held by the dead one")
    deliver_and_die(broker, live, queue, "held by the live one")
    mine = {i.name: i for i in sweeper.incarnations()}
    assert mine[dead].unacked == 1
    assert mine[live].unacked == 1
    # While its lease lasts, nobody touches a worker's deliveries.
    assert sweeper.sweep(own=live) == {}

    # A dead process renews nothing: its lease runs out (shortened here, not to wait 15 s).
    Redis.from_url(broker).pexpire(worker_key(dead, "lease"), 200)
    wait_until(
        lambda: not {i.name: i for i in sweeper.incarnations()}[dead].alive,
        10,
        "the lease to lapse",
    )
    assert sweeper.sweep(own=live) == {dead: 1}

    message = take(broker, queue)
    assert message.payload == {"body": "held by the dead one"}
    assert message.delivery_info.get("redelivered") or message.headers.get("redelivered")
    client = Redis.from_url(broker)
    assert dead.encode() not in client.smembers(WORKER_REGISTRY_KEY)
    assert not client.exists(worker_key(dead, "unacked"), worker_key(dead, "unacked_index"))
    # The live one's delivery stayed where it was, and a second sweep finds nothing to do.
    assert client.hlen(worker_key(live, "unacked")) == 1
    assert sweeper.sweep(own=live) == {}
    assert dead.encode() not in client.smembers(WORKER_REGISTRY_KEY)
    client.delete(*(worker_key(live, part) for part in ("lease", "unacked", "unacked_index")))


def test_a_lapsed_lease_is_reported_and_taken_back(broker: str) -> None:
    incarnation = new_incarnation("lease-test-frozen@host")
    leases = WorkerLeases(broker, ttl_ms=300)
    leases.register(incarnation)
    assert leases.renew(incarnation) is True
    wait_until(
        lambda: not Redis.from_url(broker).exists(worker_key(incarnation, "lease")),
        10,
        "the lease to lapse",
    )
    # A process frozen past its lease learns it (and logs it), and holds a lease again.
    assert leases.renew(incarnation) is False
    assert Redis.from_url(broker).exists(worker_key(incarnation, "lease"))
    Redis.from_url(broker).delete(worker_key(incarnation, "lease"))


def test_the_saga_worker_keeps_its_deliveries_under_its_own_lease(
    services: Container, worker: WorkerGroup, tap: EventTap
) -> None:
    broker = services.settings.broker_url
    if not is_redis_broker(broker):
        # RabbitMQ requeues a dead consumer's deliveries itself: the workers take no lease.
        assert "worker.lease_taken" not in worker.log_text()
        return
    assert worker.log_text().count("worker.lease_taken") == len(worker.node_names)
    nodes = [n.replace("%h", socket.gethostname()) for n in worker.node_names]
    leases = WorkerLeases(broker)
    ours = [i for i in leases.incarnations() if i.name.split("~")[0] in nodes]
    assert len(ours) == len(nodes), leases.incarnations()
    assert all(i.alive for i in ours), ours

    slug = new_slug("lease")
    plan = services.faults.add("provision_storage", mode=FaultMode.HANG, tenant=slug, times=1)
    services.handlers.create(Request(CommandType.PROVISION, slug), plan="pro")
    tap.wait_for(lambda evs: any(e["data"].get("step") == "provision_storage" for e in evs), slug)
    # The hanging step is held under the running worker's own keys, not kombu's shared hash.
    wait_until(
        lambda: sum(i.unacked for i in leases.incarnations() if i.name.split("~")[0] in nodes) >= 1,
        10,
        "the hanging step to be held by its worker",
    )
    assert not Redis.from_url(broker).hlen("unacked")
    services.faults.clear(plan.id)
    tap.wait_for(settled, slug, timeout=60)
