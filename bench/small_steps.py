"""Smaller steps, repeated until the edit holds: the editor's α multiplied by a factor f and
applied up to K times (each step computed on the model with the steps so far applied,
stopping as soon as every target token is the argmax), against the paper's single full step.
Each case is a fresh edit of the base model; one pass measures every (f, K)
(`MendEditor.sweep_steps`). Locality as `mendctl eval` scores it: every locality prompt of the
case, its answer position and 3 greedy tokens; the workspace's drift guard is on.

Usage: python bench/small_steps.py [--split val|test] [--limit 60] [--factors 0.3,0.5,...]
       [--max-steps 5] [--editor-dir DIR] [--out bench/results/small_steps_test.json]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_json  # noqa: E402

from tqdm import tqdm  # noqa: E402

from mendctl.editors.data import load_split  # noqa: E402
from mendctl.workspace import Workspace  # noqa: E402


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
    ed = ws.editor("mend")
    guard = ws.guard_limit(ed, 1)
    cases = load_split(a.split)[: a.limit]
    table = ed.sweep_steps(ws.lm.model, ws.lm.tokenizer, cases,
                           [float(f) for f in a.factors.split(",")], a.max_steps, ws.fmt,
                           progress=lambda xs: tqdm(xs, desc=f"{a.split} cases", file=sys.stderr),
                           max_norm=guard, loc_prompts=None, n_new=4)
    write_json(out, {"split": a.split, "cases": len(cases), "editor": str(ws.editor_dir()),
                     "operating_point": ed.info.get("operating_point"),
                     "guard_max_norm": guard, "table": table})
    print(f"{a.split} split, {len(cases)} cases, editor {ws.editor_dir()}")
    print("| α × | max steps | edit success | paraphrase | locality | KL | mean steps | ms/edit |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['scale']:.2f} | {r['max_steps']} | {r['edit_success']:.3f} | "
              f"{r['paraphrase_success'] or 0:.3f} | {r['locality']:.3f} | {r['locality_kl']:.4f} | "
              f"{r['steps']:.2f} | {1000 * r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
