"""The typed record of how an entry was made, beyond the ledger's columns (`entries.notes`).

The columns hold what every entry has: the request, the editor's identity, the delta's
identity, the metrics before and after, the state. `EntryNotes` holds the rest, one field per
fact, each for the kinds of entry it applies to:

- edits and replays: the `policy` they were made with (policy.py; what a replay re-reads), the
  editor checkpoint and prompt format, the steps taken, the drift guard's scale, the retention
  guard's size, the chain's `health` after the edit, the `routing` settings and gate of a
  routed edit, and a routed batch's `batch` link (index, size, first entry, the batch's seconds);
- replays: the entry replayed (`replay_of`), and the entry reverted or the editor replayed with;
- reverts: `mode` (exact or replay) and the `gap` between the two;
- squashes: the entries `squashed`, the `rank` kept and the reconstruction errors.

Stored as JSON with a `schema` version: writers build an `EntryNotes`, readers get one from
`Entry.record`; nothing reads notes by string key. Migration 0003 rewrote the notes of ledgers
made before (the policy's settings then lay in separate keys); keys this version does not know
(a newer mendctl's) are kept in `extra` and written back unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .policy import EditPolicy

NOTES_SCHEMA = 2


@dataclass(frozen=True)
class EntryNotes:
    policy: EditPolicy | None = None
    editor_checkpoint: str | None = None
    prompt_format: str | None = None
    edit_steps: int | None = None
    norm_scale: float | None = None
    protected_pairs: int | None = None
    protected_rank: int | None = None
    health: dict | None = None
    routing: dict | None = None
    batch: dict | None = None
    replay_of: int | None = None
    reverted: int | None = None
    editor: str | None = None
    mode: str | None = None
    gap: dict | None = None
    squashed: list[int] | None = None
    rank: int | None = None
    reconstruction_error: dict | None = None
    max_reconstruction_error: float | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON the ledger stores: the schema version and every field that is set."""
        out: dict[str, Any] = {"schema": NOTES_SCHEMA}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "extra" or v is None:
                continue
            out[f.name] = v.to_dict() if isinstance(v, EditPolicy) else v
        return {**self.extra, **out}

    @classmethod
    def from_json(cls, data: dict | None) -> "EntryNotes":
        data = dict(data or {})
        data.pop("schema", None)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: data.pop(k) for k in list(data) if k in names}
        if isinstance(known.get("policy"), dict):
            fields = {f.name for f in dataclasses.fields(EditPolicy)}
            known["policy"] = EditPolicy(**{k: v for k, v in known["policy"].items() if k in fields})
        return cls(**known, extra=data)
