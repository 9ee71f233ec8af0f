"""collections, collection documents, schedules; jobs: collection and results expiry

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 10:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "collections",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_collections_tenant_id_tenants"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_collections")),
        sa.UniqueConstraint("tenant_id", "name", name="uq_collections_tenant_name"),
    )
    op.create_table(
        "collection_documents",
        sa.Column("collection_id", sa.Uuid(), nullable=False),
        sa.Column("external_id", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("extra", JSON_DOC, nullable=True),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.Column("summary_model", sa.String(length=500), nullable=True),
        sa.Column("summarized_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("summary_hash", sa.String(length=64), nullable=True),
        sa.Column("summary_job_id", sa.Uuid(), nullable=True),
        sa.ForeignKeyConstraint(["collection_id"], ["collections.id"], name=op.f("fk_collection_documents_collection_id_collections"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("collection_id", "external_id", name=op.f("pk_collection_documents")),
    )
    op.create_table(
        "schedules",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("collection_id", sa.Uuid(), nullable=False),
        sa.Column("task", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=500), nullable=False),
        sa.Column("params", JSON_DOC, nullable=False),
        sa.Column("priority", sa.Integer(), server_default="-10", nullable=False),
        sa.Column("cron", sa.String(length=200), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_job_id", sa.Uuid(), nullable=True),
        sa.Column("last_run_outcome", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("task IN ('generate', 'summarize', 'classify')", name=op.f("ck_schedules_task")),
        sa.ForeignKeyConstraint(["collection_id"], ["collections.id"], name=op.f("fk_schedules_collection_id_collections"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["last_job_id"], ["jobs.id"], name=op.f("fk_schedules_last_job_id_jobs"), ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_schedules_tenant_id_tenants"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedules")),
        sa.UniqueConstraint("collection_id", name="uq_schedules_collection"),
    )
    op.create_index("ix_schedules_due", "schedules", ["enabled", "next_run_at"], unique=False)
    op.create_index("ix_schedules_tenant", "schedules", ["tenant_id"], unique=False)
    op.add_column("jobs", sa.Column("collection_id", sa.Uuid(), nullable=True))
    op.add_column("jobs", sa.Column("results_expired_at", sa.DateTime(timezone=True), nullable=True))
    op.create_foreign_key(
        op.f("fk_jobs_collection_id_collections"), "jobs", "collections",
        ["collection_id"], ["id"], ondelete="SET NULL",
    )
    op.create_index(
        "ix_jobs_collection", "jobs", ["collection_id"], unique=False,
        postgresql_where=sa.text("collection_id IS NOT NULL"),
        sqlite_where=sa.text("collection_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_collection", table_name="jobs")
    op.drop_constraint(op.f("fk_jobs_collection_id_collections"), "jobs", type_="foreignkey")
    op.drop_column("jobs", "results_expired_at")
    op.drop_column("jobs", "collection_id")
    op.drop_index("ix_schedules_tenant", table_name="schedules")
    op.drop_index("ix_schedules_due", table_name="schedules")
    op.drop_table("schedules")
    op.drop_table("collection_documents")
    op.drop_table("collections")
