"""Preserved keys: the subspace of the edited layers' inputs that ordinary text occupies, which
MEND edits in a workspace are kept off (`preserve_keys` in mendctl.yaml).

MEND's update ΔW = −α Σ δ̃ ũᵀ changes what a weight does to an input x only through ũᵀx.
Projecting every ũ off the directions in which ordinary text's keys carry most of their energy
(AlphaEdit's null space of preserved knowledge, Fang et al. 2025) leaves those inputs' outputs
nearly alone. On one edit of the base model this changed little (docs/results.md: tried and dropped);
in a chain, where every edit's side effects add up, it keeps far more of the base model's
answers (docs/results.md, sequential edits).

The text is fixed and none of it is ever scored: a sample of the bundled train split's prompts
(edit inputs and neighbourhood prompts; their subjects are disjoint from the test split's and
from the audit set's) and the generic-text passages the audit set does not use. The basis
depends on the base model, the edited weights, the prompt format and the cut, so it is computed
once per workspace (50 s on this project's 2-core CPU for the default model) and cached under
the state directory; the shipped editor's directory carries the default model's basis for the
default cut and format.

This module owns the text and the cached basis; the projection itself is
editors/mend/protect.py's.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .audit import AUDIT_GENERIC
from .editors.data import generic_text_samples, load_split
from .editors.mend.protect import preserved_basis

PRESERVE_PROMPTS = 1000  # train-split prompts in the preserved text


def preserve_texts(n: int = PRESERVE_PROMPTS, seed: int = 0) -> list[str]:
    """The preserved text (see the module docstring), in a fixed order."""
    prompts = sorted({p for c in load_split("train") for p in [c.input, *c.locality]})
    random.Random(seed).shuffle(prompts)
    return prompts[:n] + generic_text_samples()[AUDIT_GENERIC:]  # the audit's own: never preserved


def _path(state_dir: Path, base_hash: str, names: list[str], fmt: str, cut: float, texts: list[str]) -> Path:
    doc = json.dumps([base_hash, sorted(names), fmt, cut, texts])
    return Path(state_dir) / "preserve" / f"{hashlib.sha256(doc.encode()).hexdigest()[:24]}.safetensors"


def workspace_basis(ws, cut: float, progress=None) -> dict[str, torch.Tensor]:
    """{weight name: orthonormal basis} of the preserved keys at eigenvalue `cut`: from the
    workspace's cache, else from the editor's directory (the shipped editor carries the
    default model's, so a first edit does not wait for it), else computed and cached."""
    lm = ws.lm
    texts = preserve_texts()
    path = _path(ws.state_dir, lm.base_hash, [s.name for s in ws.specs], ws.fmt, cut, texts)
    shipped = ws.editor_dir() / "preserve" / path.name
    for candidate in (path, shipped):
        try:
            return load_file(str(candidate))
        except Exception:  # missing or damaged: the next, or computed below
            pass
    if progress is None:
        from tqdm import tqdm

        progress = lambda xs: tqdm(xs, desc="preserved keys (once per workspace)",  # noqa: E731
                                   file=sys.stderr, leave=False)
    ws.use_state(None)  # the base model's keys
    basis = preserved_basis(lm.model, lm.tokenizer, ws.specs, texts, cut, fmt=ws.fmt,
                            progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")  # per process: a cache two may write at once
    save_file({n: b.contiguous() for n, b in basis.items()}, str(tmp))
    tmp.replace(path)
    return basis
