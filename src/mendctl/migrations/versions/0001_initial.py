"""initial schema: entries, workspace_meta, audits

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Migrations are frozen history: they use plain SQLAlchemy types, never the ORM's classes
(mendctl.ledger stores `created_at` through a UTC TypeDecorator whose column is a DATETIME).
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "entries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("user", sa.String(length=255), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("command", sa.Text(), nullable=True),
        sa.Column("inputs", sa.JSON(), nullable=False),
        sa.Column("targets", sa.JSON(), nullable=False),
        sa.Column("request", sa.JSON(), nullable=True),
        sa.Column("editor_name", sa.String(length=255), nullable=True),
        sa.Column("editor_sha256", sa.String(length=64), nullable=True),
        sa.Column("base_model_id", sa.Text(), nullable=True),
        sa.Column("base_model_hash", sa.String(length=64), nullable=True),
        sa.Column("weight_names", sa.JSON(), nullable=False),
        sa.Column("delta_sha256", sa.String(length=64), nullable=True),
        sa.Column("delta_path", sa.Text(), nullable=True),
        sa.Column("delta_size", sa.Integer(), nullable=True),
        sa.Column("delta_norms", sa.JSON(), nullable=True),
        sa.Column("metrics_before", sa.JSON(), nullable=True),
        sa.Column("metrics_after", sa.JSON(), nullable=True),
        sa.Column("state_hash", sa.String(length=64), nullable=False),
        sa.Column("active_ids", sa.JSON(), nullable=False),
        sa.Column("reverts_id", sa.Integer(), nullable=True),
        sa.Column("replay_of_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("notes", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["parent_id"], ["entries.id"],
                                name=op.f("fk_entries_parent_id_entries")),
        sa.ForeignKeyConstraint(["reverts_id"], ["entries.id"],
                                name=op.f("fk_entries_reverts_id_entries")),
        sa.ForeignKeyConstraint(["replay_of_id"], ["entries.id"],
                                name=op.f("fk_entries_replay_of_id_entries")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_entries")),
        sqlite_autoincrement=True,
    )
    for col in ("parent_id", "kind", "created_at", "delta_sha256", "state_hash",
                "reverts_id", "replay_of_id"):
        op.create_index(op.f(f"ix_entries_{col}"), "entries", [col], unique=False)

    op.create_table(
        "workspace_meta",
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_workspace_meta")),
    )

    op.create_table(
        "audits",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("entry_id", sa.Integer(), nullable=True),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.Column("report_path", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["entry_id"], ["entries.id"],
                                name=op.f("fk_audits_entry_id_entries")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audits")),
    )
    op.create_index(op.f("ix_audits_created_at"), "audits", ["created_at"], unique=False)
    op.create_index(op.f("ix_audits_entry_id"), "audits", ["entry_id"], unique=False)


def downgrade() -> None:
    # audits references entries: drop it first.
    op.drop_table("audits")
    op.drop_table("workspace_meta")
    op.drop_table("entries")
