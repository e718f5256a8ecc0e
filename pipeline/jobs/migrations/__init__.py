"""Schema migrations of the job store, with Alembic, run by `JobStore` when it opens.

No alembic.ini is needed at run time: the configuration is built here and points at this
directory. Several replicas may open the store at once, so the check-and-upgrade runs under a
lock: a transaction-scoped advisory lock on PostgreSQL, `BEGIN IMMEDIATE` (the database's one
write lock) on SQLite; whoever comes second finds the schema at head and does nothing. A
database made by the old `metadata.create_all` (tables, no `alembic_version`) is stamped 0001,
the schema it has, and upgraded in place.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

HERE = Path(__file__).resolve().parent
BASELINE = "0001"
# Any constant shared by every replica: the key of the PostgreSQL advisory lock.
ADVISORY_LOCK_KEY = 7_301_907_115


def config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    return cfg


def head() -> str:
    return ScriptDirectory.from_config(config()).get_current_head()


def current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Bring the schema to head; cheap when it is there already (one SELECT)."""
    with engine.connect() as conn:
        if current(conn) == head():
            return
    if engine.dialect.name == "sqlite":
        _upgrade_sqlite(engine)
    elif engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
            _migrate(conn)
    else:
        with engine.begin() as conn:
            _migrate(conn)


def _upgrade_sqlite(engine: Engine) -> None:
    with engine.connect() as conn:
        # Batch mode copies and drops `jobs`; with foreign keys on, dropping it would cascade
        # into `scenes`. The pragma only takes effect outside a transaction.
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        conn.commit()
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # waits (busy_timeout) for another upgrader
            try:
                _migrate(conn)
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
        finally:
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            conn.commit()


def _migrate(conn: Connection) -> None:
    cfg = config()
    cfg.attributes["connection"] = conn
    tables = set(inspect(conn).get_table_names())
    if "jobs" in tables and "alembic_version" not in tables:
        command.stamp(cfg, BASELINE)
    command.upgrade(cfg, "head")
