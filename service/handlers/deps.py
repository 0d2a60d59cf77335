"""What the use cases share: the adapters, wired once by the composition root."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from config.settings import Settings
from service.dispatch import SagaDispatcher
from service.handlers.answers import CommandBook
from service.locks import TenantLocks
from service.providers.base import Provider
from service.relay import OutboxRelay
from service.saga_runner import SagaRunner


@dataclass(frozen=True)
class HandlerDeps:
    engine: Engine
    settings: Settings
    locks: TenantLocks
    relay: OutboxRelay
    providers: dict[str, Provider]
    dispatcher: SagaDispatcher
    runner: SagaRunner
    book: CommandBook


class UseCase:
    """A use case's access to the shared adapters."""

    def __init__(self, deps: HandlerDeps) -> None:
        self._engine = deps.engine
        self._settings = deps.settings
        self._locks = deps.locks
        self._relay = deps.relay
        self._providers = deps.providers
        self._dispatcher = deps.dispatcher
        self._runner = deps.runner
        self._book = deps.book
