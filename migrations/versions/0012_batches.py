"""batches: an OpenAI batch's view of its job (status, timestamps, files, errors)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 07:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
_OPEN = "status IN ('validating', 'in_progress', 'finalizing', 'cancelling')"


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "batches",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("input_file_id", sa.Uuid(), nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("completion_window", sa.String(length=16), nullable=False),
        sa.Column("model", sa.String(length=500), nullable=True),
        sa.Column("metadata", postgresql.JSONB(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("errors", postgresql.JSONB(), nullable=True),
        sa.Column("output_file_id", sa.Uuid(), nullable=True),
        sa.Column("error_file_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", ts, server_default=sa.func.now(), nullable=False),
        sa.Column("expires_at", ts, nullable=False),
        sa.Column("in_progress_at", ts, nullable=True),
        sa.Column("finalizing_at", ts, nullable=True),
        sa.Column("completed_at", ts, nullable=True),
        sa.Column("failed_at", ts, nullable=True),
        sa.Column("expired_at", ts, nullable=True),
        sa.Column("cancelling_at", ts, nullable=True),
        sa.Column("cancelled_at", ts, nullable=True),
        sa.CheckConstraint(f"status IN {_STATUSES!r}", name=op.f("ck_batches_status")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_batches_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_batches_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
        sa.UniqueConstraint("job_id", name=op.f("uq_batches_job_id")),
    )
    op.create_index("ix_batches_tenant_created", "batches", ["tenant_id", "created_at", "id"])
    op.create_index(
        "ix_batches_open", "batches", ["status"], postgresql_where=sa.text(_OPEN)
    )


def downgrade() -> None:
    op.drop_index("ix_batches_open", table_name="batches")
    op.drop_index("ix_batches_tenant_created", table_name="batches")
    op.drop_table("batches")
