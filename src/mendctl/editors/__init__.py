"""The algorithms: MEND (mend/), the FT baselines (ft.py), routed edits (route.py), deltas,
metrics and data. Nothing here imports the ledger or the CLI.

Every editor keeps one contract, `Editor`: a name, its checkpoint's info, and `edit`, which
turns edit requests into a `Delta` on the model as it is. The settings after `locality` are
MEND's (steps until the fact holds, the drift guard, the retention guard's protected pairs, the
preserved keys, the context its steps act in); an editor they do not apply to ignores them.
"""
from __future__ import annotations

from typing import Protocol

from .delta import Delta


class Editor(Protocol):
    name: str
    info: dict

    def edit(self, model, tokenizer, prompts: list[str], targets: list[str], fmt: str = "raw",
             locality: list[str] | None = None, max_steps: int = 1,
             max_norm: float | None = None, protect=None, preserve=None, apply=None) -> Delta: ...
