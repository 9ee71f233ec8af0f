"""workers registry

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 20:32:58.413395
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('workers',
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('model', sa.String(length=500), nullable=False),
    sa.Column('queue', sa.String(length=200), nullable=False),
    sa.Column('device', sa.String(length=100), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_heartbeat_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('engine_ready', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_workers'))
    )
    op.create_index('ix_workers_model_heartbeat', 'workers', ['model', 'last_heartbeat_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_workers_model_heartbeat', table_name='workers')
    op.drop_table('workers')
