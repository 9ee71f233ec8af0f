"""jobs: deleted_at (a deleted job's tombstone) and retry_of (a retry's original job)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Both NULL for every existing job: none was deleted or made by a retry.
    op.add_column("jobs", sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("jobs", sa.Column("retry_of", sa.Uuid(), nullable=True))
    op.create_foreign_key(
        op.f("fk_jobs_retry_of_jobs"), "jobs", "jobs", ["retry_of"], ["id"], ondelete="SET NULL"
    )
    # Partial: only retries hold a value, so the index costs nothing for other jobs.
    op.create_index(
        "ix_jobs_retry_of",
        "jobs",
        ["retry_of"],
        unique=False,
        postgresql_where=sa.text("retry_of IS NOT NULL"),
        sqlite_where=sa.text("retry_of IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_retry_of", table_name="jobs")
    op.drop_constraint(op.f("fk_jobs_retry_of_jobs"), "jobs", type_="foreignkey")
    op.drop_column("jobs", "retry_of")
    op.drop_column("jobs", "deleted_at")
