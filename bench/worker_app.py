"""The saga's Celery app for ``celery -A bench.worker_app worker``: ``tasks.app`` itself, with
the no-op providers installed first and the step timestamps recorded."""

from __future__ import annotations

from bench import cpu_profile, noop_providers, phase_clock, timing

noop_providers.install()

from tasks.app import app  # noqa: E402  (after install: the container is built from it)

timing.connect()
cpu_profile.install_if_asked("saga")
phase_clock.install_if_asked("saga")

__all__ = ["app"]
