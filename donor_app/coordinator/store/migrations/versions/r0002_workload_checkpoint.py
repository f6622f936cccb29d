"""Workloads remember their latest checkpoint (five nullable checkpoint_* columns).

Revision ID: r0002
Revises: r0001
Create Date: 2025-06-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "r0002"
down_revision: str | Sequence[str] | None = "r0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Nullable columns, so existing workloads get NULL: "no checkpoint".
_COLUMNS = (
    ("checkpoint_sha256", sa.String(64)),
    ("checkpoint_size", sa.BigInteger()),
    ("checkpoint_epoch", sa.BigInteger()),
    ("checkpoint_at", sa.DateTime(timezone=True)),
    ("checkpoint_donor_id", sa.String(64)),
)


def upgrade() -> None:
    # Batch mode: SQLite rebuilds the table (PostgreSQL runs plain ALTER TABLE).
    with op.batch_alter_table("workloads") as batch:
        for name, type_ in _COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workloads") as batch:
        for name, _type in reversed(_COLUMNS):
            batch.drop_column(name)
