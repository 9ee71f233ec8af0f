"""quotas, usage and admin keys: tenants' own quotas, api_keys.admin, the usage_daily ledger

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A tenant's own quotas (NULL: the defaults in settings.quotas).
    op.add_column("tenants", sa.Column("quota_running_jobs", sa.Integer(), nullable=True))
    op.add_column("tenants", sa.Column("quota_queued_rows", sa.BigInteger(), nullable=True))
    op.add_column(
        "tenants", sa.Column("quota_upload_bytes_per_day", sa.BigInteger(), nullable=True)
    )
    op.add_column(
        "tenants", sa.Column("quota_output_tokens_per_day", sa.BigInteger(), nullable=True)
    )
    # Keys from before are tenant keys.
    op.add_column(
        "api_keys", sa.Column("admin", sa.Boolean(), server_default=sa.false(), nullable=False)
    )
    op.create_table(
        "usage_daily",
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("model", sa.String(length=500), nullable=False),
        sa.Column("documents", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("failed", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("upload_bytes", sa.BigInteger(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_usage_daily_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "day", "job_id", name=op.f("pk_usage_daily")),
    )
    op.create_index("ix_usage_daily_day", "usage_daily", ["day"])
    # Usage from before this revision, as well as it can be told: results by the day they
    # were written; a job whose results retention purged, from its counters on the day it
    # finished. Upload bytes were not counted then.
    op.execute(
        """
        INSERT INTO usage_daily (tenant_id, day, job_id, model, documents, failed,
                                 prompt_tokens, completion_tokens)
        SELECT j.tenant_id, (r.created_at AT TIME ZONE 'UTC')::date, j.id, j.model, count(*),
               count(*) FILTER (WHERE r.error IS NOT NULL),
               coalesce(sum(r.prompt_tokens), 0), coalesce(sum(r.completion_tokens), 0)
        FROM results r JOIN jobs j ON j.id = r.job_id
        WHERE j.results_expired_at IS NULL
        GROUP BY 1, 2, 3, 4
        UNION ALL
        SELECT tenant_id, (coalesce(finished_at, created_at) AT TIME ZONE 'UTC')::date, id,
               model, succeeded + failed, failed, prompt_tokens, completion_tokens
        FROM jobs
        WHERE results_expired_at IS NOT NULL AND succeeded + failed > 0
        """
    )


def downgrade() -> None:
    op.drop_index("ix_usage_daily_day", table_name="usage_daily")
    op.drop_table("usage_daily")
    op.drop_column("api_keys", "admin")
    op.drop_column("tenants", "quota_output_tokens_per_day")
    op.drop_column("tenants", "quota_upload_bytes_per_day")
    op.drop_column("tenants", "quota_queued_rows")
    op.drop_column("tenants", "quota_running_jobs")
