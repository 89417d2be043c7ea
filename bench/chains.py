"""Chain health of MEND editors, compared in one run: a split's cases in chains of L
single edits (each made on the state the chain's earlier edits left, every chain from
the base model), every edit re-scored on its chain's last state (`MendEditor.sweep_chain`, the
trainer's chain validation). Cheaper than bench/sequential.py (no workspace, no audit) and
averaged over several chains, so it compares editors; sequential.py measures what a user's
workspace records.

With `--protect both` every editor runs twice, without and with the retention guard (each
edit's ũ projected off the keys of the chain's earlier edits, editors/mend/protect.py).
Lists of step budgets, α factors (relative to the checkpoint's α) and preserved-key cuts
(mendctl/preserve.py's text; 0: off) run every combination, so a setting can be chosen on the
validation split (`--split val`) and then measured on the test split.

Usage: python bench/chains.py NAME=EDITOR_DIR [NAME=EDITOR_DIR ...] [--split test|val] [--length 10]
       [--limit 60] [--max-steps 1[,5,...]] [--alpha-factors 1[,0.5,...]] [--preserve 0[,1e-2,...]]
       [--protect off|on|both] [--guard-norm 3|off] [--out bench/results/chains.json]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_json  # noqa: E402

from tqdm import tqdm  # noqa: E402

from mendctl.editors.data import load_split  # noqa: E402
from mendctl.editors.mend.protect import preserved_basis  # noqa: E402
from mendctl.preserve import preserve_texts  # noqa: E402
from mendctl.editors.mend.editor import PROTECT_ENERGY, MendEditor  # noqa: E402
from mendctl.editors.weights import select_weights  # noqa: E402
from mendctl.models import load_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("editors", nargs="+", help="NAME=DIR of a MEND checkpoint for the default model")
    ap.add_argument("--length", type=int, default=10)
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--max-steps", default="1", help="comma list: steps per edit (the operating point's)")
    ap.add_argument("--protect", choices=["off", "on", "both"], default="off",
                    help="the retention guard")
    ap.add_argument("--protect-energy", type=float, default=PROTECT_ENERGY,
                    help="share of the protected keys' energy the guard spans")
    ap.add_argument("--alpha-factors", default="1",
                    help="comma list: each editor's α × this (on top of its operating point)")
    ap.add_argument("--preserve", default="0",
                    help="comma list of eigenvalue cuts: ũ also kept off the preserved-key subspace "
                         "of train prompts and generic text (0: off)")
    ap.add_argument("--guard-norm", default="3", help="× the editor's median single edit, or off")
    ap.add_argument("--out", default="bench/results/chains.json")
    a = ap.parse_args()
    lm = load_model("smollm2-135m")
    specs = select_weights(lm.model, ["auto"])
    cases = load_split(a.split)[: a.limit]
    references: dict = {}  # the base model's locality references, shared by every editor
    rows = []
    cuts = [float(x) for x in a.preserve.split(",")]
    preserved = {}
    if any(cuts):
        texts = preserve_texts()
        for cut in cuts:
            if cut:
                preserved[cut] = preserved_basis(lm.model, lm.tokenizer, specs, texts, cut)
                print(f"preserve {cut:g}: ranks", {n.split('.')[2] + n.split('.')[4][:2]: b.shape[1]
                                                   for n, b in preserved[cut].items()}, file=sys.stderr)
    for spec in a.editors:
        name, _, path = spec.partition("=")
        ed = MendEditor.load(Path(path), specs, lm.base_hash)
        median = (ed.info.get("delta_norm_reference") or {}).get("median")
        guard = None if a.guard_norm == "off" or not median else float(a.guard_norm) * median
        shipped_factor = ed.info.get("operating_point", {}).get("alpha_factor_total")
        for cut, factor, steps, protect in [
                (c, f, k, p) for c in cuts for f in [float(x) for x in a.alpha_factors.split(",")]
                for k in [int(x) for x in a.max_steps.split(",")]
                for p in {"off": [False], "on": [True], "both": [False, True]}[a.protect]]:
            ed = MendEditor.load(Path(path), specs, lm.base_hash)
            if factor != 1:
                ed.rescale(factor)  # relative to the checkpoint's own α (its operating point)
            label = (f"{name}+protect" if protect else name) + (f" α×{factor:g}" if factor != 1 else "") + f" ≤{steps}" + (f" preserve{cut:g}" if cut else "")
            t = time.time()
            bar = lambda xs, label=label: tqdm(xs, desc=label, file=sys.stderr)  # noqa: E731
            r = ed.sweep_chain(lm.model, lm.tokenizer, cases, a.length,
                               ed.info.get("prompt_format", "raw"), progress=bar,
                               references=references, max_norm=guard, max_steps=steps,
                               protect=protect, protect_energy=a.protect_energy,
                               preserve=preserved.get(cut))
            rows.append({"editor": label, "dir": str(path), "chain_length": a.length,
                         "cases": len(cases), "max_steps": steps, "protect": protect,
                         "alpha_factor": factor, "preserve_cut": cut or None, "checkpoint_alpha_factor": shipped_factor,
                         "protect_energy": a.protect_energy if protect else None,
                         "guard_max_norm": guard, "seconds": time.time() - t, **r})
            print(rows[-1], file=sys.stderr, flush=True)
    cols = ["editor", "immediate_edit_success", "edit_success", "paraphrase_success", "locality"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    print(table([{c: fmt(r.get(c)) for c in cols} for r in rows], cols))
    write_json(a.out, {"split": a.split, "rows": rows})


if __name__ == "__main__":
    main()
