"""workers.capabilities: what a worker's engine says its model can do

A transformers worker serving a sequence classifier says so (its one task, classify, and its
fixed labels), and the API checks jobs against it; NULL is a worker that says nothing (vLLM's,
and every worker from before), whose model serves every task.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 11:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "workers", sa.Column("capabilities", postgresql.JSONB(), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("workers", "capabilities")
