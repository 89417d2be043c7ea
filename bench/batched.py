"""Batched edits: N facts in one edit, at the default settings (routed: each fact its own delta
and gate, computed together), against the same facts edited one at a time.

Quality: the first `--cases` facts of the bundled test split, in batches of N = 1, 5, 25, 100,
each batch a fresh edit of the base model scored as `mendctl eval --batch-size N` scores it
(every fact of the batch on the state with the whole batch applied): edit success,
paraphrase success, locality (by kind of prompt, and on the prompts that name none of the
batch's subjects: a neighbour prompt of one fact may name another fact's subject), fluency, stored bytes per fact as a share of
the dense weights one fact's delta touches.

Time, everything included, as a user meets it: `mendctl edit` of one fact in a new process
(model load, gate space from the cache, probes, health check, ledger), median of three, against
`mendctl edit --batch` of the `--cases` facts in one process, per fact.

Usage: python bench/batched.py [--cases 100] [--sizes 1,5,25,100] [--only quality|timing]
           [--out bench/results/batched.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, temp_workspace, write_json  # noqa: E402

from tqdm import tqdm  # noqa: E402

from mendctl.editors.data import load_split  # noqa: E402
from mendctl.evaluate import evaluate  # noqa: E402
from mendctl.health import base_reference  # noqa: E402
from mendctl.workspace import Workspace  # noqa: E402

KEYS = ["edit_success", "paraphrase_success", "locality", "locality_unnamed", "locality_neighbour",
        "locality_other", "locality_same_subject", "fluency", "fluency_base", "repeats_target", "stored_share",
        "seconds_per_edit"]


def quality(cases, sizes: list[int]) -> list[dict]:
    ws = Workspace.open(str(temp_workspace()))
    try:
        out = []
        for n in sizes:
            r = evaluate(ws, cases, batch_size=n, ppl_passages=0,
                         progress=lambda xs, n=n: tqdm(xs, desc=f"batch {n}", file=sys.stderr))
            out.append(r["summary"])
        return out
    finally:
        ws.ledger.close()


def mendctl(root: Path, *args: str) -> float:
    """Seconds for one `mendctl` process, start to exit."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mendctl", "-w", str(root), *args],
                       capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if r.returncode not in (0, 3):  # 3: an edit that did not take (then nothing is recorded)
        raise SystemExit(f"mendctl {' '.join(args[:2])} failed: {r.stderr[-2000:]}")
    return seconds


def timing(cases) -> dict:
    single_root, batch_root = temp_workspace(), temp_workspace()
    for root in (single_root, batch_root):
        # what a workspace computes once, at its first edit, and caches: the gate space and
        # the base model's audit-set answers (left out of both, or the first edit pays them)
        w = Workspace.open(str(root))
        w.router.space(w.config.routing["layer"])
        base_reference(w)
        w.ledger.close()
    singles = [mendctl(single_root, "edit", "--input", c.input, "--target", c.target,
                       *sum((["--paraphrase", p] for p in c.paraphrases), []),
                       *sum((["--locality", p] for p in c.locality), []), "--keep-failed")
               for c in cases[:3]]
    with tempfile.TemporaryDirectory() as tmp:
        facts = Path(tmp) / "facts.jsonl"
        facts.write_text("".join(json.dumps(c.to_dict()) + "\n" for c in cases))
        batch = mendctl(batch_root, "edit", "--batch", str(facts), "--keep-failed")
    w = Workspace.open(str(batch_root))
    recorded = len(w.head().active_ids) if w.head() else 0
    w.ledger.close()
    single = statistics.median(singles)
    return {"single_edit_seconds": singles, "single_edit_median": single,
            "batch_facts": len(cases), "batch_seconds": batch, "batch_entries": recorded,
            "batch_seconds_per_fact": batch / len(cases),
            "per_fact_over_single": batch / len(cases) / single}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=100, help="first N cases of the test split")
    ap.add_argument("--sizes", default="1,5,25,100")
    ap.add_argument("--only", choices=["quality", "timing"],
                    help="run one part; the other part's figures stay as they are in --out")
    ap.add_argument("--out", default="bench/results/batched.json")
    a = ap.parse_args()
    cases = load_split("test")[: a.cases]
    sizes = [int(x) for x in a.sizes.split(",")]
    out = json.loads(Path(a.out).read_text()) if a.only and Path(a.out).is_file() else {}
    out["cases"] = len(cases)
    if a.only != "timing":  # (with --only, the other batch sizes' rows stay)
        new = quality(cases, sizes)
        out["quality"] = sorted([q for q in out.get("quality", []) if q["batch_size"] not in sizes]
                                + new, key=lambda q: q["batch_size"])
    rows = [{"batch": s["batch_size"], "cases": s["cases"],
             **{k: "-" if s.get(k) is None else f"{s[k]:.3f}" for k in KEYS}}
            for s in out.get("quality", [])]
    print(table(rows, ["batch", "cases"] + KEYS))
    if a.only != "quality":
        t = timing(cases)
        out["timing"] = t
        print(f"\none recorded edit (new process, median of 3): {t['single_edit_median']:.1f} s; "
              f"a batch of {t['batch_facts']} in one process: {t['batch_seconds']:.1f} s = "
              f"{t['batch_seconds_per_fact']:.2f} s per fact ({t['per_fact_over_single']:.3f} × one "
              f"edit); {t['batch_entries']} entries recorded")
    write_json(a.out, out)


if __name__ == "__main__":
    main()
