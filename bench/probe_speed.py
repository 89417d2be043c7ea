"""What a recorded edit spends besides the editor: the ledger's before/after answers (greedy
generation on the edit's prompt and paraphrases) and the locality references (greedy
continuations of the locality prompts). Both are batched; this measures them against calling
them one prompt at a time, in one run, on the first N test cases, and checks that both ways
give the same answers and the same top-1 continuations.

Usage: python bench/probe_speed.py [--cases 3] [--out bench/results/probe_speed.json]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_json  # noqa: E402

import torch  # noqa: E402

from mendctl.editors.data import load_split  # noqa: E402
from mendctl.editors.metrics import generate, locality_reference  # noqa: E402
from mendctl.models import load_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--out", default="bench/results/probe_speed.json")
    a = ap.parse_args()
    lm = load_model("smollm2-135m")
    m, tok = lm.model, lm.tokenizer
    cases = load_split("test")[: a.cases]
    asked = [p for c in cases for p in [c.input] + c.paraphrases]
    loc = [p for c in cases for p in c.locality]
    generate(m, tok, asked[:1], max_new_tokens=2)  # warm-up

    t = time.perf_counter()
    batched = generate(m, tok, asked, max_new_tokens=12)
    t_gen_b = time.perf_counter() - t
    t = time.perf_counter()
    single = [generate(m, tok, [p], max_new_tokens=12)[0] for p in asked]
    t_gen_s = time.perf_counter() - t

    t = time.perf_counter()
    ref = locality_reference(m, tok, loc)
    t_loc_b = time.perf_counter() - t
    t = time.perf_counter()
    refs = [locality_reference(m, tok, [p]) for p in loc]
    t_loc_s = time.perf_counter() - t
    same_top1 = all(torch.equal(ref.base_top1[ref.owner == i], r.base_top1) for i, r in enumerate(refs))

    rows = [
        {"what": "answers (generate, 12 tokens)", "prompts": len(asked), "one_by_one_s": t_gen_s,
         "batched_s": t_gen_b, "speedup": t_gen_s / t_gen_b,
         "identical": sum(x == y for x, y in zip(batched, single)) == len(asked)},
        {"what": "locality references (4 tokens)", "prompts": len(loc), "one_by_one_s": t_loc_s,
         "batched_s": t_loc_b, "speedup": t_loc_s / t_loc_b, "identical": same_top1},
    ]
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    cols = ["what", "prompts", "one_by_one_s", "batched_s", "speedup", "identical"]
    print(table([{c: fmt(r[c]) for c in cols} for r in rows], cols))
    write_json(a.out, {"threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
