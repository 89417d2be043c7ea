"""Editor-training throughput with 1 and with N data-parallel processes (`mendctl train
--num-processes N`), on the default model (SmolLM2-135M) and the bundled splits.

Each run is the same short training (default: 40 steps of 8 edits, seed 0, one validation at
the end) started through `train_editor`, as the CLI does. Reported per run:
- edits per second in the training steps alone (the trainer's own timing, recorded in the
  editor's JSON under training.throughput: no model loading, no locality set-up, no
  validation, which runs in the main process only);
- the whole run's wall time, set-up included (locality continuations are shared between the
  processes, so they take less time with more processes too);
- threads per process: by default one process gets all of this process's threads and N
  processes an equal share each, so every run uses the same cores (`--threads-per-process T`
  gives every process T threads instead; on a machine shared with another busy job,
  multi-threaded runs are slowed far more than single-threaded ones, so compare there at 1).
The editors of all runs should agree up to float rounding (same seed, same global batch): the
largest relative difference of any editor tensor to the 1-process editor (max |a − b| over
max |b|, per tensor) is reported as a check.

Usage: python bench/train_processes.py [--processes 1 2] [--steps 40] [--edits-per-step 8]
       [--threads-per-process T] [--model smollm2-135m | MODEL_DIR]
       [--data cases.jsonl --val-data cases.jsonl]
       [--out bench/results/train_processes.json]
(A tiny model directory and a small data file make a quick check of the script itself.)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_json  # noqa: E402

from mendctl.training import train_editor  # noqa: E402


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="model alias or a model directory")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--edits-per-step", type=int, default=8)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--val-cases", type=int, default=8)
    ap.add_argument("--data", help="training cases (default: the bundled train split)")
    ap.add_argument("--val-data", help="validation cases (default: the bundled val split)")
    ap.add_argument("--threads-per-process", type=int, default=None)
    ap.add_argument("--model-cache", default=None)
    ap.add_argument("--out", default="bench/results/train_processes.json")
    a = ap.parse_args()
    threads = torch.get_num_threads()
    rows, editors = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-train-processes-") as tmp:
        for n in a.processes:
            out = Path(tmp) / f"p{n}"
            per = a.threads_per_process or max(1, threads // n)
            # the launcher gives each of n processes this process's threads ÷ n
            torch.set_num_threads(per * n if n > 1 else per)
            t = time.perf_counter()
            doc = train_editor(out, model=a.model, model_cache=a.model_cache, rank=a.rank,
                               train_data=a.data, val_data=a.val_data, resume=False,
                               progress=False, num_processes=n, steps=a.steps,
                               edits_per_step=a.edits_per_step, val_every=a.steps,
                               val_cases=a.val_cases, seed=0)
            wall = time.perf_counter() - t
            torch.set_num_threads(threads)
            tp = doc["training"]["throughput"]
            # one validation, at the last step: the checkpoint is the final editor
            editors[n] = load_file(str(out / "editor.safetensors"))
            rows.append({"processes": n, "threads_per_process": per,
                         "steps": tp["steps"], "edits_per_second": tp["edits_per_second"],
                         "step_seconds": tp["step_seconds"], "wall_seconds": round(wall, 1),
                         "val_edit_success": doc["validation"]["edit_success"]})
    base = next((r for r in rows if r["processes"] == 1), rows[0])
    ref = editors[base["processes"]]
    for r in rows:
        r["speedup"] = round(r["edits_per_second"] / base["edits_per_second"], 2)
        got = editors[r["processes"]]
        r["max_rel_diff"] = f"{max(_rel_diff(got[k], ref[k]) for k in ref):.1e}"
    print(table(rows, ["processes", "threads_per_process", "steps", "edits_per_second", "speedup",
                       "step_seconds", "wall_seconds", "max_rel_diff", "val_edit_success"]))
    write_json(a.out, {"model": a.model, "steps": a.steps, "edits_per_step": a.edits_per_step,
                       "rank": a.rank, "cpu_count": os.cpu_count(), "torch_threads": threads,
                       "device": "cpu", "runs": rows})


if __name__ == "__main__":
    main()
