"""Exporting a state as a PEFT LoRA adapter built from the exact MEND factors.

For each edited weight the active deltas' factors are stacked: lora_A = [ũ_1; ũ_2; ...]
(r × in) and lora_B = [−α_1 δ̃_1ᵀ, −α_2 δ̃_2ᵀ, ...] (out × r), so lora_B @ lora_A = Σ ΔW_k
exactly, with r = the number of factor rows and lora_alpha = r (PEFT's scaling alpha/r = 1).
Dense deltas (fine-tuning baselines) have no such factors and are refused: export those states
with `--format hf`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .editors.delta import Delta
from .editors.weights import WeightSpec
from .errors import InputError


def lora_factors(specs: list[WeightSpec], deltas: list[Delta]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for s in specs:
        A, B = [], []
        for d in deltas:
            layer = d.layers.get(s.name)
            if layer is None:
                continue
            if not layer.is_lowrank:
                raise InputError("the state holds a dense (fine-tuning) delta, which a LoRA adapter "
                                 "cannot hold exactly; export it with --format hf")
            A.append(layer.u.float())
            B.append((-layer.alpha.float() * layer.d.float()).T)
        if A:
            out[s.name] = (torch.cat(A, 0), torch.cat(B, 1))
    return out


def write_peft_adapter(model, specs: list[WeightSpec], deltas: list[Delta], out: Path,
                       base_path: str) -> None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise InputError("--format peft needs the peft package: pip install peft") from e
    factors = lora_factors(specs, deltas)
    modules = {s.module_name: s for s in specs if s.name in factors}
    ranks = {m: int(factors[s.name][0].shape[0]) for m, s in modules.items()}
    r = max(ranks.values())
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(modules), lora_dropout=0.0,
                     bias="none", rank_pattern=dict(ranks), alpha_pattern=dict(ranks),
                     fan_in_fan_out=any(s.transposed for s in modules.values()),
                     init_lora_weights=False, base_model_name_or_path=str(base_path))
    peft_model = get_peft_model(model, cfg)
    try:
        with torch.no_grad():
            for mname, s in modules.items():
                A, B = factors[s.name]
                layer = peft_model.base_model.model.get_submodule(mname)
                layer.lora_A["default"].weight.copy_(A)
                layer.lora_B["default"].weight.copy_(B)
        peft_model.save_pretrained(str(out))
    finally:
        peft_model.unload()  # give the caller back its plain model
