"""Test session set-up: its own Redis database, its own SQLite file or PostgreSQL schema, and a
work directory (the SQLite file, the data directory, the service processes' logs)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.support.environment import prepare

# Before anything else imports the settings or the Celery app.
ENVIRONMENT = prepare()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Session fixtures have stopped their processes by now. A passing session leaves nothing
    # behind (a chaos session writes tens of MB of logs); a failing one keeps its logs to read.
    workdir = Path(ENVIRONMENT["TEST_WORKDIR"])
    if exitstatus == pytest.ExitCode.OK:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"\nthe session's logs and database are kept in {workdir}", file=sys.stderr)
