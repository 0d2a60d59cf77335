"""Core statements compiled once for a dialect and run on the DB-API cursor of a SQLAlchemy
connection: for the statements every saga step runs (its pick-up read, its completion).

Executing a cached Core statement still costs SQLAlchemy an execution context, its parameter
and result processing and an event dispatch each time: a three-statement transaction on SQLite
took 210 µs through ``Connection.execute`` and 80 µs with the same statements on the cursor
(docs/benchmarks.md, round 4). What stays SQLAlchemy's is what must stay right: the SQL is the
dialect's own compilation (PostgreSQL's bind casts, SQLite's placeholders), every parameter and
result column goes through its type's own processor (JSON, datetimes), the transaction and the
pool are the connection's, and a driver error is raised as SQLAlchemy's ``DBAPIError`` with the
connection invalidated on a disconnect, as ``Connection.execute`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.types import NullType

_Processor = Callable[[Any], Any] | None


class DriverStatement:
    """One statement, compiled for ``dialect``; parameters by their bind names."""

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        if compiled.escaped_bind_names or compiled.insert_prefetch or compiled.update_prefetch:
            # Python-side column defaults and escaped names need SQLAlchemy's execution context:
            # such a statement belongs on Connection.execute.
            raise ValueError(f"not a driver statement (defaults or escaped names): {compiled}")
        self.sql = compiled.string
        self._dialect = dialect
        self._order: tuple[str, ...] | None = (
            tuple(compiled.positiontup or ()) if compiled.positional else None
        )
        # The parameters as the SQL names them (``binds`` also keys them by anonymous names).
        binds = {name: bind for bind, name in compiled.bind_names.items()}
        untyped = sorted(name for name, bind in binds.items() if isinstance(bind.type, NullType))
        if untyped:
            # The driver would get the value unconverted (a dict, a datetime in its own format).
            # A multi-row VALUES types only its first row's parameters: type the others.
            raise ValueError(f"parameters without a type: {', '.join(untyped)}")
        # A value written into the statement itself (``.values(status="completed")``).
        self._fixed = {name: bind.value for name, bind in binds.items() if not bind.required}
        self._bind = {
            name: bind.type.dialect_impl(dialect).bind_processor(dialect)
            for name, bind in binds.items()
        }
        columns: Sequence[Any] = list(getattr(statement, "exported_columns", ()))
        self._results: list[_Processor] = [
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
        ]

    def first(self, connection: Connection, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        rows = self._run(connection, params, fetch=1)
        return rows[0] if rows else None

    def all(self, connection: Connection, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        return self._run(connection, params, fetch=None)

    def run(self, connection: Connection, params: Mapping[str, Any]) -> None:
        self._run(connection, params, fetch=0)

    def _run(
        self, connection: Connection, params: Mapping[str, Any], *, fetch: int | None
    ) -> list[tuple[Any, ...]]:
        """``fetch``: how many rows to read back (None: all of them)."""
        values = self._parameters(params)
        fairy = connection.connection
        cursor = fairy.cursor()
        try:
            cursor.execute(self.sql, values)
            if fetch == 0 or cursor.description is None:
                return []
            raw = cursor.fetchall() if fetch is None else cursor.fetchmany(fetch)
        except self._dialect.loaded_dbapi.Error as exc:
            disconnected = self._dialect.is_disconnect(exc, fairy.dbapi_connection, cursor)
            if disconnected:
                # As Connection.execute does: the pool opens a new connection next time.
                connection.invalidate(exc)
            raise DBAPIError.instance(
                self.sql,
                values,
                exc,
                self._dialect.loaded_dbapi.Error,
                connection_invalidated=disconnected,
                dialect=self._dialect,
            ) from exc
        finally:
            cursor.close()
        return [self._row(row) for row in raw]

    def _parameters(self, params: Mapping[str, Any]) -> Any:
        merged = {**self._fixed, **params}
        processed = {}
        for name, process in self._bind.items():
            value = merged[name]  # a missing parameter is a bug: KeyError names it
            processed[name] = process(value) if process is not None else value
        if self._order is None:
            return processed
        return tuple(processed[name] for name in self._order)

    def _row(self, row: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(
            process(value) if process is not None else value
            for process, value in zip(self._results, row, strict=True)
        )
