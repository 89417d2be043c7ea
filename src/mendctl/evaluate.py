"""`mendctl eval`: score an editor on edit cases, each (or each batch) a fresh edit of the
current model, with the field's metrics (see editors/metrics.py).

Per case: edit success, paraphrase success, locality (top-1 agreement with the unedited model
on the locality prompts' continuations, and mean KL), generic-text perplexity drawdown, the
fluency of the edited model's answer to the input (n-gram entropy of a greedy continuation,
beside the unedited model's on the same prompt) and whether it repeats the target, and the
editor's compute time. The model is put back after every edit, so cases do not accumulate.
In a routed workspace (`routing`) a MEND edit is made and scored as `mendctl edit` would make
it there: routed, each fact behind its own gate (a batch's facts made together); and each gate
is scored apart from its edit, so a miss can be attributed: its recall (the share of
paraphrases at whose end the gate is open), its false openings (the share of locality prompts
at whose end it is open), and the paraphrase success where the gate did open (the edit's own
generalisation).
"""
from __future__ import annotations

import re
import time
from pathlib import Path

from .editors.data import generic_text_samples
from .editors.metrics import (fluency_answers, locality_reference, locality_scores, ngram_entropy,
                              perplexity, repeats_target, target_scores)
from .editors.route import opens
from .editors.weights import applied
from .errors import InputError
from .edit import edit, edit_with


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(sum(xs) / len(xs)) if xs else None


def _by_kind(case, values: list[float]) -> dict[str, list[float]]:
    """`values` (one per locality prompt of `case`) grouped as `locality_<kind>` where the data
    labels its prompts (meta locality_kinds, as the bundled data does): neighbours (the same
    relation, another subject), other relations, the same subject's other facts."""
    kinds = case.meta.get("locality_kinds")
    out: dict[str, list[float]] = {}
    if isinstance(kinds, list) and len(kinds) == len(values):
        for kind, x in zip(kinds, values):
            out.setdefault(f"locality_{kind}", []).append(x)
    return out


def subject_pattern(cases) -> re.Pattern | None:
    """What finds, in a prompt, a subject one of `cases` edits (whole words, any case), or None
    when a case does not name its subject (meta `subject`). In a batch, one fact's locality
    prompt may name another fact's subject, which that fact's edit may rightly change:
    locality on the prompts naming none (`locality_unnamed`) tells such prompts apart."""
    subjects = [c.meta.get("subject") for c in cases]
    if not all(isinstance(x, str) and x.strip() for x in subjects):
        return None
    return re.compile("|".join(rf"(?<!\w){re.escape(x.strip())}(?!\w)" for x in subjects),
                      re.IGNORECASE)


