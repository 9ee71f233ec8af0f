"""jobs: request_sha256, the fingerprint an Idempotency-Key replay is compared with

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 01:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL for every existing job (and for scheduled runs, whose keys clients cannot use): a
    # replay of a job made before the upgrade cannot be compared, so it returns that job.
    op.add_column("jobs", sa.Column("request_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "request_sha256")
