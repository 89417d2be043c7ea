"""Where routed chains lose their edits: each `mendctl eval --chain T --json` result on the
bundled test split, its facts split by whether the chain edits their subject before or after
them, and the final edit success along the chain.

Reads the chain results already written (no model is loaded), prints a table, writes the
figures as JSON and draws final edit success against the fact's position in the chain (a
running mean), per chain and per group.

Usage: python bench/plot_chains.py [--results bench/results/eval_chain100_routed.json,...]
           [--out bench/results/chains_by_subject.json] [--plot docs/chains_routed.png]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_json  # noqa: E402

from mendctl.training import load_cases  # noqa: E402

DEFAULT = ",".join(f"bench/results/eval_chain{t}_routed.json" for t in (100, 500, 1000))


def mean(xs):
    return sum(xs) / len(xs) if xs else None


def split(result: dict, subjects: list[str]) -> dict:
    """Final and immediate edit success of the chain's facts, all of them and split by whether
    the chain edits the same subject before the fact, after it, both or neither."""
    cases = result["cases"]
    n = len(cases)
    before = [subjects[i] in subjects[:i] for i in range(n)]
    after = [subjects[i] in subjects[i + 1:n] for i in range(n)]
    groups = {"all": range(n),
              "subject edited once": [i for i in range(n) if not before[i] and not after[i]],
              "subject edited again later": [i for i in range(n) if not before[i] and after[i]],
              "subject edited before": [i for i in range(n) if before[i] and not after[i]],
              "subject edited before and later": [i for i in range(n) if before[i] and after[i]]}
    return {name: {"facts": len(ix),
                   "final_edit_success": mean([cases[i]["final_edit_success"] for i in ix]),
                   "immediate_edit_success": mean([cases[i]["immediate"]["edit_success"] for i in ix]),
                   "immediate_paraphrase_success": mean(
                       [cases[i]["immediate"]["paraphrase_success"] for i in ix
                        if cases[i]["immediate"]["paraphrase_success"] is not None])}
            for name, ix in groups.items()}


def running(xs: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, x in enumerate(xs):
        total += x - (xs[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=DEFAULT, help="chain results, comma-separated (missing "
                                                       "files are skipped)")
    ap.add_argument("--out", default="bench/results/chains_by_subject.json")
    ap.add_argument("--plot", default="docs/chains_routed.png")
    a = ap.parse_args()
    cases, _ = load_cases(None, "test", 0)
    subjects = [c.meta["subject"] for c in cases]
    out, rows, curves = {}, [], {}
    for path in a.results.split(","):
        if not Path(path).exists():
            print(f"skipped {path}: not written yet", file=sys.stderr)
            continue
        r = json.loads(Path(path).read_text())
        t = len(r["cases"])
        inputs = [c.input for c in cases[:t]]
        if [c["input"] for c in r["cases"]] != inputs:
            raise SystemExit(f"{path}: its facts are not the first {t} of the test split")
        out[t] = split(r, subjects)
        for name, s in out[t].items():
            rows.append({"chain": t, "facts": f"{name} ({s['facts']})",
                         **{k: "-" if s[k] is None else f"{s[k]:.3f}"
                            for k in ("final_edit_success", "immediate_edit_success",
                                      "immediate_paraphrase_success")}})
        count = Counter(subjects[:t])
        curves[t] = [(float(c["final_edit_success"]), count[subjects[i]] > 1)
                     for i, c in enumerate(r["cases"])]
    if not out:
        raise SystemExit("no chain results found; run `mendctl eval --chain T --json` first")
    print(table(rows, ["chain", "facts", "final_edit_success", "immediate_edit_success",
                       "immediate_paraphrase_success"]))
    write_json(a.out, {"results": a.results, "chains": out})
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for k, (t, pts) in enumerate(curves.items()):
            width, color = max(10, t // 20), f"C{k}"
            axes[0].plot(range(1, t + 1), running([x for x, _ in pts], width), color=color,
                         label=f"T = {t}")
            for shared, style in ((False, "-"), (True, "--")):
                ix = [i for i, (_, s) in enumerate(pts) if s == shared]
                if ix:
                    axes[1].plot([i + 1 for i in ix], running([pts[i][0] for i in ix], width),
                                 style, color=color,
                                 label=f"T = {t}, subject edited {'more than once' if shared else 'once'}")
        axes[0].set_title("all facts")
        axes[1].set_title("facts whose subject the chain edits once / more than once")
        for ax in axes:
            ax.set_xlabel("position of the fact in the chain")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_ylabel("final edit success (running mean)")
        fig.suptitle("Routed chains on the test split: which edits the final model still holds")
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
        print(f"wrote {a.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