def evaluate(ws, cases, editor: str = "mend", batch_size: int = 1, ppl_passages: int = 6,
             progress=None, max_steps: int | None = None) -> dict:
    if not cases:
        raise InputError("no cases to evaluate")
    if batch_size < 1:
        raise InputError("--batch-size must be ≥ 1")
    lm = ws.lm
    model, tok, fmt = lm.model, lm.tokenizer, ws.fmt
    head = ws.head()
    # as `mendctl edit` edits: the workspace's policy, for each batch's number of facts
    policy = ws.policy(editor, batch_size, max_steps)
    rs, max_steps = policy.routing, policy.max_steps
    ed = ws.editor_for(policy)
    # (computing the preserved keys loads the base state)
    preserve = ws.preserved(ed, policy.preserve_keys)
    ws.use_state(head)
    if rs:
        ws.router.space(rs["layer"])  # computed once per workspace (cached), not timed
    texts = generic_text_samples(ppl_passages) if ppl_passages else []
    ppl_before = perplexity(model, tok, texts) if texts else None
    batches = [cases[i:i + batch_size] for i in range(0, len(cases), batch_size)]
    rows = []
    it = progress(batches) if progress else batches
    for batch in it:
        loc = [p for c in batch for p in c.locality]
        ref = locality_reference(model, tok, loc, fmt) if loc else None
        prompts = [c.input for c in batch]
        base_answers = fluency_answers(model, tok, prompts, fmt)
        named = subject_pattern(batch)
        t0 = time.perf_counter()
        gates = []
        if rs:  # each fact behind its own gate, made together (as `edit.edit` makes them)
            gates, apply = ws.router.steppers(batch, rs, model, tok)
            deltas = ed.edit_apart(model, tok, prompts, [c.target for c in batch], fmt, max_steps,
                                   policy.max_norm, apply, rs.get("rank_cut"), rs.get("confidence"),
                                   rs.get("contexts"))
            ctx = apply(list(enumerate(deltas)))
        else:
            max_norm = ws.policy(editor, len(batch), max_steps).max_norm  # (a short last batch)
            deltas = [edit_with(ed, model, tok, batch, fmt, max_steps, max_norm, preserve=preserve)]
            ctx = applied(model, deltas[0])
        seconds = time.perf_counter() - t0
        # stored bytes per fact, as a share of the dense weights one fact's delta touches
        stored = sum(d.nbytes() for d in deltas) / len(batch) / deltas[0].dense_nbytes()
        with ctx:
            es, _, es_tok = target_scores(model, tok, [c.input for c in batch],
                                          [c.target for c in batch], fmt, token_accuracy=True)
            ag, kl = locality_scores(model, ref) if ref else ([], [])
            ppl_after = perplexity(model, tok, texts) if texts else None
            answers = fluency_answers(model, tok, prompts, fmt)
            k = 0
            for j, c in enumerate(batch):
                ps, _, ps_tok = target_scores(model, tok, c.paraphrases, [c.target] * len(c.paraphrases),
                                              fmt, token_accuracy=True) if c.paraphrases else ([], [], [])
                n_loc = len(c.locality)
                by_kind = _by_kind(c, ag[k:k + n_loc])
                if named is not None:
                    by_kind["locality_unnamed"] = [x for p, x in zip(c.locality, ag[k:k + n_loc])
                                                   if not named.search(p)]
                g = {}
                if gates:  # the fact's own gate, scored apart from its edit
                    gate, space = gates[j], ws.router.space(rs["layer"])
                    gp = opens(model, tok, space, gate, c.paraphrases, rs["tau"], fmt) if c.paraphrases else []
                    gl = opens(model, tok, space, gate, c.locality, rs["tau"], fmt) if c.locality else []
                    inside = [float(x) for x, o in zip(ps, gp) if o]
                    g = {"gate_recall": _mean([float(x) for x in gp]),
                         "gate_false_open": _mean([float(x) for x in gl]),
                         "paraphrase_success_gate_open": _mean(inside)}
                rows.append(g | {
                    "input": c.input, "target": c.target,
                    "relation": c.meta.get("relation"),
                    "edit_success": float(es[j]),
                    "paraphrase_success": _mean([float(x) for x in ps]),
                    "edit_token_accuracy": float(es_tok[j]),
                    "paraphrase_token_accuracy": _mean(ps_tok),
                    "locality": _mean(ag[k:k + n_loc]), "locality_kl": _mean(kl[k:k + n_loc]),
                    "ppl_drawdown": (ppl_after / ppl_before - 1) if texts else None,
                    "answer": answers[j], "fluency": ngram_entropy(answers[j]),
                    "fluency_base": ngram_entropy(base_answers[j]),
                    "repeats_target": float(repeats_target(answers[j], c.target)),
                    "seconds_per_edit": seconds / len(batch), "stored_share": stored,
                } | {key: _mean(v) for key, v in by_kind.items()})
                k += n_loc
        if progress and hasattr(it, "set_postfix"):
            it.set_postfix(es=f"{_mean([r['edit_success'] for r in rows]):.2f}",
                           loc=f"{_mean([r['locality'] for r in rows]) or 0:.3f}")
    keys = ["edit_success", "paraphrase_success", "locality", "locality_kl", "ppl_drawdown",
            "fluency", "fluency_base", "repeats_target", "seconds_per_edit", "stored_share",
            "edit_token_accuracy", "paraphrase_token_accuracy"]
    if rs:
        keys += ["gate_recall", "gate_false_open", "paraphrase_success_gate_open"]
    # locality by kind of prompt where the data labels them (meta locality_kinds): neighbours
    # (same relation, other subject), other relations, the same subject's other facts; and
    # (`unnamed`) on the prompts that name none of the batch's subjects
    keys += sorted({k for r in rows for k in r if k.startswith("locality_") and k != "locality_kl"})
    summary = {k: _mean([r.get(k) for r in rows]) for k in keys}
    # the names the field's tables use (WISE, EasyEdit), beside ours
    summary["field"] = {"reliability": summary["edit_success"],
                        "generalisation": summary["paraphrase_success"],
                        "locality": summary["locality"], "fluency": summary["fluency"],
                        "rewrite_acc": summary["edit_token_accuracy"],
                        "rephrase_acc": summary["paraphrase_token_accuracy"]}
    summary.update(cases=len(rows), batch_size=batch_size, editor=editor, max_steps=max_steps,
                   routed=bool(rs),
                   guard_max_norm=policy.max_norm,
                   ppl_before=ppl_before, state=head.id if head else None)
    by_rel = {}
    for r in rows:
        by_rel.setdefault(r["relation"] or "-", []).append(r)
    relations = {rel: {k: _mean([r[k] for r in rs]) for k in keys[:3]} | {"cases": len(rs)}
                 for rel, rs in sorted(by_rel.items())}
    return {"summary": summary, "relations": relations, "cases": rows}


