"""`mendctl edit --each` throughput: N facts of the bundled test split made one after another in
a fresh routed workspace on the default model, each its own ledger entry (delta file, ledger
row, chain-health check), in one process, as the CLI does it. The gate space is computed
before the clock starts (once per machine, cached). A second workspace with `health_check:
false` shows what the after-edit health check costs. With `--audit`, the first workspace's
chain is then audited as a user audits it (`mendctl audit --json` in a new process, the
retention matrix included), timed from the command's start to its end.

Usage: python bench/each_speed.py [--facts 30] [--audit] [--out bench/results/each_speed.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, temp_workspace, write_json  # noqa: E402

from mendctl.editors.data import load_split  # noqa: E402
from mendctl.workspace import Workspace  # noqa: E402
from mendctl.edit import edit_each  # noqa: E402


def run(cases, settings: dict, audit: bool = False) -> dict:
    root = temp_workspace(settings=settings)
    ws = Workspace.open(str(root))
    try:
        ws.router.space(ws.config.routing["layer"])
        _ = ws.lm
        t = time.perf_counter()
        r = edit_each(ws, cases, command="bench")
        wall = time.perf_counter() - t
    finally:
        ws.ledger.close()
    out = {"seconds_per_fact": wall / len(cases), "counts": r["counts"],
           "editor_seconds_per_fact": sum(f.get("seconds", 0) for f in r["facts"]) / len(cases)}
    if audit:
        t = time.perf_counter()
        a = subprocess.run([sys.executable, "-m", "mendctl", "-w", str(root), "audit", "--json"],
                           capture_output=True, text=True, check=True)
        out["audit_seconds"] = time.perf_counter() - t
        report = json.loads(a.stdout)
        out["audit"] = {k: v for k, v in report.items() if isinstance(v, (int, float, str, type(None)))}
        out["audit"]["matrix_cost"] = report["chain"]["cost"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=30)
    ap.add_argument("--audit", action="store_true", help="audit the default workspace's chain after")
    ap.add_argument("--out", default="bench/results/each_speed.json")
    a = ap.parse_args()
    cases = load_split("test")[: a.facts]
    out = {"facts": len(cases), "runs": {}}
    rows = []
    for name, settings in (("default", {}), ("health_check: false", {"health_check": False})):
        r = run(cases, settings, a.audit and not settings)
        out["runs"][name] = r
        rows.append({"workspace": name, "s per fact": f"{r['seconds_per_fact']:.2f}",
                     "of which the editor": f"{r['editor_seconds_per_fact']:.2f}",
                     "recorded": r["counts"]["recorded"], "failed": r["counts"]["failed"],
                     "audit s": f"{r['audit_seconds']:.0f}" if "audit_seconds" in r else "-"})
    print(table(rows, ["workspace", "s per fact", "of which the editor", "recorded", "failed", "audit s"]))
    write_json(a.out, out)


if __name__ == "__main__":
    main()
