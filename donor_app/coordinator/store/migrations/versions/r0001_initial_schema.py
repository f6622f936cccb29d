"""Initial schema: tokens, donors, workloads, workload events, images, idle history.

Revision ID: r0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "r0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tokens",
        sa.Column("token_id", sa.String(64), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("uses_left", sa.Integer(), nullable=False),
        sa.Column("note", sa.Text(), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("token_id", name="pk_tokens"),
    )
    op.create_table(
        "donors",
        sa.Column("donor_id", sa.String(64), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("cert_sha256", sa.String(64), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("drained", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("revoked", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("lost", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("cap_cores", sa.Integer(), nullable=True),
        sa.Column("cap_memory_mib", sa.BigInteger(), nullable=True),
        sa.Column("cap_arch", sa.String(32), nullable=True),
        sa.Column("cap_lend_cpu_percent", sa.Float(), nullable=True),
        sa.Column("cap_lend_memory_mib", sa.BigInteger(), nullable=True),
        sa.Column("cap_lend_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cap_idle", sa.Boolean(), nullable=True),
        sa.PrimaryKeyConstraint("donor_id", name="pk_donors"),
    )
    op.create_table(
        "workloads",
        sa.Column("workload_id", sa.String(64), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("donor_id", sa.String(64), nullable=True),
        sa.Column("epoch", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("detail", sa.Text(), server_default="", nullable=False),
        sa.ForeignKeyConstraint(
            ["donor_id"], ["donors.donor_id"], name="fk_workloads_donor_id_donors"
        ),
        sa.PrimaryKeyConstraint("workload_id", name="pk_workloads"),
    )
    op.create_index("ix_workloads_order", "workloads", ["priority", "created_at"])
    op.create_index("ix_workloads_state_lease", "workloads", ["state", "lease_until"])
    op.create_index("ix_workloads_donor", "workloads", ["donor_id"])
    op.create_table(
        "workload_events",
        sa.Column(
            "event_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("workload_id", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("donor_id", sa.String(64), nullable=True),
        sa.Column("epoch", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("detail", sa.Text(), server_default="", nullable=False),
        sa.ForeignKeyConstraint(
            ["workload_id"],
            ["workloads.workload_id"],
            name="fk_workload_events_workload_id_workloads",
        ),
        sa.PrimaryKeyConstraint("event_id", name="pk_workload_events"),
    )
    op.create_index(
        "ix_workload_events_workload", "workload_events", ["workload_id", "at", "event_id"]
    )
    op.create_table(
        "images",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name="pk_images"),
    )
    op.create_table(
        "idle_history",
        sa.Column("donor_id", sa.String(64), nullable=False),
        sa.Column("hour_of_week", sa.Integer(), nullable=False),
        sa.Column("seen_seconds", sa.Float(), nullable=False),
        sa.Column("idle_seconds", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("donor_id", "hour_of_week", name="pk_idle_history"),
    )


def downgrade() -> None:
    op.drop_table("idle_history")
    op.drop_table("images")
    op.drop_index("ix_workload_events_workload", table_name="workload_events")
    op.drop_table("workload_events")
    op.drop_index("ix_workloads_donor", table_name="workloads")
    op.drop_index("ix_workloads_state_lease", table_name="workloads")
    op.drop_index("ix_workloads_order", table_name="workloads")
    op.drop_table("workloads")
    op.drop_table("donors")
    op.drop_table("tokens")
