"""typed notes: each entry's edit policy in one record, with a schema version

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06

Data only, no change of schema. Until now an edit's or replay's settings lay in separate keys of
`entries.notes` (max_steps, max_norm, protect, step_factor, preserve_keys; the oldest entries
have none of them: one step at the editor's own α, no guards). They become one `policy` record
(mendctl/policy.py's EditPolicy), and every row's notes get `"schema": 2` (mendctl/record.py).
A replay reads the policy; the values are the ones the entry was made with, so a replay
re-makes the same delta as before the upgrade.

Downgrading writes the separate keys back (a policy's `editor`, `routing` and `keep_failed`
were never recorded that way and are dropped) and removes `schema`.

Frozen history: plain SQLAlchemy types and literal names, never the ORM's classes or
mendctl's own modules.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

SCHEMA = 2
EDITORS = ("mend", "ft", "ft_kl", "identity")
LEGACY = ("max_steps", "max_norm", "protect", "step_factor", "preserve_keys")
GATE_KEYS = ("gate_words", "gate_keys", "gate_sha256")

entries = sa.table("entries", sa.column("id", sa.Integer), sa.column("kind", sa.String),
                   sa.column("editor_name", sa.String),
                   sa.column("notes", sa.JSON(none_as_null=True)))


def _policy(notes: dict, editor_name) -> dict:
    """The policy an entry made before 0003 was made with, from its separate keys."""
    mend = editor_name == "mend"
    routing = notes.get("routing")
    return {"editor": editor_name if editor_name in EDITORS else "mend",
            "max_steps": int(notes.get("max_steps") or 1),
            "step_factor": (notes.get("step_factor") or 1.0) if mend else None,
            "max_norm": notes.get("max_norm"), "protect": bool(notes.get("protect")),
            "preserve_keys": notes.get("preserve_keys") if mend else None,
            "routing": {k: v for k, v in routing.items() if k not in GATE_KEYS}
            if isinstance(routing, dict) else None,
            "keep_failed": False}


def _rows(conn):
    return conn.execute(sa.select(entries.c.id, entries.c.kind, entries.c.editor_name,
                                  entries.c.notes)).all()


def upgrade() -> None:
    conn = op.get_bind()
    for id_, kind, editor_name, notes in _rows(conn):
        if isinstance(notes, dict) and "schema" in notes:
            continue
        new = dict(notes or {})
        if kind in ("edit", "replay") and "policy" not in new:
            new["policy"] = _policy(new, editor_name)
        for k in LEGACY if kind in ("edit", "replay") else ():
            new.pop(k, None)
        new["schema"] = SCHEMA
        conn.execute(entries.update().where(entries.c.id == id_).values(notes=new))


def downgrade() -> None:
    conn = op.get_bind()
    for id_, kind, _, notes in _rows(conn):
        if not isinstance(notes, dict) or "schema" not in notes:
            continue
        old = {k: v for k, v in notes.items() if k != "schema"}
        policy = old.pop("policy", None)
        if isinstance(policy, dict):
            old.update({k: policy.get(k) for k in LEGACY})
        conn.execute(entries.update().where(entries.c.id == id_).values(notes=old))
