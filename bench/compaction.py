"""Stored size of a workspace's MEND deltas with and without compaction (`Delta.compacted`):
for every entry, factor rows and bytes as stored ÷ dense ΔW bytes, what compaction leaves, and
the relative error it makes in ΔW (Frobenius and largest entry, worst weight). Deltas recorded
since compaction became part of the edit are already compacted (no change then).

Usage: python bench/compaction.py WORKSPACE [--out bench/results/compaction.json]
  e.g. the workspace `python bench/sequential.py --lengths 10 --editors mend --no-matrix` prints
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_json  # noqa: E402

from mendctl.workspace import Workspace  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workspace")
    ap.add_argument("--out", default="bench/results/compaction.json")
    a = ap.parse_args()
    ws = Workspace.open(a.workspace)
    rows = []
    for e in ws.ledger.entries(reverse=False):
        if not e.delta_sha256:
            continue
        d = ws.store.load(e.delta_sha256)
        c = d.compacted()
        err = max(float((c.layers[n].to_dense().double() - l.to_dense().double()).norm()
                        / l.to_dense().double().norm().clamp_min(1e-30)) for n, l in d.layers.items())
        dense = d.dense_nbytes()
        rows.append({"entry": e.id, "edit_steps": (e.notes or {}).get("edit_steps"),
                     "factor_rows": c.meta["factor_rows"],
                     "stored_pct_of_dense": round(100 * d.nbytes() / dense, 2),
                     "compacted_pct_of_dense": round(100 * c.nbytes() / dense, 2),
                     "relative_error": f"{err:.1e}"})
    print(table(rows, list(rows[0]) if rows else ["entry"]))
    write_json(a.out, {"workspace": str(ws.root), "rows": rows})


if __name__ == "__main__":
    main()
