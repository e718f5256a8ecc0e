"""The event log of each generation (live progress): every progress event a runner emits, in order,
so any ingress replica can stream a generation's progress (server-sent events) from the shared
store, and a client that reconnects asks for what came after the last event it saw.

`seq` numbers a generation's events from 1, without gaps; (generation_id, seq) is the key, so
reading "after seq N" is one index range. Rows go with their job (ON DELETE CASCADE, and the
store deletes them explicitly too, since SQLite enforces foreign keys only with the pragma on).
A new table only: nothing to copy, the same on SQLite and PostgreSQL.

Revision ID: 0005
Revises: 0004
"""

from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column(
            "generation_id",
            sa.String(64),
            sa.ForeignKey("jobs.generation_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("progress", sa.Integer, nullable=False),
        sa.Column("scene", sa.Integer, nullable=True),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("events")
