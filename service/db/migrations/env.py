"""alembic environment: runs on the connection the service hands it (see migrate.py)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlmodel import SQLModel

import service.db.models  # noqa: F401  (registers the tables on SQLModel.metadata)

target_metadata = SQLModel.metadata
config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        # Run from the alembic command line (e.g. `alembic revision --autogenerate`).
        engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
        with engine.begin() as own_connection:
            context.configure(
                connection=own_connection, target_metadata=target_metadata, render_as_batch=True
            )
            context.run_migrations()
        return
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    context.run_migrations()


run()
