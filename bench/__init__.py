"""The benchmark harness: the saga against a bare Celery chain, in the same run (``python -m
bench``; see ``docs/benchmarks.md``)."""
