"""One exception tree; each name says what went wrong."""

from __future__ import annotations


class ProvisionerError(Exception):
    """Root of every error this service raises on purpose."""


class InvalidTransition(ProvisionerError):
    """A tenant state change the contract does not allow."""


# --- a step's failures, as providers raise them ---
class StepError(ProvisionerError):
    """A step did not do its work. ``retryable`` says whether trying again can help."""

    retryable: bool = True

    @property
    def error_type(self) -> str:
        return type(self).__name__


class TransientUpstreamError(StepError):
    """An upstream failed in a way another try may not (retried automatically)."""


class FatalUpstreamError(StepError):
    """An upstream refused in a way no retry will change."""

    retryable = False


class ValidationFailure(FatalUpstreamError):
    """The tenant's own request is invalid (bad slug, unknown plan): decommission and recreate."""


class SlotTaken(FatalUpstreamError):
    """Another live tenant holds the slug's slot."""


# --- control flow around the saga ---
class AttemptFenced(ProvisionerError):
    """The attempt's epoch is no longer the tenant's: a reset or a newer run superseded it."""


class StepFailedForGood(ProvisionerError):
    """A step used up its tries (or failed fatally); the attempt fails through ``link_error``."""

    def __init__(self, step: str, error_type: str, message: str, tries: int) -> None:
        super().__init__(f"{step} failed after {tries} tries: {error_type}: {message}")
        self.step = step
        self.error_type = error_type
        self.message = message
        self.tries = tries


class CommandRejected(ProvisionerError):
    """A command the rules refuse; ``reason`` is one of the contract's rejection reasons."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class MalformedCommand(ProvisionerError):
    """A command body that is not a valid command CloudEvent."""
