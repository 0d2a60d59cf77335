"""Issue 6: statements run on the driver's cursor read and write what ``Connection.execute``
would (the column types' own conversions), raise SQLAlchemy's errors, and refuse a statement
that needs SQLAlchemy's execution context. On the session's database: SQLite, or PostgreSQL in
the scaled-out pass."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    create_engine,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

from service.bootstrap import Container
from service.db.driver_statements import DriverStatement
from service.db.engine import WRITE_OPTION, make_engine
from service.dispatch import AttemptRef
from service.step_runs import PickupRead
from tests.support.environment import DEFAULT_POSTGRES_URL

pytestmark = pytest.mark.integration

METADATA = MetaData()
PROBE = Table(
    f"driver_probe_{uuid.uuid4().hex[:8]}",
    METADATA,
    Column("id", Integer, primary_key=True),
    Column("name", AutoString(40), unique=True, nullable=False),
    Column("state", String(20), nullable=False),
    Column("doc", JSON, nullable=False),
    # The types the service's models get from SQLModel (both are TypeDecorators).
    Column("at", UTCDateTime()),
    Column("note", String(20), default="python-side"),
)


@pytest.fixture
def engine(services: Container) -> Iterator[Engine]:
    engine = services.engine
    METADATA.create_all(engine)
    yield engine.execution_options(**{WRITE_OPTION: True})
    METADATA.drop_all(engine)


def row_values(row: int) -> dict[str, Any]:
    """A multi-row VALUES' row, its parameters typed (SQLAlchemy types the first row's only)."""
    return {
        "name": bindparam(f"name_{row}", type_=PROBE.c.name.type),
        "doc": bindparam(f"doc_{row}", type_=PROBE.c.doc.type),
        "at": bindparam(f"at_{row}", type_=PROBE.c.at.type),
        "state": "new",
        "note": "given",
    }


def test_rows_go_in_and_come_out_as_core_would_have_them(engine: Engine) -> None:
    dialect = engine.dialect
    add = DriverStatement(
        insert(PROBE)
        .values([row_values(row) for row in range(2)])
        .returning(PROBE.c.id, PROBE.c.name),
        dialect,
    )
    rename = DriverStatement(
        update(PROBE)
        .where(PROBE.c.name == bindparam("old"))
        .values(name=bindparam("new"), state="renamed"),
        dialect,
    )
    read = DriverStatement(
        select(PROBE.c.name, PROBE.c.state, PROBE.c.doc, PROBE.c.at).where(
            PROBE.c.name == bindparam("name")
        ),
        dialect,
    )
    # Not UTC on purpose: the column's type stores UTC and gives back UTC.
    at = datetime(2026, 11, 26, 14, 30, 5, 123456, tzinfo=timezone(timedelta(hours=2)))
    doc = {"ids": [1, 2], "nested": {"é": None, "ok": True}}

    with engine.begin() as connection:
        written = add.all(
            connection,
            {
                "name_0": "first",
                "doc_0": doc,
                "at_0": at,
                "name_1": "second",
                "doc_1": {},
                "at_1": at,
            },
        )
        rename.run(connection, {"old": "second", "new": "third"})

    assert sorted(name for _id, name in written) == ["first", "second"]
    assert all(isinstance(row_id, int) for row_id, _name in written)
    with engine.connect() as connection:
        found = read.first(connection, {"name": "first"})
        renamed = read.first(connection, {"name": "third"})
        missing = read.first(connection, {"name": "second"})
        # What Core reads from the same rows: the driver statement must agree with it.
        core = connection.execute(
            select(PROBE.c.name, PROBE.c.state, PROBE.c.doc, PROBE.c.at).where(
                PROBE.c.name == "first"
            )
        ).one()
    assert found == tuple(core)
    assert found == ("first", "new", doc, at.astimezone(UTC))
    assert found[3].tzinfo is not None
    assert renamed is not None
    assert renamed[:3] == ("third", "renamed", {})
    assert missing is None


def test_a_driver_error_is_sqlalchemys_and_the_transaction_rolls_back(engine: Engine) -> None:
    add = DriverStatement(
        insert(PROBE).values(
            name=bindparam("name"), state="new", doc=bindparam("doc"), at=None, note="given"
        ),
        engine.dialect,
    )
    count = DriverStatement(
        select(PROBE.c.name).where(PROBE.c.name == bindparam("name")), engine.dialect
    )
    with engine.begin() as connection:
        add.run(connection, {"name": "taken", "doc": {}})

    def add_both() -> None:
        with engine.begin() as connection:
            add.run(connection, {"name": "other", "doc": {}})
            add.run(connection, {"name": "taken", "doc": {}})

    with pytest.raises(IntegrityError):
        add_both()

    with engine.connect() as connection:
        assert count.all(connection, {"name": "other"}) == []
        # The connection the failed transaction used went back to the pool fit for use.
        assert count.all(connection, {"name": "taken"}) == [("taken",)]


def test_a_statement_that_needs_a_python_side_default_is_refused(engine: Engine) -> None:
    # `note` has a Python-side default that only Connection.execute would fill in.
    with pytest.raises(ValueError, match="not a driver statement"):
        DriverStatement(
            insert(PROBE).values(name=bindparam("name"), state="new", doc=bindparam("doc")),
            engine.dialect,
        )


def test_a_parameter_without_a_type_is_refused(engine: Engine) -> None:
    # The second row's parameters, untyped, would reach the driver unconverted.
    untyped = [
        {
            "name": bindparam(f"name_{row}"),
            "doc": bindparam(f"doc_{row}"),
            "state": "new",
            "note": "given",
        }
        for row in range(2)
    ]
    with pytest.raises(ValueError, match="without a type: doc_1, name_1"):
        DriverStatement(insert(PROBE).values(untyped), engine.dialect)


def test_a_missing_parameter_is_named(engine: Engine) -> None:
    read = DriverStatement(
        select(PROBE.c.name).where(PROBE.c.name == bindparam("name")), engine.dialect
    )
    with engine.connect() as connection, pytest.raises(KeyError, match="name"):
        read.first(connection, {})


def test_the_pickup_read_leaves_the_pools_connections_transactional(services: Container) -> None:
    # One connection in the pool: the transaction after the read gets the read's connection.
    # On PostgreSQL the read runs without a transaction; a connection that went back to the
    # pool in autocommit would let the completion's FOR UPDATE lock nothing.
    engine = create_engine(services.settings.database_url, pool_size=1, max_overflow=0)
    try:
        read = PickupRead(engine)
        missing = AttemptRef(slug="nobody", attempt_number=1, attempt_id=str(uuid.uuid4()))
        assert read(missing, "validate") is None
        with engine.begin() as connection:
            assert connection.get_isolation_level() != "AUTOCOMMIT"
            driver = connection.connection.driver_connection
            assert not getattr(driver, "autocommit", False)
    finally:
        engine.dispose()


def postgres_url() -> str:
    url = os.environ.get("TEST_DATABASE_URL") or DEFAULT_POSTGRES_URL
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return url
    except OSError:
        if os.environ.get("CI"):  # CI starts PostgreSQL (.ci/run): its absence is a failure
            pytest.fail("needs PostgreSQL on 127.0.0.1:5432 (a server to lose a connection to)")
        pytest.skip("needs PostgreSQL on 127.0.0.1:5432 (a server to lose a connection to)")


def pid_of(connection: Connection) -> int:
    return int(connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


def terminate(admin: Connection, backend: int) -> None:
    admin.exec_driver_sql(f"SELECT pg_terminate_backend({backend})")
    admin.commit()


def test_a_lost_connection_is_invalidated_and_the_next_checkout_gets_a_new_one() -> None:
    # On PostgreSQL in every pass (SQLite has no server to lose): the backend behind a pooled
    # connection is terminated, as a database restart or a failover would.
    engine = make_engine(postgres_url())
    one = DriverStatement(select(bindparam("value", type_=Integer)), engine.dialect)
    try:
        with engine.connect() as admin:
            with engine.connect() as pooled:
                assert one.first(pooled, {"value": 1}) == (1,)
                backend = pid_of(pooled)
            # Back in the pool (first in line for the next checkout), and its backend gone.
            terminate(admin, backend)

        with engine.connect() as admin, engine.connect() as connection:
            # The pool's pre-ping replaced the dead connection at checkout: nothing to see.
            assert one.first(connection, {"value": 2}) == (2,)
            terminate(admin, pid_of(connection))
            # Lost while checked out: SQLAlchemy's error, the connection marked invalid.
            with pytest.raises(OperationalError) as raised:
                one.first(connection, {"value": 3})
            assert raised.value.connection_invalidated
            assert connection.invalidated

        with engine.connect() as connection:
            assert one.first(connection, {"value": 4}) == (4,)
    finally:
        engine.dispose()
