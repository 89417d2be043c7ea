"""chains: several workspaces share one ledger, each with its own chain

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

Adds `chain` (NOT NULL, server default 'main') to `entries` and to `workspace_meta`, whose
primary key becomes (chain, key). Existing rows land in chain 'main', the chain a workspace
uses when mendctl.yaml names none, so an existing ledger upgrades in place and reads as before.
`ix_entries_chain` is on (chain, id): a chain's entries in id order, and its head.

Runs on SQLite and PostgreSQL alike: batch operations rebuild the table where SQLite cannot
ALTER in place (the primary key change, dropping columns) and are plain ALTER TABLEs elsewhere.
`entries` keeps SQLite's AUTOINCREMENT when a downgrade rebuilds it (`table_kwargs`).

Downgrading cannot fold several chains into the one history 0001 has: it refuses while any
row belongs to another chain than 'main', and changes nothing.

Frozen history: plain SQLAlchemy types and literal names, never the ORM's classes.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

CHAIN_LEN = 128
DEFAULT_CHAIN = "main"


def _chain_column() -> sa.Column:
    return sa.Column("chain", sa.String(length=CHAIN_LEN), nullable=False,
                     server_default=DEFAULT_CHAIN)


def upgrade() -> None:
    with op.batch_alter_table("entries", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.add_column(_chain_column())
        batch.create_index(batch.f("ix_entries_chain"), ["chain", "id"], unique=False)

    with op.batch_alter_table("workspace_meta") as batch:
        batch.add_column(_chain_column())
        batch.drop_constraint("pk_workspace_meta", type_="primary")
        batch.create_primary_key("pk_workspace_meta", ["chain", "key"])


def downgrade() -> None:
    conn = op.get_bind()
    others = []
    for table in ("entries", "workspace_meta"):
        rows = conn.execute(sa.text(f"SELECT DISTINCT chain FROM {table} WHERE chain <> :main"),
                            {"main": DEFAULT_CHAIN}).scalars().all()
        others += [f"{table}: {', '.join(sorted(rows))}"] if rows else []
    if others:
        from mendctl.errors import LedgerError

        raise LedgerError("cannot downgrade the ledger below schema 0002: it holds chains "
                          f"other than {DEFAULT_CHAIN!r} ({'; '.join(others)}), and schema 0001 "
                          "has a single history; nothing was changed")

    with op.batch_alter_table("workspace_meta") as batch:
        batch.drop_constraint("pk_workspace_meta", type_="primary")
        batch.create_primary_key("pk_workspace_meta", ["key"])
        batch.drop_column("chain")

    with op.batch_alter_table("entries", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_index(batch.f("ix_entries_chain"))
        batch.drop_column("chain")
