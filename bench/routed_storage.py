"""How small can a routed edit be stored? Single routed edits with each fact's ΔW truncated,
after every step, to the directions whose singular values exceed `rank_cut` × the largest
(routing's `rank_cut`; none: every direction kept, up to float rounding), scored as `mendctl
eval` scores them, against the stored bytes as a share of the dense weights the edit touches.

Usage: python bench/routed_storage.py [--cases 40] [--sets test,real] [--cuts none,0.01,0.05]
           [--out bench/results/routed_storage.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, temp_workspace, write_json  # noqa: E402
from general_editor import cases_of  # noqa: E402

from tqdm import tqdm  # noqa: E402

from mendctl.evaluate import evaluate  # noqa: E402
from mendctl.workspace import Workspace  # noqa: E402

KEYS = ["edit_success", "paraphrase_success", "locality", "locality_same_subject",
        "paraphrase_token_accuracy", "repeats_target", "stored_share", "seconds_per_edit"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=40, help="first N cases of each set")
    ap.add_argument("--sets", default="test,real")
    ap.add_argument("--cuts", default="none,0.01,0.05")
    ap.add_argument("--out", default="bench/results/routed_storage.json")
    a = ap.parse_args()
    out, rows = {"cases": a.cases, "runs": []}, []
    for cut in a.cuts.split(","):
        value = None if cut == "none" else float(cut)
        ws = Workspace.open(str(temp_workspace(settings={"routing": {"rank_cut": value}})))
        try:
            for name in a.sets.split(","):
                r = evaluate(ws, cases_of(name, a.cases), ppl_passages=0,
                             progress=lambda xs, d=f"cut {cut} {name}": tqdm(xs, desc=d, file=sys.stderr))
                s = r["summary"]
                out["runs"].append({"rank_cut": value, "set": name, "summary": s})
                rows.append({"rank_cut": cut, "set": f"{name} ({s['cases']})",
                             **{k: "-" if s.get(k) is None else f"{s[k]:.3f}" for k in KEYS}})
        finally:
            ws.ledger.close()
    print(table(rows, ["rank_cut", "set"] + KEYS))
    write_json(a.out, out)


if __name__ == "__main__":
    main()
