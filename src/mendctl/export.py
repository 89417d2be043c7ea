"""`mendctl export`: a state written as a Hugging Face checkpoint, or as a PEFT LoRA adapter
built from the exact MEND factors.

`export` writes `--format hf`: the state's weights as a transformers checkpoint (with a routed
state, its gates and deltas beside it, deploy.py, loaded with `mendctl.load_edited`), or
`--format peft`: an adapter on the base model. For each edited weight the active deltas' factors are stacked: lora_A = [ũ_1; ũ_2; ...]
(r × in) and lora_B = [−α_1 δ̃_1ᵀ, −α_2 δ̃_2ᵀ, ...] (out × r), so lora_B @ lora_A = Σ ΔW_k
exactly, with r = the number of factor rows and lora_alpha = r (PEFT's scaling alpha/r = 1).
Dense deltas (fine-tuning baselines) have no such factors and are refused: export those states
with `--format hf`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .deploy import ROUTES_FILE, write_routes
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


def export(ws, out: str | Path, at: int | None = None, fmt: str = "hf") -> dict:
    """Write the state after entry `at` (default: the head) of `ws` to the new directory `out`."""
    if fmt not in ("hf", "peft"):
        raise InputError(f"unknown export format {fmt!r}; use hf or peft")
    _ = ws.lm
    entry = ws.entry_at(at)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not empty; choose a new directory")
    lm = ws.lm
    routed_ = ws.split(entry.active_ids)[1] if entry else []
    if routed_ and fmt != "hf":
        raise InputError(f"state {entry.id} routes edits {[e.id for e in routed_]} (routing): a "
                         f"routed edit acts behind its gate, not as a change of weights, so a "
                         f"LoRA adapter cannot carry it. Export it with --format hf (loaded with "
                         f"mendctl.load_edited), or an earlier state with --at N")
    if fmt == "hf":
        ws.use_state(entry)
        lm.model.save_pretrained(str(out))
        lm.tokenizer.save_pretrained(str(out))
        if routed_:  # the gates and deltas beside the plain weights (mendctl/deploy.py)
            edits = ws.router.edits(routed_)
            spaces = {s["layer"]: ws.router.space(s["layer"]) for _, s in edits}
            write_routes(out / ROUTES_FILE, edits, spaces, [e.id for e in routed_])
    elif fmt == "peft":
        deltas = [ws.load_delta(i) for i in (entry.active_ids if entry else [])]
        if not deltas:
            raise InputError("the state has no active edits: nothing to export as an adapter")
        ws.use_state(None)
        write_peft_adapter(lm.model, ws.specs, deltas, out, lm.source)
    else:
        raise InputError(f"unknown export format {fmt!r}; use hf or peft")
    (out / "mendctl-export.json").write_text(json.dumps({
        "entry": entry.id if entry else None, "state_hash": entry.state_hash if entry else None,
        "active_ids": list(entry.active_ids) if entry else [], "format": fmt,
        "routed_ids": [e.id for e in routed_],
        "load_with": "mendctl.load_edited(dir)" if routed_ else "transformers from_pretrained(dir)",
        "base_model_id": lm.model_id, "base_model_hash": lm.base_hash}, indent=2))
    return {"out": str(out), "format": fmt, "entry": entry.id if entry else None,
            "routed_ids": [e.id for e in routed_]}
