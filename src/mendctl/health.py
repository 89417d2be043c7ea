"""Chain health at edit time: where a new state stands against the base model, measured as the
edit is made, so a user sees a chain degrade while it happens and not only at the next audit.

Two of the audit's figures, both against the base checkpoint and never against the previous
state (small steps must not hide a large total): top-1 agreement with the base's greedy
continuations of the standard audit set's prompts (audit.standard_audit_set), and the edited
weights' relative drift ‖W − W_base‖_F / ‖W_base‖_F. Agreement under the audit's locality
threshold (audit.DEFAULT_THRESHOLDS) is flagged.

The base model's continuations are computed once per (base model, prompt format, audit set)
and cached under the workspace's state directory as safetensors (token ids and the base's
argmax, no log-probs: agreement needs no KL), so a check costs one forward pass.

This module owns that cached reference and the check; the workspace calls it after each edit
and records the figures with the entry (`notes.health`).
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .audit import DEFAULT_THRESHOLDS, AuditSet, standard_audit_set, weight_drift
from .editors.metrics import LocalityRef, locality_reference, top1_agreement
from .editors.text import Batch

HEALTH_TOKENS = 4  # greedy tokens per prompt compared, as the audit compares them


def _ref_path(state_dir: Path, base_hash: str, fmt: str, audit_set: AuditSet) -> Path:
    key = hashlib.sha256(f"{base_hash}|{fmt}|{audit_set.sha256}|{HEALTH_TOKENS}".encode()).hexdigest()
    return Path(state_dir) / "health" / f"{key[:24]}.safetensors"


def _save_ref(ref: LocalityRef, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")  # per process: a cache two may write at once
    save_file({"input_ids": ref.batch.input_ids, "attention_mask": ref.batch.attention_mask,
               "labels": ref.batch.labels, "positions": ref.positions.to(torch.uint8),
               "base_top1": ref.base_top1, "owner": ref.owner}, str(tmp))
    tmp.replace(path)


def _load_ref(path: Path) -> LocalityRef | None:
    try:
        t = load_file(str(path))
        return LocalityRef(Batch(t["input_ids"], t["attention_mask"], t["labels"]),
                           t["positions"].bool(), None, t["base_top1"], t["owner"])
    except Exception:  # missing or damaged: recomputed by the caller
        return None


@functools.cache
def _standard_set() -> AuditSet:
    # (read once per process: `edit --each` checks health after every edit)
    return standard_audit_set()


def base_reference(ws, audit_set: AuditSet | None = None) -> LocalityRef:
    """The base model's continuations of the audit set's prompts, cached (see module doc).
    Computing it loads the base state; the caller puts its own state back."""
    audit_set = audit_set or _standard_set()
    lm = ws.lm
    path = _ref_path(ws.state_dir, lm.base_hash, ws.fmt, audit_set)
    ref = _load_ref(path)
    if ref is None:
        ws.use_state(None)
        ref = locality_reference(lm.model, lm.tokenizer, audit_set.prompts, ws.fmt, n_new=HEALTH_TOKENS)
        _save_ref(ref, path)
    return ref


def chain_health(ws, w: dict[str, torch.Tensor], ref: LocalityRef,
                 thresholds: dict | None = None, previous: list[float] | None = None,
                 changed: list[int] | None = None) -> tuple[dict, list[float]]:
    """Health of the state whose edited tensors are `w`, loaded in the model now: audit-set
    agreement with the base, relative drift, and whether agreement is under the threshold;
    and the per-prompt agreement it was computed from.

    `previous` (the per-prompt agreement of the state before) with `changed` (the prompts
    the new state answers differently from it can only be among these: a routed edit's gate
    opens on them) recomputes those prompts only; the others keep their previous figure."""
    thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    if previous is not None and changed is not None:
        agree = list(previous)
        if changed:
            for i, a in zip(changed, top1_agreement(ws.lm.model, ref.rows(changed))):
                agree[i] = a
    else:
        agree = top1_agreement(ws.lm.model, ref)
    locality = float(sum(agree) / len(agree)) if agree else None
    _, drift = weight_drift(w, ws.base_weights)
    # only locality warns: drift is the cause, not the harm, and a healthy 10-edit chain
    # already passes the audit's 5 % drift flag (docs/results.md, sequential edits)
    low = locality is not None and locality < thresholds["locality"]
    return ({"audit_locality": locality, "relative_drift": drift, "prompts": len(agree),
             "locality_threshold": thresholds["locality"], "below_threshold": low}, agree)
