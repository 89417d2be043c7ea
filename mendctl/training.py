"""`mendctl train`: train a MEND editor for a model on an edit dataset.

Glue only: resolve the model, weights, data and output directory, then hand them to
`editors.mend.trainer.Trainer`, and record in the editor's JSON everything needed to know what
it is for (base-model hash, weights, dataset hash, prompt format, validation scores).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from .editors.data import DataError, generic_text_samples, load_split, read_cases
from .editors.mend.editor import EditorMismatch, MendConfig, MendEditor
from .editors.mend.trainer import TrainConfig, Trainer
from .editors.weights import select_weights
from .errors import InputError
from .models import load_model


def cases_sha256(cases) -> str:
    h = hashlib.sha256()
    for c in cases:
        h.update(json.dumps(c.to_dict(), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def load_cases(path: str | None, split: str, seed: int):
    """A user's data file (our JSONL, zsRE or CounterFact), or the bundled split."""
    try:
        if path:
            return read_cases(path), str(path)
        return load_split(split, seed=seed), f"bundled:{split}:seed{seed}"
    except DataError as e:
        raise InputError(str(e)) from e
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from e


def train_editor(out_dir: str | Path, model: str = "smollm2-135m", edit_weights=("auto",),
                 prompt_format: str = "raw", rank: int = 256, init_alpha: float = 3e-4,
                 train_data: str | None = None, val_data: str | None = None, data_seed: int = 0,
                 generic_loc: float = 0.25, resume: bool = True, model_cache: str | None = None,
                 device: str = "cpu", progress: bool = True, init_from: str | None = None,
                 command: str | None = None, **train_kwargs) -> dict:
    """Train and write `out_dir/editor.{safetensors,json}`; returns the editor's JSON.

    `init_from` starts from an existing editor for the same model and weights (its network,
    normalisation statistics and α) instead of the identity initialisation."""
    cfg = TrainConfig(**train_kwargs)
    torch.manual_seed(cfg.seed)
    lm = load_model(model, cache_dir=model_cache, device=device)
    specs = select_weights(lm.model, list(edit_weights))
    train, train_src = load_cases(train_data, "train", data_seed)
    val, val_src = load_cases(val_data, "val", data_seed)
    if not train or not val:
        raise InputError("training needs non-empty training and validation data")
    if init_from:
        try:
            editor = MendEditor.load(init_from, specs, lm.base_hash)
        except EditorMismatch as e:
            raise InputError(str(e)) from e
        editor.train()
    else:
        editor = MendEditor(specs, MendConfig(rank=rank, init_alpha=init_alpha))
    out_dir = Path(out_dir)
    state_dir = out_dir / "train_state"
    # generic text also stands in for the locality prompts of cases that have none
    generic = generic_text_samples()
    trainer = Trainer(editor, lm.model, lm.tokenizer, train, val, cfg, fmt=prompt_format,
                      out_dir=state_dir, progress=progress, generic_texts=generic,
                      generic_loc=generic_loc)
    if resume and trainer.load_state(state_dir):
        print(f"resuming from step {trainer.step} ({state_dir})")
    info = {
        "editor": "mend",
        "base_model": {"id": lm.model_id, "spec": model, "hash": lm.base_hash},
        "prompt_format": prompt_format,
        "dataset": {"train": train_src, "val": val_src, "train_cases": len(train),
                    "train_sha256": cases_sha256(train), "val_sha256": cases_sha256(val),
                    "generic_locality_fraction": generic_loc},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "params": sum(p.numel() for p in editor.parameters()),
    }
    if command:  # the command line that made it, so the checkpoint says how to reproduce it
        info["reproduce"] = command
    if init_from:
        prev = editor.info or {}
        info["initialised_from"] = {"path": str(init_from), "created": prev.get("created"),
                                    "reproduce": prev.get("reproduce"),
                                    "validation": prev.get("validation")}
    result = trainer.run(out_dir, info)
    print(f"best step {result.best_step}: {json.dumps(result.best_val)}")
    return json.loads((out_dir / "editor.json").read_text())
