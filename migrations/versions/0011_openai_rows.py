"""OpenAI batch rows: jobs may be chat or completion jobs; results keep every choice

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD = "task IN ('generate', 'summarize', 'classify')"
_NEW = "task IN ('generate', 'summarize', 'classify', 'chat', 'completion')"


def upgrade() -> None:
    # A batch's rows each carry their own request (documents.extra["body"]): two more tasks.
    # Schedules keep the native three.
    op.drop_constraint(op.f("ck_jobs_task"), "jobs", type_="check")
    op.create_check_constraint(op.f("ck_jobs_task"), "jobs", _NEW)
    # n > 1 or logprobs: each choice, in the document's one result row.
    op.add_column("results", sa.Column("choices", postgresql.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("results", "choices")
    op.execute("DELETE FROM jobs WHERE task IN ('chat', 'completion')")
    op.drop_constraint(op.f("ck_jobs_task"), "jobs", type_="check")
    op.create_check_constraint(op.f("ck_jobs_task"), "jobs", _OLD)
