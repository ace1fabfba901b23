"""Initial schema: studies, points, the lease log, intermediate values, checkpoints, tokens.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the column widths in models.py as of this revision.
NAME = 255
STATE = 16
REQUEST_ID = 128
DIGEST = 64
OPEN_LEASE = "ended_at IS NULL"


def _times(*names: str, nullable: bool = False) -> list[sa.Column]:
    return [sa.Column(name, sa.Float(), nullable=nullable) for name in names]


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("owner", sa.String(NAME), nullable=False),
        sa.Column("name", sa.String(NAME), nullable=True),
        sa.Column("task_json", sa.Text(), nullable=False),
        sa.Column("state", sa.String(STATE), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("max_points", sa.Integer(), nullable=False),
        sa.Column("max_evaluation_jobs", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("lease_seconds", sa.Float(), nullable=False),
        sa.Column("direction", sa.String(STATE), nullable=False),
        sa.Column("failed_loss", sa.Float(), nullable=True),
        sa.Column("n_points", sa.Integer(), nullable=False),
        sa.Column("evaluation_jobs", sa.Integer(), nullable=False),
        *_times("steering_started_at", nullable=True),
        sa.Column("steering_error", sa.Text(), nullable=True),
        *_times("created_at", "updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_studies"),
    )
    op.create_index("ix_studies_owner", "studies", ["owner"])
    op.create_index("ix_studies_state", "studies", ["state"])

    op.create_table(
        "points",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("params_json", sa.Text(), nullable=False),
        sa.Column("origin", sa.String(NAME), nullable=False),
        sa.Column("state", sa.String(STATE), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("worker_id", sa.String(NAME), nullable=True),
        sa.Column("lease_token", sa.String(DIGEST), nullable=True),
        sa.Column("lease_expires_at", sa.Float(), nullable=True),
        sa.Column("finish_request_id", sa.String(REQUEST_ID), nullable=True),
        *_times("created_at", "updated_at"),
        *_times("finished_at", nullable=True),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name="fk_points_study_id_studies", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_points"),
        sa.UniqueConstraint("finish_request_id", name="uq_points_finish_request_id"),
        sa.UniqueConstraint("study_id", "number", name="uq_points_study_id_number"),
    )
    op.create_index("ix_points_study_id_state_number", "points", ["study_id", "state", "number"])
    op.create_index("ix_points_state_lease_expires_at", "points", ["state", "lease_expires_at"])

    op.create_table(
        "leases",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("point_id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(NAME), nullable=False),
        sa.Column("lease_token", sa.String(DIGEST), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        *_times("started_at", "expires_at"),
        *_times("ended_at", nullable=True),
        sa.Column("outcome", sa.String(STATE), nullable=True),
        sa.ForeignKeyConstraint(["point_id"], ["points.id"], name="fk_leases_point_id_points", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name="fk_leases_study_id_studies", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_leases"),
        sa.UniqueConstraint("lease_token", name="uq_leases_lease_token"),
    )
    op.create_index("ix_leases_point_id", "leases", ["point_id"])
    op.create_index("ix_leases_study_id", "leases", ["study_id"])
    op.create_index("uq_leases_open_point_id", "leases", ["point_id"], unique=True,
                    sqlite_where=sa.text(OPEN_LEASE), postgresql_where=sa.text(OPEN_LEASE))

    op.create_table(
        "intermediate_values",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("point_id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        *_times("updated_at"),
        sa.ForeignKeyConstraint(["point_id"], ["points.id"], name="fk_intermediate_values_point_id_points",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name="fk_intermediate_values_study_id_studies",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_intermediate_values"),
        sa.UniqueConstraint("point_id", "step", name="uq_intermediate_values_point_id_step"),
    )
    op.create_index("ix_intermediate_values_study_id", "intermediate_values", ["study_id"])

    op.create_table(
        "checkpoints",
        sa.Column("point_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(DIGEST), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        *_times("updated_at"),
        sa.ForeignKeyConstraint(["point_id"], ["points.id"], name="fk_checkpoints_point_id_points", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("point_id", name="pk_checkpoints"),
    )

    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("token_hash", sa.String(DIGEST), nullable=False),
        sa.Column("user", sa.String(NAME), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=True),
        *_times("created_at"),
        *_times("expires_at", nullable=True),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name="fk_tokens_study_id_studies", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_tokens_token_hash"),
    )
    op.create_index("ix_tokens_user", "tokens", ["user"])
    op.create_index("ix_tokens_study_id", "tokens", ["study_id"])


def downgrade() -> None:
    for table in ("tokens", "checkpoints", "intermediate_values", "leases", "points", "studies"):
        op.drop_table(table)
