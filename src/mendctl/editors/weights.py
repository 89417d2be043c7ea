"""Which weights an editor edits, and how each one is laid out.

Targets are chosen by exact parameter name, by suffix, or by regular expression (``re:...``,
full match), as PEFT does; ``auto`` means the MLP matrices of the last three blocks, the
paper's choice. Orientation is read off the module that owns the weight: ``nn.Linear`` stores
(out, in), GPT-2's ``Conv1D`` stores (in, out). Nothing here looks at the model's class name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

AUTO = "auto"
_BLOCK = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class WeightSpec:
    """One edited weight: parameter name, owning module, stored shape and orientation."""

    name: str  # parameter name, e.g. model.layers.29.mlp.down_proj.weight
    module_name: str  # e.g. model.layers.29.mlp.down_proj
    shape: tuple[int, int]  # as stored in the parameter
    in_features: int
    out_features: int
    transposed: bool  # True when stored (in, out), as GPT-2's Conv1D does

    @property
    def key(self) -> str:
        """Shape key shared by every layer that one editor network serves."""
        return f"{self.in_features}x{self.out_features}"

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "transposed": self.transposed}


def _orientation(module: nn.Module) -> bool | None:
    """True for (in, out) storage, False for (out, in), None for modules we cannot edit."""
    if isinstance(module, nn.Linear):
        return False
    # transformers' Conv1D (GPT-2 family) keeps `nf` = out features and weight (in, out).
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return True
    return None


def editable_weights(model: nn.Module) -> dict[str, WeightSpec]:
    """Every 2-D weight of a Linear or Conv1D module, by parameter name."""
    out = {}
    for mname, module in model.named_modules():
        transposed = _orientation(module)
        w = getattr(module, "weight", None)
        if transposed is None or w is None or w.dim() != 2:
            continue
        shape = tuple(w.shape)
        in_f, out_f = (shape[0], shape[1]) if transposed else (shape[1], shape[0])
        name = f"{mname}.weight" if mname else "weight"
        out[name] = WeightSpec(name, mname, shape, in_f, out_f, transposed)
    return out


def _auto(candidates: dict[str, WeightSpec], n_blocks: int = 3) -> list[str]:
    mlp = {}
    for name in candidates:
        m = _BLOCK.search(name)
        if m and ".mlp." in name:
            mlp.setdefault(int(m.group(1)), []).append(name)
    if not mlp:
        raise ValueError("`edit_weights: auto` found no MLP weights in blocks; "
                         "name the weights in mendctl.yaml instead")
    last = sorted(mlp)[-n_blocks:]
    return [n for b in last for n in sorted(mlp[b])]


def select_weights(model: nn.Module, patterns: list[str] | str) -> list[WeightSpec]:
    """Resolve target patterns to WeightSpecs, in a canonical (block, name) order."""
    if isinstance(patterns, str):
        patterns = [patterns]
    candidates = editable_weights(model)
    chosen: list[str] = []
    for pat in patterns:
        if pat == AUTO:
            hits = _auto(candidates)
        elif pat.startswith("re:"):
            rx = re.compile(pat[3:])
            hits = [n for n in candidates if rx.fullmatch(n)]
        elif pat in candidates:
            hits = [pat]
        else:
            hits = [n for n in candidates if n.endswith("." + pat)]  # suffix on a name boundary
        if not hits:
            raise ValueError(f"edit weight pattern {pat!r} matches no Linear/Conv1D weight of "
                             f"this model (e.g. {next(iter(sorted(candidates)), '?')!r})")
        chosen.extend(h for h in hits if h not in chosen)

    def order(n: str):
        m = _BLOCK.search(n)
        return (int(m.group(1)) if m else -1, n)

    return [candidates[n] for n in sorted(chosen, key=order)]


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its input embedding's device or, when accelerate has
    offloaded the embedding (its weight then sits on the meta device), the device the
    embedding executes on. A model spread by a device map moves activations between its
    devices itself (accelerate's hooks)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        return next(model.parameters()).device
    hook = getattr(emb, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev)
    return emb.weight.device


def get_parameter(model: nn.Module, name: str) -> torch.nn.Parameter:
    return model.get_parameter(name)


def read_weights(model: nn.Module, specs: list[WeightSpec]) -> dict[str, torch.Tensor]:
    """Detached fp32 CPU copies of the edited weights."""
    return {s.name: model.get_parameter(s.name).detach().to("cpu", torch.float32).clone()
            for s in specs}


@torch.no_grad()
def write_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the model's parameters in place (dtype/device of the model)."""
    for name, w in weights.items():
        p = model.get_parameter(name)
        p.copy_(w.to(p.device, p.dtype))


class applied:
    """Context manager: the model's weights with deltas added (base + Σ ΔW, in order, fp32,
    as `apply_deltas` computes states), restored exactly on exit."""

    def __init__(self, model: nn.Module, deltas, base: dict[str, torch.Tensor] | None = None):
        from .delta import apply_deltas

        self.model = model
        self.deltas = deltas if isinstance(deltas, (list, tuple)) else [deltas]
        names = sorted({n for d in self.deltas for n in d.layers})
        self.saved = {n: model.get_parameter(n).detach().clone() for n in names}
        start = base if base is not None else {n: t.float() for n, t in self.saved.items()}
        self.weights = apply_deltas({n: start[n] for n in names}, list(self.deltas))

    def __enter__(self):
        write_weights(self.model, self.weights)
        return self.model

    def __exit__(self, *exc):
        with torch.no_grad():
            for n, t in self.saved.items():
                self.model.get_parameter(n).copy_(t)
