"""The saga's Celery app for ``celery -A bench.worker_app worker``: ``tasks.app`` itself, with
the no-op providers installed first and the step timestamps recorded."""

from __future__ import annotations

from bench import noop_providers, timing

noop_providers.install()

from tasks.app import app  # noqa: E402  (after install: the container is built from it)

timing.connect()

__all__ = ["app"]

import os as _os
if _os.environ.get("BENCH_CPROFILE_DIR"):
    import cProfile as _cp
    from celery.signals import worker_process_init as _wpi, worker_process_shutdown as _wps
    import time as _t; _prof = _cp.Profile(_t.thread_time)
    @_wpi.connect(weak=False)
    def _start(**_k):  # type: ignore
        _prof.enable()
    @_wps.connect(weak=False)
    def _stop(**_k):  # type: ignore
        _prof.disable()
        _prof.dump_stats(f"{_os.environ['BENCH_CPROFILE_DIR']}/{_os.getpid()}.prof")
