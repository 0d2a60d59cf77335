"""In-process loggers that write to the current test's stderr.

structlog caches a logger on first use, with the stream configured at that moment. The CLI's
callback configures logging on ``sys.stderr``; under an in-process ``CliRunner`` that is the
runner's stream, closed after the invocation, and a logger first used after it fails with "I/O
operation on closed file" as soon as it has something to say. Tests that make the service log
in-process, after such a test may have run, give the modules concerned fresh loggers.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import structlog

from config.logging import configure_logging


def fresh_loggers(monkeypatch: pytest.MonkeyPatch, *modules: ModuleType) -> None:
    configure_logging("WARNING")
    for module in modules:
        monkeypatch.setattr(module, "log", structlog.get_logger(module.__name__))
