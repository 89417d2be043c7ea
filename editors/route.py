"""Routed edits: each edit's ΔW acts only on inputs that name what the edit is about.

A chain of plain weight edits compounds every edit's side effects: if one MEND edit leaves
96.6 % of unrelated answers alone, a hundred leave 0.966¹⁰⁰ ≈ 3 % (README, sequential edits).
Routing (the idea of GRACE, Hartvigsen et al. 2023, and WISE, Wang et al. 2024, applied to MEND's
low-rank deltas) keeps the deltas but gates each one per sequence: edit i's ΔW_i is added to its
layers' outputs from the first token on which the sequence *mentions the edit's subject* on.

"Mentions" is decided on an early layer's hidden states (the gate layer; the edited layers come
much later, so the gate is known before they run, in the same forward). An edit's *gate keys*
are the states of its prompt's distinctive tokens: those unlike every token of a bank of
ordinary prompts (in practice the subject's tokens, since the relation's wording is common to
many prompts). A sequence opens gate i at the first token whose state is within cosine τ of one
of edit i's keys, and keeps it open to the end (causal: a token only sees what came before it).
Cosines are taken after standardising each hidden dimension by the bank's mean and spread,
so the few huge "massive activation" dimensions do not decide them.

This module owns the gate space (bank statistics), gate keys, and the forward hooks that apply
gated deltas. It needs full-sequence forwards (no KV cache); it knows nothing about ledgers.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .delta import Delta
from .text import encode_prompts
from .weights import _BLOCK, input_device

#: defaults chosen on the validation split (bench/routed.py; README, routed edits)
GATE_LAYER = 3
DISTINCT = 0.8
TAU = 0.7


def block_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose output is hidden state `layer` (1-based: after `layer` blocks)."""
    for name in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        try:
            return model.get_submodule(name)[layer - 1]
        except AttributeError:
            continue
    raise ValueError("cannot find the model's list of transformer blocks to place a gate on")


@torch.no_grad()
def hidden_at(model: nn.Module, tokenizer, prompts: list[str], layer: int, fmt: str = "raw",
              chunk: int = 32) -> list[torch.Tensor]:
    """Per prompt: (tokens − 1, hidden) fp32 states after `layer` blocks, the first token left
    out (it is the same in every prompt and carries the model's attention-sink activations)."""
    out, got = [], {}
    handle = block_module(model, layer).register_forward_hook(
        lambda m, a, o: got.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        for i in range(0, len(prompts), chunk):
            b = encode_prompts(tokenizer, prompts[i:i + chunk], fmt).to(input_device(model))
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
            for j in range(b.input_ids.shape[0]):
                n = int(b.attention_mask[j].sum())
                out.append(got["h"][j, 1:n].float().cpu())
    finally:
        handle.remove()
    return out


@dataclass
class GateSpace:
    """Standardisation and the bank of ordinary token states at one layer."""

    layer: int
    mean: torch.Tensor  # (hidden,)
    std: torch.Tensor  # (hidden,)
    bank: torch.Tensor  # (n, hidden), unit rows after standardising

    def unit(self, h: torch.Tensor) -> torch.Tensor:
        z = (h.float() - self.mean.to(h.device)) / self.std.to(h.device)
        return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std, "bank": self.bank,
                "layer": torch.tensor(self.layer)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "GateSpace":
        return cls(int(t["layer"]), t["mean"], t["std"], t["bank"])


def gate_space(model: nn.Module, tokenizer, prompts: list[str], layer: int = GATE_LAYER,
               fmt: str = "raw") -> GateSpace:
    """The gate space of ordinary `prompts` (say, the train split's: none of them is edited)."""
    h = torch.cat(hidden_at(model, tokenizer, prompts, layer, fmt))
    mean, std = h.mean(0), h.std(0).clamp_min(1e-6)
    space = GateSpace(layer, mean, std, torch.empty(0))
    space.bank = space.unit(h)
    return space


def gate_keys(model: nn.Module, tokenizer, space: GateSpace, prompt: str, fmt: str = "raw",
              distinct: float = DISTINCT) -> torch.Tensor:
    """(k, hidden) unit keys of an edit: its prompt's tokens whose nearest bank token is less
    than `distinct` alike; at least the one least like the bank, so every edit has a gate."""
    z = space.unit(hidden_at(model, tokenizer, [prompt], space.layer, fmt)[0])
    near = (z @ space.bank.T).max(1).values
    keep = near < distinct
    if not keep.any():
        keep = near == near.min()
    return z[keep].contiguous()


@dataclass
class RoutedEdit:
    """One edit as routing applies it: its delta (low-rank) and its gate keys."""

    delta: Delta
    keys: torch.Tensor


def gates(space: GateSpace, hidden: torch.Tensor, keys: list[torch.Tensor], tau: float) -> torch.Tensor:
    """(batch, tokens, edits) bool: is each edit's gate open at each token of `hidden`
    (batch, tokens, dim), the states at the gate layer."""
    z = space.unit(hidden)
    k = torch.cat(keys).to(z.device)
    owner = torch.cat([torch.full((len(x),), i) for i, x in enumerate(keys)]).to(z.device)
    sim = z @ k.T  # (B, T, total keys)
    sim[:, 0] = -torch.inf  # the first token never opens a gate (see hidden_at)
    best = torch.full((*sim.shape[:2], len(keys)), -torch.inf, device=z.device, dtype=sim.dtype)
    best = best.scatter_reduce(2, owner.expand(*sim.shape[:2], -1), sim, "amax")
    return best.cummax(dim=1).values > tau


@contextmanager
def routed(model: nn.Module, edits: list[RoutedEdit], space: GateSpace, tau: float = TAU):
    """Within the block, `model` behaves as base + Σ gate_i · ΔW_i (see the module doc).
    Hooks only: no weight is touched, so leaving the block restores the model exactly."""
    if not edits:
        yield
        return
    state: dict[str, torch.Tensor] = {}
    keys = [e.keys for e in edits]

    def on_gate(module, args, output):
        state["open"] = gates(space, output[0] if isinstance(output, tuple) else output, keys, tau)

    # per edited module: all edits' factor rows stacked, with the edit each row belongs to
    factors: dict[str, tuple] = {}
    for i, e in enumerate(edits):
        for name, layer in e.delta.layers.items():
            if not layer.is_lowrank:
                raise ValueError(f"{name}: routing applies low-rank (MEND) deltas only")
            block = _BLOCK.search(name)
            if block is None or int(block.group(1)) < space.layer:
                # an edit there would move the gate layer's states, and with them the gates
                raise ValueError(f"{name}: routing needs edited weights in blocks after the gate "
                                 f"layer {space.layer}; edit later layers or gate earlier")
            u, d = layer.u.float(), layer.d.float() * -layer.alpha.float()
            prev = factors.get(name)
            rows = torch.full((len(u),), i)
            factors[name] = (u, d, rows) if prev is None else (
                torch.cat([prev[0], u]), torch.cat([prev[1], d]), torch.cat([prev[2], rows]))
    handles = [block_module(model, space.layer).register_forward_hook(on_gate)]
    for name, (u, d, rows) in factors.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        dev = module.weight.device

        def add(module, args, output, u=u.to(dev), d=d.to(dev), rows=rows.to(dev)):
            x = args[0]
            coef = (x.float() @ u.T) * state["open"][..., rows].to(x.device)  # (B, T, rows)
            return output + (coef @ d).to(output.dtype)
        handles.append(module.register_forward_hook(add))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        state.clear()
