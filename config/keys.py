"""Every Redis key, exchange, queue and time limit the service uses, in one place."""

from __future__ import annotations

# --- Redis: what may be lost (the DB epoch, not these keys, is what fences) ---
LOCK_PREFIX = "lock:"
FAULT_PLANS_KEY = "provisioner:faults"

# A lock outlives a step's longest automatic-retry wait and is renewed by every step and,
# during a hang, by the hanging step itself; a worker that vanished lets it lapse after this.
LOCK_TTL_MS = 120_000

# A `hang` fault blocks the step until the plan is cleared or this many seconds pass.
HANG_LIMIT_S = 600.0
HANG_POLL_S = 0.25


def lock_key(slug: str) -> str:
    return f"{LOCK_PREFIX}{slug}"


# --- kombu: exchanges and queues of the public contract ---
COMMANDS_EXCHANGE = "tenant.commands"
EVENTS_EXCHANGE = "tenant.events"
COMMANDS_QUEUE = "provisioner.commands"
AUDIT_QUEUE = "provisioner.audit"
CLOUDEVENTS_CONTENT_TYPE = "application/cloudevents+json"
EVENT_SOURCE = "urn:provisioner"

# --- Celery ---
SAGA_QUEUE = "provisioner.saga"
# Redis redelivers an unacknowledged task after this many seconds; it must exceed the longest
# countdown (a step's backoff) and the longest step (a hang, HANG_LIMIT_S), or a running step
# would be handed to a second worker.
VISIBILITY_TIMEOUT_S = 3600

# --- Celery workers on the Redis broker: who holds which delivered step ---
# kombu's Redis transport keeps a delivered, unacknowledged message in one hash until it is
# acknowledged, and hands it out again only after VISIBILITY_TIMEOUT_S: a worker SIGKILLed
# mid-step would strand its steps for an hour. So every worker process (an "incarnation": a node
# name and a random token, new at each start) keeps its deliveries under keys of its own and holds
# a lease it renews; once the lease lapses, the process is dead and any live worker hands its
# deliveries out again (service/worker_leases.py). RabbitMQ does this itself when the
# connection closes.
WORKER_REGISTRY_KEY = "provisioner:workers"
# The lease lapses this long after the process stopped renewing it: the longest time a dead
# worker's steps wait. A live worker renews it from a thread of its own every
# WORKER_LEASE_RENEW_S; only a process frozen for longer than the lease (SIGSTOP, a paused VM)
# would have its deliveries handed out while it still holds them.
WORKER_LEASE_TTL_MS = 15_000
WORKER_LEASE_RENEW_S = 3.0
# One live worker at a time restores a dead incarnation's deliveries.
WORKER_SWEEP_MUTEX_MS = 30_000


def worker_key(incarnation: str, part: str) -> str:
    return f"provisioner:worker:{incarnation}:{part}"


def worker_transport_options(incarnation: str) -> dict[str, object]:
    return {
        "visibility_timeout": VISIBILITY_TIMEOUT_S,
        "unacked_key": worker_key(incarnation, "unacked"),
        "unacked_index_key": worker_key(incarnation, "unacked_index"),
        "unacked_mutex_key": worker_key(incarnation, "unacked_mutex"),
    }


# --- every consumer on the Redis broker (service/reliable_redis.py) ---
# A message moved into its queue's processing list by a consumer that died before recording the
# delivery is put back on the queue after this long; a live consumer's stays there for
# microseconds.
PROCESSING_STALE_S = 5.0


def processing_key(queue: str) -> str:
    return f"provisioner:processing:{queue}"


# --- outbox relay ---
RELAY_POLL_S = 1.0
# Rows younger than this are left to the process that wrote them (it publishes right after
# commit); the relay loop picks up what a crash left behind.
RELAY_GRACE_S = 3.0

# --- consumers whose handling is idempotent (the listener, the audit consumer) ---
# Redis transport only: a message delivered to a consumer that was killed before acknowledging
# it is handed out again after this long (kombu's default is an hour). Short, because handling
# is idempotent (command ids, event ids). Each consumer keeps its unacked messages under keys of
# its own, so that this short sweep never touches Celery's tasks, which must wait out
# VISIBILITY_TIMEOUT_S (a step may legitimately run for minutes).
CONSUMER_REDELIVER_AFTER_S = 10.0


def consumer_transport_options(consumer: str) -> dict[str, object]:
    return {
        "visibility_timeout": CONSUMER_REDELIVER_AFTER_S,
        "unacked_key": f"provisioner.{consumer}.unacked",
        "unacked_index_key": f"provisioner.{consumer}.unacked_index",
        "unacked_mutex_key": f"provisioner.{consumer}.unacked_mutex",
        # A consumer killed while it held the restore mutex would otherwise block every other
        # consumer's restore for kombu's default five minutes; a restore takes milliseconds.
        "unacked_mutex_expire": 5,
        "unacked_restore_throttle": 4,
    }


# --- issue 6 (saga cost per step): marking published outbox rows off the step's path ---
# A process marks the rows it published in one UPDATE at most this long after the first of them
# was published; well under RELAY_GRACE_S, so the relay loop never republishes a row only
# because its mark was still waiting.
OUTBOX_MARK_DELAY_S = 0.1
# More rows than this waiting are marked at once, without waiting out the delay.
OUTBOX_MARK_BATCH = 200
