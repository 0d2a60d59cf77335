"""Which provider does each step of the saga: the real local ones."""

from __future__ import annotations

from sqlalchemy import Engine

from sagas.steps import STEPS
from service.providers.activate import ActivateProvider
from service.providers.base import Provider
from service.providers.certificates import CertificateProvider
from service.providers.console import AdminConsoleProvider
from service.providers.readiness import ReadinessProvider
from service.providers.slot import SlotProvider
from service.providers.storage import StorageProvider
from service.providers.validate import ValidateProvider
from service.providers.workflows import WorkflowRegistryProvider


def build_providers(engine: Engine) -> dict[str, Provider]:
    """Every step's provider, keyed by step name, in the saga's order."""
    makers: dict[str, Provider] = {
        provider.step: provider
        for provider in (
            ValidateProvider(),
            SlotProvider(engine),
            StorageProvider(),
            WorkflowRegistryProvider(),
            CertificateProvider(),
            AdminConsoleProvider(),
        )
    }
    # Readiness checks what the others made, through their own exists().
    makers["check_readiness"] = ReadinessProvider(dict(makers))
    makers["activate"] = ActivateProvider()
    if set(makers) != set(STEPS):
        raise RuntimeError(f"providers {sorted(makers)} do not match the steps {STEPS}")
    return {step: makers[step] for step in STEPS}