def scratch_workspace(ws, directory) -> "object":
    """A new workspace in `directory` with `ws`'s settings (model, editor, edit engine...) and a
    ledger and store of its own, starting from the base model: where `evaluate_chain` makes
    its edits, so the user's ledger is never touched."""
    import dataclasses

    import yaml

    from .workspace import Workspace

    cfg = dataclasses.asdict(ws.config)
    for key in ("model", "editor", "model_cache", "offload_folder"):  # paths: as the user meant them
        v = cfg.get(key)
        if isinstance(v, str) and v != "default" and (Path(v).exists() or (ws.root / v).exists()):
            cfg[key] = str((ws.root / Path(v).expanduser()).resolve())
    cfg.update(ledger=None, store=".mendctl/deltas", health_check=False, keep_failed=True)
    root = Workspace.init(directory)
    (root / "mendctl.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return Workspace.open(str(root))


def evaluate_chain(ws, cases, editor: str = "mend", max_steps: int | None = None,
                   progress=None, keep: str | Path | None = None) -> dict:
    """The sequential-editing protocol: the cases' edits made one after another, each on the
    state the previous ones left, from the base model, in a scratch workspace with `ws`'s
    settings. Immediate scores are each edit's right after it (edit and paraphrase success,
    locality against the state before it); final scores are every edit's on the last state
    (reliability, generalisation, locality against the base model, the fluency of the answers
    and whether they repeat their target). Edits that did not take stay in the chain, as a
    chain of real edits would have them. With `keep` (a directory that does not exist yet) the
    scratch workspace is made there and kept, to inspect the chain's final state afterwards
    (`mendctl -w DIR log`, `ask`, `audit`)."""
    import tempfile
    from contextlib import ExitStack

    if not cases:
        raise InputError("no cases to evaluate")
    if keep is not None and Path(keep).exists():
        raise InputError(f"{keep} already exists; give a new directory to keep the chain's "
                         f"workspace in")
    with ExitStack() as stack:
        root = Path(keep) if keep is not None else \
            Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mendctl-chain-"))) / "ws"
        w = scratch_workspace(ws, root)
        try:
            r = _chain(w, cases, editor, max_steps, progress)
        finally:
            w.ledger.close()
    if keep is not None:
        r["summary"]["workspace"] = str(keep)
    return r


def _chain(w, cases, editor, max_steps, progress) -> dict:
    lm = w.lm
    model, tok, fmt = lm.model, lm.tokenizer, w.fmt
    max_steps = w.policy(editor, 1, max_steps).max_steps
    w.use_state(None)
    loc_prompts = [p for c in cases for p in c.locality]
    ref = locality_reference(model, tok, loc_prompts, fmt) if loc_prompts else None
    prompts = [c.input for c in cases]
    base_answers = fluency_answers(model, tok, prompts, fmt)
    immediate, seconds, stored = [], [], []
    for c in (progress(cases) if progress else cases):
        # (scores only: the answers a recorded edit shows would double the chain's time)
        r = edit(w, [c], editor=editor, max_steps=max_steps, command="mendctl eval --chain",
                 answers=False)
        a = r["after"]
        immediate.append({"edit_success": a["edit_success"], "paraphrase_success": a.get("paraphrase_success"),
                          "locality": a.get("locality")})
        seconds.append(r["seconds"])
        stored.append(r["delta_bytes"] / r["dense_bytes"])
    w.use_state(w.head())
    es = target_scores(model, tok, prompts, [c.target for c in cases], fmt)[0]
    para_p = [p for c in cases for p in c.paraphrases]
    pok = target_scores(model, tok, para_p, [c.target for c in cases for _ in c.paraphrases], fmt)[0] \
        if para_p else []
    ag, kl = locality_scores(model, ref) if ref is not None else ([], [])
    answers = fluency_answers(model, tok, prompts, fmt)
    named = subject_pattern(cases)  # (a prompt naming an edited subject may rightly change)
    by_kind: dict[str, list[float]] = {}
    k = 0
    for c in cases:
        for key, v in _by_kind(c, ag[k:k + len(c.locality)]).items():
            by_kind.setdefault(key, []).extend(v)
        k += len(c.locality)
    final = {"edit_success": _mean([float(x) for x in es]),
             "paraphrase_success": _mean([float(x) for x in pok]),
             "locality": _mean(ag), "locality_kl": _mean(kl),
             "locality_unnamed": _mean([a for p, a in zip(loc_prompts, ag) if not named.search(p)])
             if named is not None else None,
             "fluency": _mean([ngram_entropy(x) for x in answers]),
             "fluency_base": _mean([ngram_entropy(x) for x in base_answers]),
             "repeats_target": _mean([float(repeats_target(x, c.target)) for x, c in zip(answers, cases)])}
    final.update({key: _mean(v) for key, v in sorted(by_kind.items())})
    imm = {k: _mean([r[k] for r in immediate]) for k in ("edit_success", "paraphrase_success", "locality")}
    return {"summary": {"chain": len(cases), "editor": editor, "max_steps": max_steps,
                        "routed": bool(w.config.routing), "immediate": imm, "final": final,
                        "seconds_per_edit": _mean(seconds),
                        # each entry's stored delta as a share of the dense ΔW of its weights
                        "stored_share": _mean(stored), "stored_share_max": max(stored)},
            "cases": [{"input": c.input, "target": c.target, "immediate": i,
                       "final_edit_success": float(e), "answer": a, "stored_share": b}
                      for c, i, e, a, b in zip(cases, immediate, es, answers, stored)]}
