"""Engines for SQLite (the embedded default) and PostgreSQL, and the unit of work."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool, Pool, QueuePool
from sqlmodel import Session

from service.db.driver_statements import DriverStatement

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Open SQLite connections kept per process. Opening one sets up the WAL and closing the last one
# checkpoints it: with a connection per transaction that was most of a saga step's cost
# (docs/benchmarks.md). A prefork child is single-threaded; a threaded caller (the API) that
# needs more gets them, opened and closed as before (no limit, so nothing waits for the pool).
SQLITE_POOL_SIZE = 4
SQLITE_POOL_OVERFLOW = -1
WRITE_OPTION = "provisioner_writes"
# The pools a forked child inherited: kept referenced, never used or closed, because closing a
# SQLite connection the parent still uses would checkpoint the WAL under it.
_INHERITED_POOLS: list[Pool] = []


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, parsed.database)
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def _sqlite_engine(url: str, database: str | None) -> Engine:
    in_file = bool(database) and database != ":memory:"
    if in_file:
        Path(str(database)).parent.mkdir(parents=True, exist_ok=True)
    pooling: dict[str, Any] = (
        {
            "poolclass": QueuePool,
            "pool_size": SQLITE_POOL_SIZE,
            "max_overflow": SQLITE_POOL_OVERFLOW,
        }
        if in_file
        else {"poolclass": NullPool}
    )
    engine = create_engine(
        url,
        # Transactions are opened by the BEGIN IMMEDIATE below, not by pysqlite. The pool hands
        # a connection to one thread at a time.
        connect_args={
            "isolation_level": None,
            "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
            "check_same_thread": False,
        },
        **pooling,
    )
    if in_file:
        os.register_at_fork(after_in_child=_forget_pool_after_fork(weakref.ref(engine)))

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    # On the driver's cursor: every step's completion begins one, and exec_driver_sql's
    # execution context cost more than the BEGIN itself (docs/benchmarks.md, round 7).
    begin_writing = DriverStatement(text("BEGIN IMMEDIATE"), engine.dialect)
    begin_reading = DriverStatement(text("BEGIN"), engine.dialect)

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # A writer takes the write lock up front: a deferred transaction that later upgrades to
        # write fails at once with "database is locked" instead of waiting out the busy
        # timeout. Readers stay deferred, so that they never wait behind a writer (WAL).
        writes = connection.get_execution_options().get(WRITE_OPTION, False)
        (begin_writing if writes else begin_reading).run(connection, {})

    return engine


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


@contextmanager
def unit_of_work(engine: Engine) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception."""
    with Session(
        engine.execution_options(**{WRITE_OPTION: True}), expire_on_commit=False
    ) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def _forget_pool_after_fork(ref: weakref.ref[Engine]) -> Callable[[], None]:
    def forget() -> None:
        engine = ref()
        if engine is not None:
            _INHERITED_POOLS.append(engine.pool)
            engine.dispose(close=False)

    return forget


def dispose_after_fork(engine: Engine) -> None:
    """A forked child must not reuse the parent's pooled connections."""
    engine.dispose(close=False)


def sqlite_path(url: str) -> str | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return os.path.abspath(parsed.database)
