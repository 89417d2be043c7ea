"""Ledger and storage costs on the embedded default model, measured in one run:

- stored bytes per MEND edit ÷ the dense ΔW bytes of the same edit (edits of ≤ 12 tokens);
- `replay --verify` of an N-edit chain ÷ loading the base model (both in this process);
- `mendctl edit` end to end (a subprocess: Python start, imports, model load, edit, probes,
  commit) ÷ a bare model load in a Python subprocess (start, imports, load).

Usage: python bench/ledger.py [--chain 100] [--out bench/results/ledger.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import peak_rss_mib, table, write_json  # noqa: E402

from mendctl.editors.data import EditCase, load_split  # noqa: E402
from mendctl.models import load_model  # noqa: E402
from mendctl.workspace import Workspace  # noqa: E402
from tqdm import tqdm  # noqa: E402
from mendctl.replay import verify_chain  # noqa: E402
from mendctl.edit import edit  # noqa: E402


def timed_subprocess(args, cwd) -> float:
    t = time.perf_counter()
    subprocess.run(args, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chain", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/ledger.json")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mendctl-bench-"))
    root = Workspace.init(tmp / "ws")
    ws = Workspace.open(str(root))
    cases = load_split("test")[: a.chain]
    ratios, tokens = [], []
    for c in tqdm(cases, desc="chain", file=sys.stderr):
        r = edit(ws, [EditCase(input=c.input, target=c.target)], command="bench/ledger.py",
                    keep_failed=True)
        n = len(ws.lm.tokenizer(c.input).input_ids) + len(ws.lm.tokenizer(" " + c.target).input_ids)
        if n <= 12:
            ratios.append(r["delta_bytes"] / r["dense_bytes"])
        tokens.append(n)
    # replay --verify of the whole chain vs a base-model load, same process, best of repeats
    replay_s = min(_t(lambda: verify_chain(ws)) for _ in range(a.repeats))
    head = ws.ledger.head()
    # rebuilding the head alone: read + verify every delta file, add them in order, hash once
    rebuild_s = min(_t(lambda: ws.weights_for(list(head.active_ids), head.state_hash, use_cache=False))
                    for _ in range(a.repeats))
    load_s = min(_t(lambda: load_model(ws.config.model)) for _ in range(a.repeats))
    ok = verify_chain(ws)["ok"]
    # end to end through the CLI vs a bare load in a fresh Python
    exe = [sys.executable, "-m", "mendctl"]
    bare = [sys.executable, "-c", "from mendctl.models import load_model; load_model('smollm2-135m')"]
    c = load_split("test")[a.chain]
    e2e, bare_t = [], []
    for i in range(a.repeats):
        bare_t.append(timed_subprocess(bare, root))
        e2e.append(timed_subprocess(exe + ["edit", "--input", c.input, "--target", c.target], root))
        # keep the chain length fixed: revert what we just added (not timed)
        subprocess.run(exe + ["revert", str(ws.ledger.head().id)], cwd=root, check=True,
                       capture_output=True)
    result = {
        "chain_edits": len(cases), "edits_le_12_tokens": len(ratios),
        "stored_over_dense_median": statistics.median(ratios) if ratios else None,
        "stored_over_dense_max": max(ratios) if ratios else None,
        "tokens_median": statistics.median(tokens),
        "replay_verify_seconds": replay_s, "base_load_seconds": load_s,
        "replay_over_load": replay_s / load_s, "replay_verify_ok": ok,
        "rebuild_head_seconds": rebuild_s, "rebuild_head_over_load": rebuild_s / load_s,
        "edit_cli_seconds": min(e2e), "bare_load_subprocess_seconds": min(bare_t),
        "edit_cli_over_bare_load": min(e2e) / min(bare_t),
        "peak_rss_mib": peak_rss_mib(), "cpu_threads": os.cpu_count(),
    }
    rows = [
        {"measure": "stored / dense bytes (≤12-token edits, median)",
         "value": f"{100 * result['stored_over_dense_median']:.2f} %", "goal": "≤ 3 %"},
        {"measure": f"rebuild head from base + {len(cases)} deltas / base load",
         "value": f"{result['rebuild_head_over_load']:.2f} ({rebuild_s:.2f} s / {load_s:.2f} s)", "goal": "≤ 1.5"},
        {"measure": f"replay --verify of {len(cases)} edits (every state hashed) / base load",
         "value": f"{result['replay_over_load']:.2f} ({replay_s:.2f} s / {load_s:.2f} s)", "goal": "-"},
        {"measure": "mendctl edit end to end / bare load (subprocesses)",
         "value": f"{result['edit_cli_over_bare_load']:.2f} ({min(e2e):.1f} s / {min(bare_t):.1f} s)",
         "goal": "≤ 2"},
    ]
    print(table(rows, ["measure", "value", "goal"]))
    write_json(a.out, result)


def _t(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
