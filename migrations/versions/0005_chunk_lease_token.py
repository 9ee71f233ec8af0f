"""chunks: lease_token, the fence every write under a lease must carry

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 21:40:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL for every existing chunk: a lease taken before the upgrade is not held by anyone
    # who can prove it, so its worker's next write is refused and the lease expires as usual.
    op.add_column("chunks", sa.Column("lease_token", sa.Uuid(), nullable=True))


def downgrade() -> None:
    op.drop_column("chunks", "lease_token")
