"""the dispatcher: workers.slots, and indexes for waiting and released chunks

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # How many chunks a worker runs at once (its Celery slots): the dispatcher keeps that many
    # plus DOCQUEUE_DISPATCH_AHEAD released per model. Workers from before register as 1.
    op.add_column("workers", sa.Column("slots", sa.Integer(), server_default="1", nullable=False))
    # Chunks waiting in PostgreSQL (not yet released), in the order the dispatcher takes them.
    op.create_index(
        "ix_chunks_waiting",
        "chunks",
        ["job_id", "seq"],
        postgresql_where=sa.text("state = 'queued' AND enqueued_at IS NULL"),
        sqlite_where=sa.text("state = 'queued' AND enqueued_at IS NULL"),
    )
    # Released chunks no worker has claimed yet: what a model's queues hold.
    op.create_index(
        "ix_chunks_released",
        "chunks",
        ["job_id"],
        postgresql_where=sa.text("state = 'queued' AND enqueued_at IS NOT NULL"),
        sqlite_where=sa.text("state = 'queued' AND enqueued_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_chunks_released", table_name="chunks")
    op.drop_index("ix_chunks_waiting", table_name="chunks")
    op.drop_column("workers", "slots")
