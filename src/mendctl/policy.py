"""The edit policy: every setting that decides how one edit is made, resolved in one place.

An edit's settings come from three sources: mendctl.yaml, the command line (`--editor`,
`--max-steps`, `--keep-failed`) and the editor checkpoint's own operating point (its calibrated
α and step budget, its median single-edit size for the drift guard). `resolve` combines them
once into a frozen `EditPolicy`; `mendctl edit`, `mendctl eval`, replays and the benchmarks all
take their settings from it, and every entry records it (`notes.policy`), so that a replay
re-makes an edit with the settings it was made with even after the configuration changed.
(Ledgers made before policies were recorded were migrated: migration 0003.)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .config import Config
from .errors import InputError

#: The editors `mendctl edit --editor` offers: MEND, the FT and FT+KL baselines, and MEND's
#: networks replaced by the identity (the raw gradient as the update; a baseline).
EDITORS = ("mend", "ft", "ft_kl", "identity")

#: MEND steps per edit for an editor without an operating point when `max_steps: null`: an
#: uncalibrated editor keeps its as-trained α, which seldom needs more than a few steps.
UNCALIBRATED_MAX_STEPS = 3


@dataclass(frozen=True)
class EditPolicy:
    """How one edit request is made (for MEND; the baselines use `editor` and `keep_failed`).

    - `max_steps`: MEND steps until the fact holds (the steps stop as soon as every target token
      is the argmax);
    - `step_factor`: each step's α as a multiple of the loaded checkpoint's α (None: another
      editor);
    - `max_norm`: the drift guard's limit on one step's total ‖ΔW‖_F (None: off), already sized
      for this request's facts (see `resolve`);
    - `protect`: the retention guard (the update is kept off the active edits' keys);
    - `preserve_keys`: the preserved-keys cut (None: off);
    - `routing`: the routed-edit settings (None: a plain weight edit);
    - `keep_failed`: record an edit even if a target is not the model's answer afterwards.
    """

    editor: str = "mend"
    max_steps: int = 1
    step_factor: float | None = None
    max_norm: float | None = None
    protect: bool = False
    preserve_keys: float | None = None
    routing: dict | None = None
    keep_failed: bool = False

    @property
    def routed(self) -> bool:
        return self.routing is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve(config: Config, editor_info: dict | None, editor: str = "mend", n_facts: int = 1,
            max_steps: int | None = None, keep_failed: bool | None = None) -> EditPolicy:
    """The policy of an edit of `n_facts` facts by `editor` (`editor_info`: the MEND
    checkpoint's editor.json, whose `operating_point` and `delta_norm_reference` it reads; None
    for the baselines).

    Every default is decided here:

    - steps: `--max-steps`, else routing's `max_steps` (routed), else mendctl.yaml's
      `max_steps`, else the operating point's, else UNCALIBRATED_MAX_STEPS;
    - step size: routed, routing's `alpha` × the editor's as-trained α (the operating point's
      scale, chosen for plain edits' locality, is undone: the gate keeps a routed edit off
      other inputs); plain, mendctl.yaml's `step_factor` × the operating point's α;
    - drift guard: `guard_norm` × the editor's median single edit, × √n for a plain batch of n
      facts (the size of a sum of n independent edits); a routed fact steps alone;
    - the retention guard and preserved keys apply to plain MEND edits only: a routed edit's
      gate already keeps it off the other edits' prompts and off ordinary text;
    - the identity baseline (MEND's networks untrained) takes the guards, not the step size;
      FT and FT+KL take none of these."""
    if editor not in EDITORS:
        raise InputError(f"unknown editor {editor!r}; choose one of {', '.join(EDITORS)}")
    if max_steps is not None and max_steps < 1:
        raise InputError("--max-steps must be ≥ 1")
    keep_failed = config.keep_failed if keep_failed is None else bool(keep_failed)
    mend = editor == "mend"
    # routing applies MEND's low-rank deltas; the baselines edit the weights (`mendctl edit`
    # refuses them in a routed workspace; `mendctl eval` compares them as plain edits)
    routing = config.routing if mend else None
    if editor in ("ft", "ft_kl"):  # fine-tuning takes none of MEND's settings
        return EditPolicy(editor=editor, max_steps=max_steps or 1, keep_failed=keep_failed)
    info = editor_info or {}
    ref = info.get("delta_norm_reference")
    if not mend:  # the identity baseline: MEND's guards, the raw gradient's own step
        return EditPolicy(editor=editor, max_steps=max_steps or UNCALIBRATED_MAX_STEPS,
                          max_norm=_guard(config, ref, n_facts), protect=config.protect_edits,
                          preserve_keys=config.preserve_keys, keep_failed=keep_failed)
    op = info.get("operating_point") or {}
    if max_steps is None:
        if routing:
            max_steps = int(routing["max_steps"])
        elif config.max_steps is not None:
            max_steps = int(config.max_steps)
        else:
            max_steps = int(op.get("max_steps") or UNCALIBRATED_MAX_STEPS)
    if routing:
        step_factor = float(routing["alpha"]) / float(op.get("alpha_factor_total") or 1.0)
    else:
        step_factor = float(config.step_factor)
    return EditPolicy(editor="mend", max_steps=max_steps, step_factor=step_factor,
                      max_norm=_guard(config, ref, 1 if routing else n_facts), protect=bool(config.protect_edits and not routing),
                      preserve_keys=None if routing else config.preserve_keys,
                      routing=dict(routing) if routing else None, keep_failed=keep_failed)


def _guard(config: Config, ref: dict | None, n_facts: int) -> float | None:
    if config.guard_norm is None or not ref:
        return None
    return config.guard_norm * float(ref["median"]) * math.sqrt(max(n_facts, 1))
