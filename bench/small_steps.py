"""Smaller steps, repeated until the edit holds: the shipped editor's α multiplied by a factor
f ≤ 1 and applied up to K times (each step computed on the model with the steps so far
applied, stopping as soon as every target token is the argmax), against the paper's single
full step. Each case is a fresh edit of the base model; one run measures every (f, K).

A step of the editor overshoots for most facts (edit success saturates long before the
step's size does) and every unit of step size costs locality; stepping in smaller units and
stopping when the fact holds spends only what each fact needs.

Usage: python bench/small_steps.py [--split val|test] [--limit 60] [--factors 0.4,0.5,...]
       [--max-steps 5] [--out bench/results/small_steps_test.json]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_json  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mendctl.editors.mend.editor import _stack  # noqa: E402
from mendctl.editors.data import load_split  # noqa: E402
from mendctl.editors.metrics import (locality_reference, locality_scores,  # noqa: E402
                                     target_scores)
from mendctl.editors.weights import applied  # noqa: E402
from mendctl.workspace import Workspace  # noqa: E402


def mean(xs):
    xs = [x for x in xs if x is not None]
    return float(sum(xs) / len(xs)) if xs else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--factors", default="0.3,0.4,0.5,0.6,0.7,0.8,1.0")
    ap.add_argument("--max-steps", type=int, default=5)
    ap.add_argument("--editor-dir", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = a.out or f"bench/results/small_steps_{a.split}.json"
    root = Workspace.init(Path(tempfile.mkdtemp()) / "ws")
    if a.editor_dir:
        cfg = root / "mendctl.yaml"
        cfg.write_text(cfg.read_text().replace("\neditor: default\n",
                                               f"\neditor: {Path(a.editor_dir).resolve()}\n"))
    ws = Workspace.open(str(root))
    lm, fmt = ws.lm, ws.fmt
    model, tok = lm.model, lm.tokenizer
    ed = ws.editor("mend")
    guard = ws.guard_limit(ed, 1)
    alpha0 = ed.alpha.detach().clone()
    factors = [float(f) for f in a.factors.split(",")]
    cases = load_split(a.split)[: a.limit]
    # rows[f][k] = per-case metrics with at most k steps
    rows = {f: {k: [] for k in range(1, a.max_steps + 1)} for f in factors}
    for c in tqdm(cases, desc=f"{a.split} cases", file=sys.stderr):
        ref = locality_reference(model, tok, c.locality, fmt) if c.locality else None
        for f in factors:
            with torch.no_grad():
                ed.alpha.copy_(alpha0 * f)
            delta, seconds, landed_at, m = None, 0.0, None, None
            for k in range(1, a.max_steps + 1):
                if landed_at is None:
                    t0 = time.perf_counter()
                    with applied(model, delta) if delta is not None else nullcontext():
                        step = ed.edit(model, tok, [c.input], [c.target], fmt, max_steps=1,
                                       max_norm=guard)
                    delta = step if delta is None else _stack(delta, step)
                    with applied(model, delta):
                        es = float(target_scores(model, tok, [c.input], [c.target], fmt)[0][0])
                        seconds += time.perf_counter() - t0  # the edit and its success check
                        ps = target_scores(model, tok, c.paraphrases, [c.target] * len(c.paraphrases),
                                           fmt)[0] if c.paraphrases else []
                        ag, kl = locality_scores(model, ref) if ref else ([], [])
                    m = {"edit_success": es, "paraphrase_success": mean([float(x) for x in ps]),
                         "locality": mean(ag), "locality_kl": mean(kl), "steps": k,
                         "seconds": seconds}
                    if es == 1.0:
                        landed_at = k
                rows[f][k].append(dict(m))
    with torch.no_grad():
        ed.alpha.copy_(alpha0)
    keys = ["edit_success", "paraphrase_success", "locality", "locality_kl", "steps", "seconds"]
    table = [{"factor": f, "max_steps": k, **{key: mean([r[key] for r in rows[f][k]]) for key in keys}}
             for f in factors for k in range(1, a.max_steps + 1)]
    write_json(out, {"split": a.split, "cases": len(cases), "editor": str(ws.editor_dir()),
                     "guard_max_norm": guard, "table": table})
    print(f"{a.split} split, {len(cases)} cases, editor {ws.editor_dir()}")
    print("| α × | max steps | edit success | paraphrase | locality | KL | mean steps | ms/edit |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['factor']:.2f} | {r['max_steps']} | {r['edit_success']:.3f} | "
              f"{r['paraphrase_success'] or 0:.3f} | {r['locality']:.3f} | {r['locality_kl']:.4f} | "
              f"{r['steps']:.2f} | {1000 * r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
