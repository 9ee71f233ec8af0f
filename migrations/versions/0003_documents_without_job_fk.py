"""documents: no per-row foreign key check at ingest; a trigger deletes a job's documents

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 21:40:00
"""
from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("fk_documents_job_id_jobs", "documents", type_="foreignkey")
    op.execute(
        """
        CREATE FUNCTION docqueue_delete_job_documents() RETURNS trigger AS $$
        BEGIN
          DELETE FROM documents WHERE job_id = OLD.id;
          RETURN OLD;
        END $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        "CREATE TRIGGER jobs_delete_documents AFTER DELETE ON jobs "
        "FOR EACH ROW EXECUTE FUNCTION docqueue_delete_job_documents()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER jobs_delete_documents ON jobs")
    op.execute("DROP FUNCTION docqueue_delete_job_documents()")
    op.create_foreign_key(
        "fk_documents_job_id_jobs", "documents", "jobs", ["job_id"], ["id"], ondelete="CASCADE"
    )
