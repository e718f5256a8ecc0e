"""Owner ids of any length: `jobs.owner` is the token's `sub`, which a JWT does not
bound, so VARCHAR(255) becomes TEXT. Its index becomes a hash index on PostgreSQL, because a
btree entry may not exceed about 2.7 kB and every query on the owner is an equality; SQLite has
no such limit and keeps an ordinary index.

In place on both: PostgreSQL changes the type without rewriting the table (VARCHAR to TEXT is
binary compatible); SQLite copies the table (batch mode), its rows and the scenes kept.

Revision ID: 0004
Revises: 0003
"""

from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

STATUSES = "status IN ('queued', 'running', 'completed', 'failed', 'cancelled')"


def _jobs_0003(owner_type) -> sa.Table:
    """The 0003 shape, for SQLite's table copy (so the named CHECK constraints survive it)."""
    return sa.Table(
        "jobs",
        sa.MetaData(),
        sa.Column("generation_id", sa.String(64), primary_key=True),
        sa.Column("owner", owner_type, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.Integer, nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("storyboard", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("offline", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reference_key", sa.String(1024), nullable=True),
        sa.Column("lease_holder", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_token", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("traces_removed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(STATUSES, name="ck_jobs_status"),
        sa.CheckConstraint("progress >= 0 AND progress <= 100", name="ck_jobs_progress"),
    )


def _indexes() -> set[str]:
    return {index["name"] for index in sa.inspect(op.get_bind()).get_indexes("jobs")}


def _restore_indexes(owner_index: dict) -> None:
    """SQLite's table copy does not carry the indexes over: put back any that went missing."""
    present = _indexes()
    if "ix_jobs_owner" not in present:
        op.create_index("ix_jobs_owner", "jobs", ["owner"], **owner_index)
    for name, column in (("ix_jobs_status", "status"), ("ix_jobs_finished_at", "finished_at")):
        if name not in present:
            op.create_index(name, "jobs", [column])


def upgrade() -> None:
    if "ix_jobs_owner" in _indexes():
        op.drop_index("ix_jobs_owner", table_name="jobs")
    with op.batch_alter_table("jobs", copy_from=_jobs_0003(sa.String(255))) as batch:
        batch.alter_column("owner", type_=sa.Text(), existing_type=sa.String(255), existing_nullable=False)
    _restore_indexes({"postgresql_using": "hash"})


def downgrade() -> None:
    # Owners longer than 255 characters do not fit the old column: the downgrade fails on
    # PostgreSQL rather than cut them (a cut owner would hand the job to someone else).
    if "ix_jobs_owner" in _indexes():
        op.drop_index("ix_jobs_owner", table_name="jobs")
    with op.batch_alter_table("jobs", copy_from=_jobs_0003(sa.Text())) as batch:
        batch.alter_column("owner", type_=sa.String(255), existing_type=sa.Text(), existing_nullable=False)
    _restore_indexes({})
