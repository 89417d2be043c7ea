"""`mendctl train`: train a MEND editor for a model on an edit dataset.

Glue only: resolve the model, weights, data and output directory, then hand them to
`editors.mend.trainer.Trainer`, and record in the editor's JSON everything needed to know what
it is for (base-model hash, weights, dataset hash, prompt format, validation scores).

Data parallel: `num_processes` > 1 starts that many local processes (editors.mend.distributed),
each of which runs `train_editor` again as one member of the group; a process started by
`accelerate launch` or `torchrun` joins the group its environment describes. Either way each
process loads the model and data itself and the main one writes the editor.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from .editors.data import DataError, generic_text_samples, load_split, read_cases
from .editors.mend import distributed
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
                 command: str | None = None, num_processes: int = 1,
                 locality_target: float | None = None, **train_kwargs) -> dict:
    """Train and write `out_dir/editor.{safetensors,json}`; returns the editor's JSON.

    `init_from` starts from an existing editor for the same model and weights (its network,
    normalisation statistics and α) instead of the identity initialisation.

    `num_processes` > 1 trains one editor with that many data-parallel processes: each step's
    `edits_per_step` edits are split between them, and the result is that of one process
    with the same seed, up to float rounding.

    `locality_target` ends the run by choosing the editor's operating point on the validation
    cases (`choose_operating_point`)."""
    if num_processes < 1:
        raise InputError("--num-processes must be at least 1")
    cfg = TrainConfig(**train_kwargs)
    if cfg.edit_batch and cfg.edits_per_step % cfg.edit_batch:
        raise InputError(f"--edits-per-step ({cfg.edits_per_step}) must be a multiple of "
                         f"--edit-batch ({cfg.edit_batch}), the facts per training edit")
    args = dict(model=model, edit_weights=edit_weights, prompt_format=prompt_format, rank=rank,
                init_alpha=init_alpha, train_data=train_data, val_data=val_data,
                data_seed=data_seed, generic_loc=generic_loc, resume=resume,
                model_cache=model_cache, device=device, progress=progress, init_from=init_from,
                command=command, locality_target=locality_target, **train_kwargs)
    if locality_target is not None and not 0 < locality_target <= 1:
        raise InputError("--locality-target is a top-1 agreement: between 0 and 1")
    if num_processes > 1:
        if distributed.join(device).parallel:
            raise InputError("already one of several processes (accelerate launch / torchrun): "
                             "leave out --num-processes")
        # settings that cannot work fail here, once, as an input error, not in every process
        if cfg.edits_per_step < num_processes:
            raise InputError(f"--edits-per-step ({cfg.edits_per_step}) must be at least "
                             f"--num-processes ({num_processes}): each process takes a share "
                             f"of every step's edits")
        return distributed.launch(_train_worker, (str(out_dir), args), num_processes, device=device)
    return _train(out_dir, **args)


def _train_worker(out_dir: str, args: dict) -> dict:
    """One launched process (a module-level function, so spawned processes can import it)."""
    return _train(out_dir, **args)


def _train(out_dir, model, edit_weights, prompt_format, rank, init_alpha, train_data, val_data,
           data_seed, generic_loc, resume, model_cache, device, progress, init_from, command,
           locality_target=None, **train_kwargs) -> dict:
    cfg = TrainConfig(**train_kwargs)
    replicas = distributed.join(device)  # one process unless a launcher made a group
    if replicas.parallel and str(device).startswith("cuda"):
        device = f"cuda:{replicas.local_rank}"  # one GPU per process
    torch.manual_seed(cfg.seed)
    # the main process loads first: the first load may convert the model into the cache,
    # which the others must find complete rather than write at the same time
    if not replicas.main:
        replicas.barrier()
    lm = load_model(model, cache_dir=model_cache, device=device)
    if replicas.main:
        replicas.barrier()
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
    # the editor runs where the model runs (u, δ are captured there); checkpoints are
    # written from CPU copies by `MendEditor.save`
    editor.to(next(lm.model.parameters()).device)
    out_dir = Path(out_dir)
    state_dir = out_dir / "train_state"
    # generic text also stands in for the locality prompts of cases that have none
    generic = generic_text_samples()
    trainer = Trainer(editor, lm.model, lm.tokenizer, train, val, cfg, fmt=prompt_format,
                      out_dir=state_dir, progress=progress, generic_texts=generic,
                      generic_loc=generic_loc, replicas=replicas)
    # every process resumes from the same state (only the main one ever writes it)
    if resume and trainer.load_state(state_dir) and replicas.main:
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
    if replicas.main:
        print(f"best step {result.best_step}: {json.dumps(result.best_val)}")
        if (out_dir / "editor.json").is_file():
            if locality_target is not None:
                op = choose_operating_point(out_dir, lm, specs, val[: cfg.val_cases],
                                            locality_target, prompt_format)
                print(f"operating point: α × {op['chosen']['scale']} "
                      f"(validation {json.dumps(op['chosen'])})")
            else:
                calibrate_checkpoint(out_dir, lm, specs, val[: cfg.val_cases], prompt_format)
    return json.loads((out_dir / "editor.json").read_text())


def calibrate_checkpoint(directory: str | Path, lm, specs, cases, prompt_format: str = "raw") -> dict:
    """Measure the size of the checkpoint's single edits on the base model (the drift guard's
    yardstick, `MendEditor.calibrate`) and write it into its JSON; the weights are unchanged."""
    editor = MendEditor.load(directory, specs, lm.base_hash)
    editor.to(next(lm.model.parameters()).device)
    ref = editor.calibrate(lm.model, lm.tokenizer, [c.input for c in cases],
                           [c.target for c in cases], prompt_format)
    ref["split"] = "val"
    path = Path(directory) / "editor.json"
    doc = json.loads(path.read_text())
    doc["delta_norm_reference"] = ref
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return ref


# the α factors tried by `choose_operating_point`: finer near 1, where one step usually lands;
# with several steps per edit the useful factors are smaller (each step is a fraction of one)
SCALES = (0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.1, 1.25)
STEP_SCALES = (0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8, 1.0)


def choose_operating_point(directory: str | Path, lm, specs, cases, locality_target: float,
                           prompt_format: str = "raw", scales=None, progress=None,
                           max_steps: int = 1) -> dict:
    """Pick where a trained editor sits on its trade-off curve, on validation cases: sweep a
    common factor on its steps α, take the factor with the highest validation edit success
    among those whose locality reaches `locality_target` (ties: the larger factor, i.e. fewer
    steps; if none reaches it, the one with the highest locality), multiply α by it and
    rewrite the checkpoint; then re-measure its single-step size for the drift guard. The
    sweep, the target, the factor and `max_steps` go into editor.json (`operating_point`);
    `mendctl edit` and `mendctl eval` take their default number of steps from it. Returns that
    record.

    With `max_steps` 1 each edit is one step (`MendEditor.sweep_scale`); with more, an edit is
    up to that many steps of the scaled α, stopping once the fact holds
    (`MendEditor.sweep_steps`): a smaller step repeated only as often as each fact needs
    disturbs the rest of the model less than one step sized for the hardest facts.

    Training weighs edit success against locality with one constant (c_e); this states the
    trade-off a user wants directly, like a classifier's decision threshold."""
    editor = MendEditor.load(directory, specs, lm.base_hash)
    editor.to(next(lm.model.parameters()).device)
    editor.eval()
    # locality as `mendctl eval` reports it (every locality prompt of a case, its answer and 3
    # greedy tokens), so the target means what a user reads there; the trainer's validation
    # uses a quicker, harsher subset (the first 2 prompts, mostly same-relation neighbours)
    loc = {"loc_prompts": None, "n_new": 4}
    if max_steps <= 1:
        sweep = editor.sweep_scale(lm.model, lm.tokenizer, cases, list(scales or SCALES),
                                   prompt_format, progress=progress, **loc)
    else:  # only the full budget is a candidate: edits stop early where they hold anyway
        sweep = [r for r in editor.sweep_steps(lm.model, lm.tokenizer, cases,
                                               list(scales or STEP_SCALES), max_steps,
                                               prompt_format, progress=progress, **loc)
                 if r["max_steps"] == max_steps]
    ok = [r for r in sweep if r["locality"] is not None and r["locality"] >= locality_target]
    if ok:
        pick = max(ok, key=lambda r: (r["edit_success"], r["scale"]))
    else:
        pick = max((r for r in sweep if r["locality"] is not None),
                   key=lambda r: (r["locality"], -r["scale"]), default=None)
        if pick is None:
            raise InputError("the validation cases have no locality prompts to choose by")
    editor.rescale(pick["scale"])
    prev = (editor.info.get("operating_point") or {}).get("alpha_factor_total", 1.0)
    record = {"locality_target": locality_target, "split": "val", "cases": len(cases),
              "chosen": pick, "alpha_factor": pick["scale"], "max_steps": max_steps,
              "alpha_factor_total": prev * pick["scale"], "reached": bool(ok), "sweep": sweep}
    info = dict(editor.info)
    info["operating_point"] = record
    editor.save(directory, info)
    calibrate_checkpoint(directory, lm, specs, cases, prompt_format)
    return record
