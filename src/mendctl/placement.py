"""Where a base model's modules live: accelerate's big-model loading for mendctl.

`device_map` in mendctl.yaml spreads a model over the devices it names (`auto`, `balanced`,
`sequential`, or an explicit {module: device} mapping), within the `max_memory` of each
device, offloading what does not fit to CPU memory or to disk (`offload_folder`). Any model
transformers can load that way can then be edited, with one rule of mendctl's own: the
modules that hold the edited weights are never offloaded. An edit writes those weights in
place, and accelerate's offload keeps an offloaded weight as a placeholder on the `meta`
device while streaming its values in from elsewhere for each forward pass; so they are
pinned to the model's main device (the first accelerator in the map, else the CPU) and the
rest is placed around them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import MAP_STRATEGIES
from .errors import ModelError


def main_device(device_map: dict) -> str | int:
    """The device a dispatched model executes offloaded modules on (accelerate's rule): the
    first device of the map that is neither the CPU nor the disk, else the CPU."""
    for dev in device_map.values():
        if dev not in ("cpu", "disk"):
            return dev
    return "cpu"


def _owner(device_map: dict, module: str) -> str | None:
    """The device-map key that places `module` (the longest key that is it or a parent)."""
    best = None
    for key in device_map:
        if key == "" or module == key or module.startswith(key + "."):
            if best is None or len(key) > len(best):
                best = key
    return best


def plan_device_map(where: str | Path, dtype: torch.dtype, device_map, max_memory: dict | None,
                    edit_weights: list[str]) -> dict:
    """An explicit device map for loading `where`: the requested one (a strategy is resolved
    with accelerate's `infer_auto_device_map` on an empty model, inside `max_memory`) with
    every module that holds an edited weight moved onto the main device."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .editors.weights import select_weights

    config = AutoConfig.from_pretrained(str(where), trust_remote_code=False)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    empty.tie_weights()
    if isinstance(device_map, str):
        if device_map not in MAP_STRATEGIES:
            raise ModelError(f"device_map {device_map!r} is not one of {', '.join(MAP_STRATEGIES)} "
                             f"or a mapping of module names to devices")
        no_split = list(getattr(empty, "_no_split_modules", None) or [])
        # clean_result=False keeps one entry per placed module (a block at most), so pinning
        # an edited block never drags a merged parent entry (e.g. the whole model) with it
        dmap = dict(infer_auto_device_map(empty, max_memory=max_memory, dtype=dtype,
                                          no_split_module_classes=no_split, clean_result=False))
    else:
        dmap = dict(device_map)
    try:
        specs = select_weights(empty, edit_weights)
    except ValueError as e:
        raise ModelError(f"`edit_weights`: {e}") from e
    target = main_device(dmap)
    for s in specs:
        key = _owner(dmap, s.module_name)
        if key is None:
            raise ModelError(f"device_map places no module that holds {s.name}; map it (or a "
                             f"parent module) to a device")
        # the whole entry moves (a block, typically): overlapping keys are not something
        # every accelerate/transformers version resolves the same way
        dmap[key] = target
    return dmap


def placement_summary(model) -> dict:
    """How many parameters (and bytes) sit on each device: 'meta' counts offloaded ones."""
    out: dict[str, dict] = {}
    for _, p in model.named_parameters():
        d = out.setdefault(str(p.device), {"parameters": 0, "bytes": 0})
        d["parameters"] += p.numel()
        d["bytes"] += p.numel() * p.element_size()
    return out
