"""The comparison table of docs/results.md: MEND vs FT vs FT+KL vs untrained MEND on the bundled test
split (unseen subjects, held-out paraphrase templates), single edits and batches, each case a
fresh edit of the base model. Prints a Markdown table, writes JSON and a bar chart.

Usage: python bench/eval_suite.py [--limit 100] [--configs mend:1,mend:5,...] [--set KEY=VALUE ...]
       [--out bench/results/eval.json] [--plot docs/eval.png]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import add_settings_arg, parse_settings, temp_workspace, write_json  # noqa: E402

from mendctl.editors.data import load_split  # noqa: E402
from mendctl.evaluate import evaluate  # noqa: E402
from mendctl.workspace import Workspace  # noqa: E402
from tqdm import tqdm  # noqa: E402

# editor:batch[:max_steps] (no max_steps: the editor's operating point, else 1)
DEFAULT = ("mend:1,mend:1:3,identity:1,ft:1,ft_kl:1,mend:5,identity:5,ft:5,ft_kl:5,"
           "mend:25,identity:25,ft:25,ft_kl:25")


def fmt(v, f=".3f"):
    return "-" if v is None else format(v, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=60)  # 60 cases × 7 configs ≈ 30 min on 2 cores
    ap.add_argument("--ppl-passages", type=int, default=3)
    ap.add_argument("--configs", default=DEFAULT)
    ap.add_argument("--out", default="bench/results/eval.json")
    ap.add_argument("--plot", default="docs/eval.png")
    ap.add_argument("--editor-dir", default=None, help="a MEND editor other than the shipped one")
    add_settings_arg(ap)
    a = ap.parse_args()
    settings = parse_settings(a.settings)
    root = temp_workspace(a.editor_dir, settings)
    ws = Workspace.open(str(root))
    cases = load_split("test")[: a.limit]
    results = {}
    prev = {}
    if Path(a.out).is_file():  # keep configs measured earlier, so runs can be split
        prev = json.loads(Path(a.out).read_text()).get("results", {})
    merged = prev
    for cfg in filter(None, a.configs.split(",")):  # --configs "" redraws from the JSON
        editor, bs, *rest = cfg.split(":")
        t = time.time()
        r = evaluate(ws, cases, editor=editor, batch_size=int(bs), max_steps=int(rest[0]) if rest else None,
                     ppl_passages=a.ppl_passages,
                     progress=lambda xs: tqdm(xs, desc=cfg, file=sys.stderr))
        r["summary"]["wall_seconds"] = time.time() - t
        results[cfg] = {"summary": r["summary"], "relations": r["relations"]}
        merged = {**prev, **results}
        write_json(a.out, {"cases": len(cases), "split": "test", "results": merged,
                           "editor": str(ws.editor_dir()), "settings": settings})  # after each config: runs can be split
    print("| editor | batch | max steps | edit success | paraphrase success | locality | KL | ppl drawdown | ms/edit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cfg, r in merged.items():
        s = r["summary"]
        print(f"| {s['editor']} | {s['batch_size']} | {s.get('max_steps', 1)} | {fmt(s['edit_success'])} | "
              f"{fmt(s['paraphrase_success'])} | {fmt(s['locality'])} | {fmt(s['locality_kl'], '.4f')} | "
              f"{fmt(s['ppl_drawdown'], '+.4f')} | {fmt(1000 * s['seconds_per_edit'], '.0f')} |")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = ["edit_success", "paraphrase_success", "locality"]
        fig, ax = plt.subplots(figsize=(8, 3.6))
        w = 0.8 / len(merged)
        for i, (cfg, r) in enumerate(merged.items()):
            vals = [r["summary"][k] or 0 for k in keys]
            ax.bar([j + i * w for j in range(len(keys))], vals, w, label=cfg)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(keys))], ["edit success", "paraphrase", "locality"])
        ax.set_ylim(0, 1.05)
        ax.set_title(f"SmolLM2-135M, bundled test split ({len(cases)} cases)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="editor:batch[:steps]",
                  title_fontsize=7)
        fig.tight_layout()
        Path(a.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(a.plot, dpi=120)
        print(f"wrote {a.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
