"""Retention guard: the input subspace of earlier edits that a new MEND edit must not touch.

MEND's update is ΔW = −α Σ_i δ̃_i ũ_iᵀ, so what it does to any input x is −α Σ δ̃_i (ũ_iᵀ x).
An earlier edit holds as long as the weights keep mapping *its* keys (the edited layers'
inputs on its prompt and target) to the values it wrote. Projecting every ũ_i of a new edit
off the span of those keys makes ΔW x = 0 for each of them: the new edit cannot overwrite
what the earlier ones wrote, whatever its gradient says (the null-space idea of AlphaEdit,
Fang et al. 2025, applied to MEND's factors instead of a least-squares solve).

The same projection keeps edits off ordinary text (`preserved_basis`: the leading
eigenvectors of the second moment of many texts' keys, AlphaEdit's preserved-knowledge
subspace; which text, and its cache, is mendctl/preserve.py's business). `union` joins the two.

This module owns finding those spans (`key_basis`: one forward over the protected pairs on the
model as it is now, an SVD per edited weight) and applying them (`project_off`). The span is
summarised, not stored whole: its leading directions up to an energy fraction, and never more
than a fraction of the input dimension, so a long chain cannot freeze a weight entirely.
"""
from __future__ import annotations

import torch
from torch import nn

from ..text import encode_pairs, encode_prompts
from ..weights import WeightSpec, input_device


@torch.no_grad()
def key_inputs(model: nn.Module, specs: list[WeightSpec], batch) -> dict[str, list[torch.Tensor]]:
    """{weight name: [(tokens_i, in_features) per example]}: each edited layer's input at
    every real token of each example."""
    got: dict[str, torch.Tensor] = {}
    handles = []
    for s in specs:
        def hook(module, args, output, name=s.name):
            got[name] = args[0].detach()
        handles.append(model.get_submodule(s.module_name).register_forward_hook(hook))
    try:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for h in handles:
            h.remove()
    keep = batch.attention_mask.bool()
    return {n: [x[i][keep[i]].float() for i in range(x.shape[0])] for n, x in got.items()}


def _leading(x: torch.Tensor, energy: float) -> torch.Tensor:
    """(in_features, r): the right singular vectors of `x` holding `energy` of its energy."""
    _, sv, vh = torch.linalg.svd(x, full_matrices=False)
    share = (sv * sv).cumsum(0) / (sv * sv).sum().clamp_min(1e-12)
    return vh[: int((share < energy).sum()) + 1].T


def key_basis(model: nn.Module, tokenizer, specs: list[WeightSpec], prompts: list[str],
              targets: list[str], fmt: str = "raw", energy: float = 0.9,
              max_fraction: float = 0.5, chunk: int = 32) -> dict[str, torch.Tensor]:
    """{weight name: Q (in_features, r), orthonormal columns}: the span of the protected
    pairs' keys. Each pair contributes the leading directions of its own keys (rows
    normalised, so every token counts equally) holding `energy` of their energy; the union is
    orthonormalised, keeping at most `max_fraction` × in_features directions, those shared by
    the most pairs first (the union's leading singular vectors)."""
    if not prompts:
        return {}
    parts: dict[str, list[torch.Tensor]] = {s.name: [] for s in specs}
    device = input_device(model)
    for i in range(0, len(prompts), chunk):
        batch = encode_pairs(tokenizer, prompts[i:i + chunk], targets[i:i + chunk], fmt).to(device)
        for name, xs in key_inputs(model, specs, batch).items():
            for x in xs:
                x = x.cpu()
                parts[name].append(_leading(x / x.norm(dim=1, keepdim=True).clamp_min(1e-12), energy))
    out = {}
    for s in specs:
        union = torch.cat(parts[s.name], dim=1)
        u, sv, _ = torch.linalg.svd(union, full_matrices=False)
        r = int((sv > sv[0] * 1e-3).sum())  # the union's numerical rank
        out[s.name] = u[:, : max(1, min(r, int(max_fraction * s.in_features)))].contiguous()
    return out


def project_off(u: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Rows of `u` (n, in_features) with their components in span(basis) removed."""
    if basis is None:
        return u
    basis = basis.to(u.device, u.dtype)
    return u - (u @ basis) @ basis.T


@torch.no_grad()
def preserved_basis(model: nn.Module, tokenizer, specs: list[WeightSpec], texts: list[str],
                    cut: float, fmt: str = "raw", chunk: int = 32, max_fraction: float = 0.5,
                    progress=None) -> dict[str, torch.Tensor]:
    """{weight name: Q (in_features, r), orthonormal columns, leading first}: the directions
    in which the keys of `texts` (every token; text the edits should leave alone) have
    energy above `cut` × the largest eigenvalue of their second-moment matrix (AlphaEdit's
    preserved-knowledge subspace), at most `max_fraction` × in_features of them."""
    device = input_device(model)
    cov = {s.name: torch.zeros(s.in_features, s.in_features, dtype=torch.float64) for s in specs}
    starts = range(0, len(texts), chunk)
    for i in (progress(starts) if progress else starts):
        batch = encode_prompts(tokenizer, texts[i:i + chunk], fmt).to(device)
        for name, xs in key_inputs(model, specs, batch).items():
            x = torch.cat(xs).cpu()  # every real token of the chunk: one matmul, in fp32
            cov[name] += (x.T @ x).double()
    out = {}
    for s in specs:
        ev, vec = torch.linalg.eigh(cov[s.name])
        keep = ev > cut * ev[-1]
        q = vec[:, keep].flip(1)[:, : int(max_fraction * s.in_features)]
        out[s.name] = q.float().contiguous()
    return out


def union(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """An orthonormal basis of span(a) + span(b)."""
    if a is None or b is None:
        return a if b is None else b
    q, r = torch.linalg.qr(torch.cat([a, b], dim=1))
    keep = r.diagonal().abs() > 1e-6
    return q[:, keep].contiguous()
