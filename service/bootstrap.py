"""The composition root: settings -> adapters -> runners -> handlers, built once per process."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from redis import Redis
from sqlalchemy import Engine

from config.settings import Settings, get_settings
from service.db.engine import make_engine
from service.db.migrate import migrate
from service.decommission_runner import DecommissionRunner
from service.dispatch import SagaDispatcher
from service.faults import FaultPlans
from service.handlers import Handlers
from service.locks import TenantLocks
from service.providers.base import Provider
from service.providers.registry import build_providers
from service.publisher import Publisher
from service.relay import OutboxRelay
from service.saga_runner import SagaRunner


@dataclass
class Container:
    settings: Settings
    engine: Engine
    redis: Redis
    locks: TenantLocks
    faults: FaultPlans
    publisher: Publisher
    relay: OutboxRelay
    providers: dict[str, Provider]
    runner: SagaRunner
    decommissions: DecommissionRunner
    handlers: Handlers


def build_container(
    settings: Settings | None = None,
    *,
    dispatcher: SagaDispatcher | None = None,
    run_migrations: bool = True,
) -> Container:
    settings = settings or get_settings()
    engine = make_engine(settings.database_url)
    if run_migrations:
        migrate(engine)
    redis = Redis.from_url(settings.redis_url, health_check_interval=30)
    locks = TenantLocks(redis)
    faults = FaultPlans(redis)
    publisher = Publisher(settings.broker_url)
    relay = OutboxRelay(engine, publisher)
    providers = build_providers(engine)
    runner = SagaRunner(
        engine=engine,
        settings=settings,
        providers=providers,
        locks=locks,
        faults=faults,
        relay=relay,
    )
    decommissions = DecommissionRunner(
        engine=engine,
        settings=settings,
        providers=providers,
        locks=locks,
        faults=faults,
        relay=relay,
    )
    if dispatcher is None:
        # The one import against the layering: the composition root wires Celery in.
        from tasks.dispatch import CeleryDispatcher

        dispatcher = CeleryDispatcher()
    handlers = Handlers(
        engine=engine,
        settings=settings,
        locks=locks,
        relay=relay,
        providers=providers,
        dispatcher=dispatcher,
        runner=runner,
    )
    return Container(
        settings=settings,
        engine=engine,
        redis=redis,
        locks=locks,
        faults=faults,
        publisher=publisher,
        relay=relay,
        providers=providers,
        runner=runner,
        decommissions=decommissions,
        handlers=handlers,
    )


_lock = threading.Lock()
_container: Container | None = None


def container() -> Container:
    """The process's container, built on first use (after a prefork worker's fork)."""
    global _container
    with _lock:
        if _container is None:
            _container = build_container()
        return _container


def built_container() -> Container | None:
    """The process's container if it was built (nothing to clean up otherwise)."""
    with _lock:
        return _container


def forget_container() -> None:
    """Drop the container (a forked child must build its own connections)."""
    global _container
    with _lock:
        _container = None
