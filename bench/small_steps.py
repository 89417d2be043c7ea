"""Smaller steps, repeated until the edit holds: the editor's α multiplied by a factor f and
applied up to K times (each step computed on the model with the steps so far applied,
stopping as soon as every target token is the argmax), against the paper's single full step.
Each case is a fresh edit of the base model; one pass measures every (f, K)
(`MendEditor.sweep_steps`). Locality as `mendctl eval` scores it: every locality prompt of the
case, its answer position and 3 greedy tokens; the workspace's drift guard is on.

Usage: python bench/small_steps.py [--split val|test] [--limit 60] [--factors 0.3,0.5,...]
       [--max-steps 5] [--editor-dir DIR] [--as-trained] [--out bench/results/small_steps_test.json]
       [--plot docs/small_steps.png] [--plot-only]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import temp_workspace, write_json  # noqa: E402

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
    ap.add_argument("--as-trained", action="store_true",
                    help="undo a calibrated editor's α factor (its operating_point) first")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="draw edit success and paraphrase success "
                    "against locality, one step vs the full step budget")
    ap.add_argument("--plot-only", action="store_true", help="redraw --plot from --out")
    a = ap.parse_args()
    out = a.out or f"bench/results/small_steps_{a.split}.json"
    if a.plot_only:
        doc = json.loads(Path(out).read_text())
        plot(doc["table"], a.plot or "docs/small_steps.png", f"{doc['split']} split, {doc['cases']} cases")
        return
    root = temp_workspace(a.editor_dir)
    ws = Workspace.open(str(root))
    ed = ws.editor("mend", step_factor=1.0)  # factors relative to the checkpoint's α
    guard = ws.policy("mend").max_norm
    if a.as_trained:  # the factors below are then relative to the trained α
        factor = (ed.info.get("operating_point") or {}).get("alpha_factor_total", 1.0)
        ed.rescale(1.0 / factor)
        guard = guard / factor if guard else guard  # its yardstick was measured at the scaled α
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
    if a.plot:
        plot(table, a.plot, f"{a.split} split, {len(cases)} cases")


def plot(table: list[dict], path: str, title: str) -> None:
    """Each curve runs over the α factors: one step (the paper) against the full step budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    budgets = sorted({r["max_steps"] for r in table})
    for k in (budgets[0], budgets[-1]):
        rs = sorted((r for r in table if r["max_steps"] == k), key=lambda r: r["scale"])
        x = [r["locality"] for r in rs]
        for ax, key in zip(axes, ("edit_success", "paraphrase_success")):
            ax.plot(x, [r[key] for r in rs], "o-", label=f"≤{k} step(s)" if k > 1 else "one step")
            for r in rs:
                ax.annotate(f"×{r['scale']:g}", (r["locality"], r[key]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    for ax, name in zip(axes, ("edit success", "paraphrase success")):
        ax.axvline(0.95, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("locality (top-1 agreement with the base model)")
        ax.set_ylabel(name)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    axes[0].axhline(0.90, color="grey", lw=0.8, ls=":")
    fig.suptitle(f"α × factor, one step vs steps until the edit holds ({title})", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
