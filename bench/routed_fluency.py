"""Routed edits' answers: do they read as the target followed by ordinary text, or does the
edit act on its own output and repeat it? Two routed workspaces on the default model with the
shipped editor, the only difference `stop` (an edit stops acting once its answer is written or
leaves the target's path; editors/route.py), each scoring the same test-split cases as
`mendctl eval` does: edit success, paraphrase success, locality, the fluency of the answer to
the edited prompt (n-gram entropy of 24 greedy tokens) beside the unedited model's, and the
share of answers that write the target more than once.

Usage: python bench/routed_fluency.py [--cases 40] [--offset 0] [--out bench/results/routed_fluency.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, temp_workspace, write_json  # noqa: E402

from tqdm import tqdm  # noqa: E402

from mendctl.editors.data import load_split  # noqa: E402
from mendctl.evaluate import evaluate  # noqa: E402
from mendctl.workspace import Workspace  # noqa: E402

KEYS = ["edit_success", "paraphrase_success", "locality", "fluency", "fluency_base",
        "repeats_target", "seconds_per_edit"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--out", default="bench/results/routed_fluency.json")
    a = ap.parse_args()
    cases = load_split("test")[a.offset:a.offset + a.cases]
    out = {"cases": len(cases), "offset": a.offset, "runs": {}}
    rows = []
    for stop in (False, True):
        ws = Workspace.open(str(temp_workspace(settings={"routing": {"stop": stop}})))
        r = evaluate(ws, cases, progress=lambda xs: tqdm(xs, desc=f"stop={stop}", file=sys.stderr))
        out["runs"][f"stop={stop}"] = {"summary": r["summary"],
                                       "answers": [(c["input"], c["target"], c["answer"])
                                                   for c in r["cases"]]}
        s = r["summary"]
        rows.append({"stop": stop, **{k: f"{s[k]:.3f}" for k in KEYS}})
    print(table(rows, ["stop"] + KEYS))
    write_json(a.out, out)


if __name__ == "__main__":
    main()
