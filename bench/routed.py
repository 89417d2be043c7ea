"""Routed MEND edits in chains (mendctl/editors/route.py): each edit's ΔW gated on whether the
sequence mentions the edit's subject, against the same chains edited as plain weights.

Chains of L distinct edits of a split (every chain from the base model); each edit is made on
the chain's routed state so far (up to `--max-steps` steps, α × `--alpha-factor` of the
checkpoint's), then scored as bench/chains.py scores: immediate edit success (right after it),
and on the chain's last state every edit's success, its paraphrases' success and its own
locality prompts against the base (first 2 prompts, answer + 1 greedy token), plus the standard
audit set's top-1 agreement with the base (audit.standard_audit_set: held-out neighbourhood
prompts and generic text). The gate space comes from the train split's prompts, never edited.
Gate layer, key cut and τ are lists: every combination runs on the same edits (routing does
not change how an edit is made, only where it acts), so they can be chosen on `--split val`.

Usage: python bench/routed.py [--split val|test] [--length 100] [--limit 100]
       [--layers 3] [--distinct 0.7] [--tau 0.7,0.8] [--alpha-factor 1] [--max-steps 3]
       [--plain] [--out bench/results/routed.json]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_json  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mendctl.audit import standard_audit_set  # noqa: E402
from mendctl.editors.data import load_split  # noqa: E402
from mendctl.editors.mend.editor import MendEditor, _stack  # noqa: E402
from mendctl.editors.metrics import (edit_success, locality_reference, locality_scores,  # noqa: E402
                                     top1_agreement)
from mendctl.editors.route import (DISTINCT, TAU, Gate, RoutedEdit, edit_gate, gate_space,  # noqa: E402
                                   open_at_end, opens, routed)  # noqa: E402
from mendctl.editors.weights import applied, select_weights  # noqa: E402
from mendctl.models import load_model  # noqa: E402

EDITOR = Path(__file__).resolve().parents[1] / "src" / "mendctl" / "editors" / "checkpoints" / "smollm2-135m"


def floats(s):
    return [float(x) for x in s.split(",")]


#: short neutral texts an edit is also made after (`--contexts`): the idea of ROME's context
#: templates (an edit that holds after varied text generalises to other wordings). Fixed, not
#: generated: SmolLM2-135M's greedy continuations of single words are mostly punctuation.
CONTEXTS = ["Here is a fact.", "Did you know?", "I read this somewhere.", "Quick question.", "Fun fact:"]


def gate_of(gate, words=True):
    return gate if words else Gate(gate.keys)


def score(model, tok, chain, refs, audit_ref, subjects, ctx, fmt):
    """Last-state figures of one chain under `ctx` (the routed or weight-applied state).
    `locality_unnamed`: locality on the prompts that name no other subject edited in the chain
    (a neighbour prompt about another edited subject may rightly change)."""
    r = {"edit_success": [], "paraphrase_success": [], "locality": [], "locality_unnamed": []}
    with ctx():
        for c in chain:
            r["edit_success"] += edit_success(model, tok, [c.input], [c.target], fmt)
            if c.paraphrases:
                r["paraphrase_success"] += edit_success(model, tok, c.paraphrases,
                                                        [c.target] * len(c.paraphrases), fmt)
            if c.locality:
                agree = locality_scores(model, refs[c.input])[0]
                r["locality"] += agree
                others = subjects - {c.meta.get("subject")}
                r["locality_unnamed"] += [x for x, p in zip(agree, c.locality[:2])
                                          if not any(s in p for s in others)]
        r["audit_agreement"] = top1_agreement(model, audit_ref)
    return r


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("immediate_edit_success", "immediate ES"), ("edit_success", "retained ES"),
            ("paraphrase_success", "paraphrase"), ("locality_unnamed", "locality vs base\n(no edited subject named)"),
            ("audit_agreement", "audit-set agreement")]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(keys))]
        bars = ax.bar(xs, [float("nan") if r.get(k) is None else r[k] for k, _ in keys], width,
                      label=r["mode"])  # nan: not measured for that row, no bar
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], [n for _, n in keys])
    ax.set_ylim(0, 1.12)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(rows))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--length", type=int, default=100)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--layers", default="3", help="comma list: gate layers (hidden state index)")
    ap.add_argument("--distinct", default=str(DISTINCT), help="comma list: gate-key cuts")
    ap.add_argument("--tau", default=str(TAU), help="comma list: gate thresholds")
    ap.add_argument("--margin", default="off",
                    help="comma list: gate margins (open only within this of the best score), or off")
    ap.add_argument("--alpha-factor", type=float, default=1.0,
                    help="α × this, relative to the checkpoint's α")
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--guard-norm", default="3", help="× the editor's median single edit, or off")
    ap.add_argument("--contexts", type=int, default=0,
                    help="also edit on the prompt after this many of CONTEXTS (short neutral "
                         "texts, after ROME's context templates), as one batched edit")
    ap.add_argument("--no-words", action="store_true",
                    help="gates on hidden states only (no gate words)")
    ap.add_argument("--plain", action="store_true",
                    help="also score the same deltas applied as plain weights (no gates)")
    ap.add_argument("--out", default="bench/results/routed.json")
    ap.add_argument("--plot", help="also draw the rows' figures as grouped bars to this PNG")
    a = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model("smollm2-135m")
    model, tok = lm.model, lm.tokenizer
    specs = select_weights(model, ["auto"])
    ed = MendEditor.load(EDITOR, specs, lm.base_hash)
    if a.alpha_factor != 1:
        ed.rescale(a.alpha_factor)
    fmt = ed.info.get("prompt_format", "raw")
    median = (ed.info.get("delta_norm_reference") or {}).get("median")
    guard = None if a.guard_norm == "off" or not median else float(a.guard_norm) * median
    cases = load_split(a.split)[: a.limit]
    prefixes = CONTEXTS[:a.contexts]
    if prefixes:
        print(f"contexts: {prefixes}", file=sys.stderr)
    chains = [cases[i:i + a.length] for i in range(0, len(cases), a.length)]
    train = load_split("train")
    bank_prompts = [c.input for c in train[:600]] + [c.paraphrases[0] for c in train[:300] if c.paraphrases]
    t0 = time.time()
    spaces = {L: gate_space(model, tok, bank_prompts, L, fmt) for L in map(int, floats(a.layers))}
    print(f"gate spaces: {time.time() - t0:.1f} s", file=sys.stderr)
    refs = {c.input: locality_reference(model, tok, c.locality[:2], fmt, n_new=2)
            for c in cases if c.locality}
    audit_ref = locality_reference(model, tok, standard_audit_set().prompts, fmt, n_new=4)
    margins = [None if m == "off" else float(m) for m in a.margin.split(",")]
    configs = [(L, d, t, m) for L in spaces for d in floats(a.distinct) for t in floats(a.tau)
               for m in margins]
    # the edits are made under the first configuration's routing; the others re-score them
    gate_layer, tau0, margin0 = configs[0][0], configs[0][2], configs[0][3]
    fields = ["edit_success", "paraphrase_success", "locality", "locality_unnamed", "audit_agreement"]
    results = {cfg: {k: [] for k in ["immediate_edit_success", *fields, "gate_open_paraphrases",
                                     "gate_open_own_locality"]} for cfg in configs}
    plain = {k: [] for k in fields}
    steps, seconds, per_case = [], [], []
    for chain in tqdm(chains, desc="chains", file=sys.stderr):
        deltas, keys = [], {cfg: [] for cfg in configs}
        subjects = {c.meta.get("subject") for c in chain} - {None}
        for c in tqdm(chain, desc="edits", leave=False, file=sys.stderr):
            t = time.time()
            for cfg in configs:
                keys[cfg].append(gate_of(edit_gate(model, tok, spaces[cfg[0]], c.input, fmt, distinct=cfg[1]),
                                          not a.no_words))
            made = [RoutedEdit(dl, k) for dl, k in zip(deltas, keys[configs[0]])]
            new = keys[configs[0]][-1]
            # the earlier edits routed; this edit's own steps routed too (its gate, its τ), so
            # it takes steps until it holds as it will be used
            with routed(model, made, spaces[gate_layer], tau0, tok, margin0):
                inputs = [c.input] + [f"{p} {c.input}" for p in prefixes]
                delta = ed.edit(model, tok, inputs, [c.target] * len(inputs), fmt, max_steps=a.max_steps,
                                max_norm=guard and guard * len(inputs) ** 0.5, apply=lambda d, new=new: routed(
                                    model, [RoutedEdit(d, new)], spaces[gate_layer], tau0, tok))
            seconds.append(time.time() - t)
            steps.append(int(delta.meta["edit_steps"]))
            deltas.append(delta)
            for cfg in configs:
                with routed(model, [RoutedEdit(x, k) for x, k in zip(deltas, keys[cfg])],
                            spaces[cfg[0]], cfg[2], tok, cfg[3]):
                    results[cfg]["immediate_edit_success"] += edit_success(
                        model, tok, [c.input], [c.target], fmt)
        for cfg in configs:
            L, _, tau, margin = cfg
            edits = [RoutedEdit(x, k) for x, k in zip(deltas, keys[cfg])]
            r = score(model, tok, chain, refs, audit_ref, subjects,
                      lambda edits=edits, cfg=cfg: routed(model, edits, spaces[cfg[0]], cfg[2], tok, cfg[3]), fmt)
            for k, v in r.items():
                results[cfg][k] += v
            if cfg == configs[0]:  # which edits were kept, for the first configuration
                n = len(results[cfg]["edit_success"])
                # which other edits' gates are open where each edit's answer is predicted
                cross = open_at_end(model, tok, spaces[L], keys[cfg], [c.input for c in chain], tau, fmt, margin)
                cross.fill_diagonal_(False)
                per_case += [{"case_id": c.meta.get("case_id"), "subject": c.meta.get("subject"),
                              "gate_words": list(k.words), "immediate": imm, "retained": kept,
                              "other_gates_open": [chain[j].meta.get("case_id") for j in row.nonzero().flatten().tolist()]}
                             for c, k, imm, kept, row in zip(
                                 chain, keys[cfg], results[cfg]["immediate_edit_success"][n - len(chain):],
                                 r["edit_success"], cross)]
            for c, k in zip(chain, keys[cfg]):  # does each edit's own gate open where it should?
                results[cfg]["gate_open_paraphrases"] += opens(model, tok, spaces[L], k, c.paraphrases, tau, fmt)
                results[cfg]["gate_open_own_locality"] += opens(model, tok, spaces[L], k, c.locality[:2], tau, fmt)
        if a.plain:
            total = deltas[0]
            for x in deltas[1:]:
                total = _stack(total, x)
            r = score(model, tok, chain, refs, audit_ref, subjects,
                      lambda total=total: applied(model, total), fmt)
            for k, v in r.items():
                plain[k] += v
    # what routing costs a forward pass: the audit set's prompts, base vs the last chain routed
    last = [RoutedEdit(x, k) for x, k in zip(deltas, keys[configs[0]])]
    timing = {}
    for label, ctx in (("base", None), ("routed", lambda: routed(model, last, spaces[gate_layer], tau0, tok, margin0))):
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            if ctx is None:
                top1_agreement(model, audit_ref)
            else:
                with ctx():
                    top1_agreement(model, audit_ref)
            best = min(best, time.perf_counter() - t)
        timing[label] = best
    timing["ratio"] = timing["routed"] / timing["base"]
    timing["edits"] = len(last)
    print(f"forward of the audit set: base {timing['base']:.3f} s, with {len(last)} routed edits "
          f"{timing['routed']:.3f} s ({timing['ratio']:.2f}×)", file=sys.stderr)
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else None  # noqa: E731
    rows = [{"mode": f"routed L{L} keys<{d:g} τ {t:g}" + (" no words" if a.no_words else " + words")
             + (f" margin {m:g}" if m is not None else ""),
             "gate_layer": L, "distinct": d, "tau": t, "margin": m, "words": not a.no_words,
             **{k: mean(v) for k, v in results[(L, d, t, m)].items()}} for (L, d, t, m) in configs]
    if a.plain:
        rows.append({"mode": "same deltas as plain weights", **{k: mean(v) for k, v in plain.items()}})
    cols = ["mode", "immediate_edit_success", "edit_success", "paraphrase_success", "locality",
            "locality_unnamed", "audit_agreement", "gate_open_paraphrases", "gate_open_own_locality"]
    fmt_ = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    print(table([{c: fmt_(r.get(c)) for c in cols} for r in rows], cols))
    if a.plot:
        plot(rows, a.plot, f"{a.split} split, one chain of {a.length} edits" if len(chains) == 1
             else f"{a.split} split, {len(chains)} chains of {a.length} edits")
    write_json(a.out, {"split": a.split, "chain_length": a.length, "cases": len(cases),
                       "alpha_factor": a.alpha_factor, "max_steps": a.max_steps,
                       "guard_max_norm": guard, "mean_steps": mean(steps), "contexts": prefixes,
                       "median_edit_seconds": sorted(seconds)[len(seconds) // 2],
                       "forward_seconds": timing, "rows": rows, "per_case": per_case})


if __name__ == "__main__":
    main()
