"""Leases, cancellation, the persisted user image and retention (many replicas, one job store).

Adds reference_key, lease_holder / lease_expires_at / lease_token (fencing), cancel_requested
and finished_at, and allows the status `cancelled`. Jobs that had already finished get
finished_at = updated_at, so retention can expire them too.

Revision ID: 0002
Revises: 0001
"""

from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

OLD_STATUSES = "status IN ('queued', 'running', 'completed', 'failed')"
NEW_STATUSES = "status IN ('queued', 'running', 'completed', 'failed', 'cancelled')"


def _jobs_0001() -> sa.Table:
    """The 0001 shape, for SQLite's table copy (its named CHECK constraints are not reflected)."""
    return sa.Table(
        "jobs",
        sa.MetaData(),
        sa.Column("generation_id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(255), nullable=False, index=True),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("progress", sa.Integer, nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("storyboard", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("offline", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(OLD_STATUSES, name="ck_jobs_status"),
        sa.CheckConstraint("progress >= 0 AND progress <= 100", name="ck_jobs_progress"),
    )


def upgrade() -> None:
    with op.batch_alter_table("jobs", copy_from=_jobs_0001()) as batch:
        batch.add_column(sa.Column("reference_key", sa.String(1024), nullable=True))
        batch.add_column(sa.Column("lease_holder", sa.String(255), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("lease_token", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
        batch.drop_constraint("ck_jobs_status", type_="check")
        batch.create_check_constraint("ck_jobs_status", NEW_STATUSES)
        batch.create_index("ix_jobs_finished_at", ["finished_at"])
    # SQLite's table copy does not carry the old indexes over: put back any that went missing.
    present = {index["name"] for index in sa.inspect(op.get_bind()).get_indexes("jobs")}
    for name, column in (("ix_jobs_owner", "owner"), ("ix_jobs_status", "status")):
        if name not in present:
            op.create_index(name, "jobs", [column])
    op.execute("UPDATE jobs SET finished_at = updated_at WHERE status IN ('completed', 'failed')")


def downgrade() -> None:
    op.execute("UPDATE jobs SET status = 'failed' WHERE status = 'cancelled'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_finished_at")
        batch.drop_constraint("ck_jobs_status", type_="check")
        batch.create_check_constraint("ck_jobs_status", OLD_STATUSES)
        for name in ("finished_at", "cancel_requested", "lease_token", "lease_expires_at", "lease_holder", "reference_key"):
            batch.drop_column(name)
