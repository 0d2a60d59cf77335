"""The use cases: create, retry, reset, decommission. One set of rules for every entry point
(the command listener, the CLI, the HTTP API): each calls these and nothing else."""

from __future__ import annotations

from sqlalchemy import Engine

from config.settings import Settings
from service.db.models import DeadLetter
from service.dispatch import SagaDispatcher
from service.handlers.answers import CommandBook, Outcome, Request
from service.handlers.attempts import AttemptStarter
from service.handlers.decommission import DecommissionTenant
from service.handlers.deps import HandlerDeps
from service.handlers.reset import ResetTenant
from service.locks import TenantLocks
from service.providers.base import Provider
from service.relay import OutboxRelay
from service.saga_runner import SagaRunner

__all__ = ["Handlers", "Outcome", "Request"]


class Handlers:
    """The entry points' one door to the use cases."""

    def __init__(
        self,
        *,
        engine: Engine,
        settings: Settings,
        locks: TenantLocks,
        relay: OutboxRelay,
        providers: dict[str, Provider],
        dispatcher: SagaDispatcher,
        runner: SagaRunner,
    ) -> None:
        book = CommandBook(engine, relay)
        deps = HandlerDeps(
            engine=engine,
            settings=settings,
            locks=locks,
            relay=relay,
            providers=providers,
            dispatcher=dispatcher,
            runner=runner,
            book=book,
        )
        self._book = book
        self._attempts = AttemptStarter(deps)
        self._reset = ResetTenant(deps)
        self._decommission = DecommissionTenant(deps)

    def create(self, request: Request, *, plan: str, admin_email: str | None = None) -> Outcome:
        return self._attempts.create(request, plan=plan, admin_email=admin_email)

    def retry(self, request: Request, *, force: bool = False) -> Outcome:
        return self._attempts.retry(request, force=force)

    def reset(self, request: Request) -> Outcome:
        return self._reset(request)

    def decommission(self, request: Request) -> Outcome:
        return self._decommission(request)

    def reject_malformed(
        self,
        *,
        command_id: str | None,
        command_type: str | None,
        slug: str | None,
        message: str,
        dead_letter: DeadLetter,
    ) -> Outcome:
        return self._book.reject_malformed(
            command_id=command_id,
            command_type=command_type,
            slug=slug,
            message=message,
            dead_letter=dead_letter,
        )

    def dead_letter_kept(self, dead_letter: DeadLetter) -> bool:
        return self._book.dead_letter_kept(dead_letter)
