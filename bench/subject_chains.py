"""Routed chains of subjects edited many times: the test split's first 1,000 facts restricted to
the first N subjects the split edits more than once (3–8 facts each: a company's headquarters,
CEO, sector and country; a country's capital, currency, language...), in the split's order,
made as one chain (`evaluate_chain`) once per routing variant, in one run.

This is the part of a long chain that loses (docs/results.md, the chain of 1,000): behind one
subject's gates every edit acts on every question about the subject. Variants:
- `select` (the default): each fact its own entry; of a subject's entries, the one whose
  relation wording the text best matches acts (editors/route.py, `select_open`);
- `together` (the default before it): an edit of a subject edited before is made together
  with the subject's earlier facts, its entry holding them all.

Usage: python bench/subject_chains.py [--subjects 25] [--variants select,together]
       [--out bench/results/subject_chains.json]
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import peak_rss_mib, table, temp_workspace, write_json  # noqa: E402

from tqdm import tqdm  # noqa: E402

from mendctl.config import ROUTING_DEFAULTS  # noqa: E402
from mendctl.editors.data import load_split  # noqa: E402
from mendctl.evaluate import evaluate_chain  # noqa: E402
from mendctl.workspace import Workspace  # noqa: E402

VARIANTS = {"select": {"select": True, "together": False},
            "together": {"select": False, "together": True}}


def subject_chain(n_subjects: int) -> list:
    """The test split's first 1,000 facts whose subject they name more than once, for the first
    `n_subjects` such subjects, in the split's order."""
    cases = load_split("test")[:1000]
    count = collections.Counter(c.meta["subject"] for c in cases)
    subjects = [s for s in dict.fromkeys(c.meta["subject"] for c in cases) if count[s] > 1]
    chosen = set(subjects[:n_subjects])
    return [c for c in cases if c.meta["subject"] in chosen]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=25)
    ap.add_argument("--variants", default="select,together")
    ap.add_argument("--out", default="bench/results/subject_chains.json")
    args = ap.parse_args()
    chain = subject_chain(args.subjects)
    print(f"{len(chain)} facts about {args.subjects} subjects", file=sys.stderr)
    rows, out = [], {"facts": len(chain), "subjects": args.subjects, "variants": {}}
    for name in args.variants.split(","):
        ws = Workspace.open(str(temp_workspace(settings={"routing": {**ROUTING_DEFAULTS,
                                                                      **VARIANTS[name]}})))
        t0 = time.perf_counter()
        try:
            r = evaluate_chain(ws, chain, progress=lambda xs: tqdm(xs, desc=name, file=sys.stderr,
                                                                  mininterval=30))
        finally:
            ws.ledger.close()
        s = r["summary"]
        f, i = s["final"], s["immediate"]
        out["variants"][name] = {**r, "minutes": round((time.perf_counter() - t0) / 60, 1)}
        rows.append({"variant": name, "final success": f"{f['edit_success']:.3f}",
                     "paraphrase": f"{f['paraphrase_success']:.3f}",
                     "locality": f"{f['locality']:.3f}", "KL": f"{f['locality_kl']:.2f}",
                     "unnamed": f"{f['locality_unnamed']:.3f}",
                     "same subject": f"{f['locality_same_subject']:.3f}",
                     "fluency (base)": f"{f['fluency']:.3f} ({f['fluency_base']:.3f})",
                     "right after: success / para": f"{i['edit_success']:.3f} / {i['paraphrase_success']:.3f}",
                     "s/edit": f"{s['seconds_per_edit']:.2f}",
                     "stored (max)": f"{100 * s['stored_share']:.1f}% ({100 * s['stored_share_max']:.1f}%)"})
    out["peak_rss_mib"] = round(peak_rss_mib())
    print(table(rows, list(rows[0])))
    write_json(args.out, out)


if __name__ == "__main__":
    main()
