"""Alembic environment for the job store.

The store runs migrations itself when it opens (`pipeline.jobs.migrations.upgrade`), handing over a
connection that already holds the migration lock, so this file only binds that connection. The
`alembic` command line works too, with `-x url=...` (for writing new revisions).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from pipeline.jobs.tables import metadata

connection = context.config.attributes.get("connection")


def _run(conn) -> None:
    # SQLite cannot ALTER constraints: batch mode recreates the table instead.
    context.configure(
        connection=conn, target_metadata=metadata, render_as_batch=conn.dialect.name == "sqlite"
    )
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    _run(connection)
else:  # pragma: no cover - developer use of the alembic CLI
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option("sqlalchemy.url")
    with create_engine(url).begin() as conn:
        _run(conn)
