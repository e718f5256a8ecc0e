"""Leases: a job is claimed with a lease whose token doubles as a fencing token. A write that
carries a `Lease` lands only while the row still holds that token and holder, so a runner that
lost its lease (paused, partitioned, outlived its expiry) can no longer change the job."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, or_

from pipeline.jobs.tables import jobs_table


class LeaseLost(RuntimeError):
    """The job's lease now belongs to someone else (or was given up): stop, write nothing."""


@dataclass(frozen=True)
class Lease:
    generation_id: str
    holder: str
    token: int
    expires_at: datetime


def no_live_lease(now: datetime):
    c = jobs_table.c
    return or_(c.lease_holder.is_(None), c.lease_expires_at.is_(None), c.lease_expires_at < now)


def fenced(lease: Lease):
    """The row still belongs to this lease: same token, holder not released."""
    c = jobs_table.c
    return and_(
        c.generation_id == lease.generation_id, c.lease_token == lease.token, c.lease_holder == lease.holder
    )
