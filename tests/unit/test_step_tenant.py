"""A step's message carries its tenant (``tenant``); a message of other code may carry none, or
one in another shape: the step then reads the tenant from the database (service/saga_runner.py)."""

from __future__ import annotations

import pytest

from service.dispatch import StepTenant


def test_the_tenant_comes_back_from_the_message_as_it_was_sent() -> None:
    for sent in (StepTenant("t-1", "pro", "ops@example.com"), StepTenant("t-2", "free", None)):
        assert StepTenant.from_message(sent.as_kwargs()) == sent


@pytest.mark.parametrize(
    "carried",
    [
        None,
        "t-1",
        ["t-1", "pro", None],
        {},
        {"tenant_id": "t-1"},
        {"tenant_id": 7, "plan": "pro", "admin_email": None},
        {"tenant_id": "t-1", "plan": None, "admin_email": None},
        {"tenant_id": "t-1", "plan": "pro", "admin_email": 3},
    ],
)
def test_a_tenant_of_another_shape_is_none(carried: object) -> None:
    assert StepTenant.from_message(carried) is None


def test_keys_the_step_does_not_know_are_left_aside() -> None:
    carried = {"tenant_id": "t-1", "plan": "pro", "admin_email": None, "region": "eu"}
    assert StepTenant.from_message(carried) == StepTenant("t-1", "pro", None)
