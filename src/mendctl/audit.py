"""Audits of a workspace's chain of edits: what still holds, what else moved, how far the
weights drifted, and how that developed along the chain.

This module owns what an audit measures and the rules it flags by:

- retention: every active edit's success (all target tokens argmax under teacher forcing)
  and its paraphrases' success, re-scored on the audited state; reverted or squashed-away
  edits are not active and are not counted;
- locality against the base checkpoint (never against the previous state, so small steps
  cannot hide a large total): top-1 agreement and KL(base ‖ state) on every active edit's own
  locality prompts and on a standard audit set (held-out neighbourhood prompts of the bundled
  test split plus the openings of the generic-text sample), and the generic-text perplexity
  drawdown;
- drift: each edit's recorded ‖ΔW‖_F per weight, the state's ‖W − W_base‖_F per weight and
  relative to ‖W_base‖_F, and how far the u/δ statistics the editor sees on the audit set have
  moved from the statistics its input normalisation was trained with;
- the retention matrix over the chain: success of edit j measured in the state after entry k
  (j ≤ k), rebuilt from the ledger's deltas. It is incremental: a cell the ledger already holds
  (an edit's own success right after it, `metrics_after`) or an earlier audit computed for the
  same state hash is read back, and only states with missing cells are rebuilt. Routed edits
  make most cells free: a cell (and an audit-set prompt) is carried over from the last state
  that scored it when the two states share their plain weights and no gate that differs
  between them opens on its prompts (`_Reach`);
- flags (edits that no longer hold, locality under a threshold, drift over a threshold) and
  `--fail-under` / `--fail-over` checks for CI.

Audits are recorded in the ledger's `audits` table (the state, the summary, the matrix cells
as a cache, where the report went). Rendering reports is `report.py`'s job.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field

import torch

from . import routing
from .editors.data import EditCase, generic_text_samples, load_split
from .editors.delta import state_hash
from .editors.mend.capture import capture_edit_gradients
from .editors.mend.editor import MendEditor
from .editors.metrics import (continued, fluency_answers, locality_reference, locality_scores,
                              ngram_entropy, perplexity, reference_of, repeats_target, target_scores)
from .editors.route import open_matrix
from .editors.text import encode_pairs, encode_sequences
from .errors import EditorError, InputError, LedgerError
from .ledger import MAX_ID

AUDIT_FORMAT = "mendctl.audit"
AUDIT_FORMAT_VERSION = 1
#: Flags are raised past these unless the caller gives others.
DEFAULT_THRESHOLDS = {"locality": 0.90, "relative_drift": 0.05}
#: Summary keys that `--fail-under` accepts (higher is better) ...
HIGHER_IS_BETTER = ("edit_retention", "paraphrase_retention", "edit_locality", "audit_locality",
                    "holding_fraction")
#: ... and those `--fail-over` accepts (lower is better).
LOWER_IS_BETTER = ("edit_locality_kl", "audit_kl", "ppl_drawdown", "relative_drift",
                   "max_relative_drift")
AUDIT_PROMPTS = 32  # neighbourhood prompts of the bundled test split in the standard set
AUDIT_GENERIC = 4  # generic-text passages: their openings as prompts, in full for perplexity


@dataclass
class AuditSet:
    """Prompts whose answers should not move, and passages for perplexity."""

    prompts: list[str]
    passages: list[str]
    source: str

    @property
    def sha256(self) -> str:
        doc = json.dumps({"prompts": self.prompts, "passages": self.passages}, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()


def standard_audit_set(cases: list[EditCase] | None = None, n_prompts: int = AUDIT_PROMPTS,
                       n_generic: int = AUDIT_GENERIC, source: str | None = None) -> AuditSet:
    """The locality prompts of `cases` (default: the bundled test split, whose subjects no
    editor was trained on), the first of each case so that many relations are represented,
    plus the openings of the generic-text sample."""
    if cases is None:
        cases, source = load_split("test"), "bundled:test"
    prompts, seen = [], set()
    for pool in ([c.locality[:1] for c in cases], [c.locality[1:] for c in cases]):
        for ps in pool:
            for p in ps:
                if p not in seen and len(prompts) < n_prompts:
                    seen.add(p)
                    prompts.append(p)
    passages = generic_text_samples(n_generic)
    prompts += [" ".join(t.split()[:24]) for t in passages]
    return AuditSet(prompts, passages, source or "cases")


def weight_drift(w: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> tuple[dict, float]:
    """Per edited weight ‖W − W_base‖_F and that relative to ‖W_base‖_F, and the total
    relative drift over all of them."""
    drift, total_sq, base_sq = {}, 0.0, 0.0
    for name in sorted(base):
        diff = float(torch.linalg.norm((w[name].double() - base[name].double())))
        ref = float(torch.linalg.norm(base[name].double()))
        drift[name] = {"frobenius": diff, "relative": diff / ref if ref else None}
        total_sq, base_sq = total_sq + diff * diff, base_sq + ref * ref
    return drift, math.sqrt(total_sq / base_sq) if base_sq else 0.0


def parse_range(text: str | None) -> tuple[int | None, int | None]:
    """'A..B', 'A..', '..B' or 'N' (a single entry) → (A, B)."""
    if not text:
        return None, None
    try:
        if ".." in text:
            a, b = text.split("..", 1)
            first, last = (int(a) if a.strip() else None), (int(b) if b.strip() else None)
        else:
            first = last = int(text)
    except ValueError:
        raise InputError(f"bad range {text!r}; write A..B with entry ids, e.g. 3..10 "
                         f"(A.. or ..B leave a side open)") from None
    if first is not None and last is not None and first > last:
        raise InputError(f"bad range {text!r}: {first} comes after {last}")
    for bound in (first, last):
        if bound is not None and abs(bound) > MAX_ID:  # the database cannot even compare it
            raise InputError(f"no entry {bound}; see `mendctl log`")
    return first, last


def parse_checks(items: tuple[str, ...] | list[str], allowed: tuple[str, ...], option: str) -> dict:
    """['locality=0.95', ...] → {'locality': 0.95}; unknown keys name the allowed ones."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise InputError(f"{option} {item!r}: write KEY=VALUE with KEY one of "
                             f"{', '.join(allowed)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise InputError(f"{option} {item!r}: {value!r} is not a number") from None
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(sum(xs) / len(xs)) if xs else None


@dataclass
class _Scorer:
    """Scores states of one workspace against references computed once on the base."""

    ws: object
    audit_set: AuditSet
    units: list = field(default_factory=list)  # active entries of the audited state

    def __post_init__(self):
        lm = self.ws.lm
        self.model, self.tok, self.fmt = lm.model, lm.tokenizer, self.ws.fmt
        self.ws.use_state(None)
        self.ref_audit = locality_reference(self.model, self.tok, self.audit_set.prompts, self.fmt)
        self.ppl_base = perplexity(self.model, self.tok, self.audit_set.passages) \
            if self.audit_set.passages else None

    def retention(self, entries) -> dict[int, float]:
        """Fraction of each entry's cases whose target is the argmax, in the loaded state."""
        prompts, targets, owner = [], [], []
        for e in entries:
            for c in e.cases():
                prompts.append(c.input)
                targets.append(c.target)
                owner.append(e.id)
        if not prompts:
            return {}
        ok = target_scores(self.model, self.tok, prompts, targets, self.fmt)[0]
        out: dict[int, list[bool]] = {}
        for o, k in zip(owner, ok):
            out.setdefault(o, []).append(bool(k))
        return {o: sum(v) / len(v) for o, v in out.items()}

    def audit_locality(self) -> tuple[float, float]:
        ag, kl = locality_scores(self.model, self.ref_audit)
        return _mean(ag), _mean(kl)


def gate_columns(ws, entries, chunks) -> torch.Tensor:
    """(rows, len(entries)) bool: column c says whether the gate of routed entry `entries[c]`
    opens at some token of each row (`route.open_matrix`: a superset of where it acts).
    `chunks` are the rows as right-padded (input_ids, attention_mask) batches, in order."""
    chunks = list(chunks)
    out = torch.zeros(sum(ids.shape[0] for ids, _ in chunks), len(entries), dtype=torch.bool)
    groups: dict[tuple, list[int]] = {}
    for c, e in enumerate(entries):
        s = routing.of(e)
        groups.setdefault((s["layer"], s["tau"]), []).append(c)
    lm = ws.lm
    for (layer, tau), cols in groups.items():
        space = ws.router.space(layer)
        gates_ = [ws.router.gate(entries[c].inputs[0], routing.of(entries[c]), entries[c].targets[0])
                  for c in cols]
        at = 0
        for ids, mask in chunks:
            out[at:at + ids.shape[0], cols] = open_matrix(lm.model, lm.tokenizer, space, gates_,
                                                          ids, mask, tau)
            at += ids.shape[0]
    return out


def any_gate_opens(ws, entries, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   chunk: int = 32) -> torch.Tensor:
    """(rows,) bool, for a right-padded batch: does the gate of one of the routed `entries`
    open at some token of each row?"""
    return gate_columns(ws, entries, [(input_ids[i:i + chunk], attention_mask[i:i + chunk])
                                      for i in range(0, input_ids.shape[0], chunk)]).any(1)


def _editor_stats(ws) -> MendEditor | None:
    try:
        ed = ws.editor("mend")
    except (EditorError, InputError):
        return None
    return ed if ed.config.norm else None


def _ud_shift(ws, editor: MendEditor, batch) -> dict:
    """Per edited weight: how far the u/δ statistics of `batch` in the loaded state are from
    the editor's normalisation statistics, in units of the latter's standard deviation
    (mean over features of |μ − μ_norm| / σ_norm), and the median ratio σ / σ_norm."""
    pairs, _ = capture_edit_gradients(ws.lm.model, ws.specs, batch)
    out = {}
    for s in ws.specs:
        net = editor.net_for(s.name)
        row = {}
        for part, x, norm in (("u", pairs[s.name][0], net.norm_u), ("delta", pairs[s.name][1], net.norm_d)):
            x = x.detach().double().cpu()
            mu, sd = norm.mean.cpu(), norm.std().cpu()
            row[f"{part}_mean_shift"] = float(((x.mean(0) - mu).abs() / sd).mean())
            row[f"{part}_std_ratio"] = float((x.std(0) / sd).median()) if x.shape[0] > 1 else None
        out[s.name] = row
    return out


def run_audit(ws, first: int | None = None, last: int | None = None,
              audit_set: AuditSet | None = None, thresholds: dict | None = None,
              matrix: bool = True, progress=None) -> dict:
    """Audit the state after the last entry in [first, last] (default: the head) and the
    chain of entries in that range. Returns a JSON-ready dict; records nothing (see
    `record_audit`)."""
    t_start = time.perf_counter()
    thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    entries = ws.ledger.entries(reverse=False)
    if not entries:
        raise InputError("the ledger is empty: nothing to audit. Make an edit first "
                         "(`mendctl edit --input ... --target ...`)")
    known = {e.id for e in entries}
    for bound in (first, last):
        if bound is not None and bound not in known:
            raise InputError(f"no entry {bound} in the ledger; see `mendctl log` for ids")
    chain = [e for e in entries if (first is None or e.id >= first) and (last is None or e.id <= last)]
    target = chain[-1]
    by_id = {e.id: e for e in entries}
    in_range = lambda i: (first is None or i >= first) and (last is None or i <= last)  # noqa: E731
    active = [by_id[i] for i in target.active_ids if in_range(i)]
    audit_set = audit_set or standard_audit_set()
    lm = ws.lm
    scorer = _Scorer(ws, audit_set, active)
    model, tok, fmt = scorer.model, scorer.tok, scorer.fmt

    # -- base references (model in the base state) -----------------------------------------
    own_loc = [(e.id, p) for e in active for c in e.cases() for p in c.locality]
    own_rows, ref_own = list(range(len(own_loc))), None  # the prompts scored on the state
    if own_loc:
        seqs, starts = continued(model, tok, [p for _, p in own_loc], fmt)
        state = [by_id[i] for i in target.active_ids]  # (entries outside the range too)
        if all(routing.of(e) for e in state):
            # where none of the state's gates opens, it is the base model, bit for bit
            b = encode_sequences(seqs, tok, starts)
            own_rows = any_gate_opens(ws, state, b.input_ids, b.attention_mask).nonzero()[:, 0].tolist()
        if own_rows:
            ref_own = reference_of(model, tok, [seqs[i] for i in own_rows], [starts[i] for i in own_rows])
    editor = _editor_stats(ws)
    stats_base = _ud_shift(ws, editor, scorer.ref_audit.batch) if editor else None
    inputs = [e.inputs[0] for e in active if e.inputs]
    base_answers = fluency_answers(model, tok, inputs, fmt) if inputs else []

    # -- the audited state -------------------------------------------------------------------
    w = ws.use_state(target)
    retention = scorer.retention(active)
    ps = [(e.id, p, c.target) for e in active for c in e.cases() for p in c.paraphrases]
    ok = target_scores(model, tok, [p for _, p, _ in ps], [t for _, _, t in ps], fmt)[0] \
        if ps else []
    para: dict[int, float | None] = {
        e.id: _mean([float(k) for (i, _, _), k in zip(ps, ok) if i == e.id]) for e in active}
    own_ag, own_kl = [1.0] * len(own_loc), [0.0] * len(own_loc)
    if ref_own is not None:
        for i, a, k in zip(own_rows, *locality_scores(model, ref_own)):
            own_ag[i], own_kl[i] = a, k
    aud_ag, aud_kl = scorer.audit_locality()
    ppl = perplexity(model, tok, audit_set.passages) if audit_set.passages else None
    stats_head = _ud_shift(ws, editor, scorer.ref_audit.batch) if editor else None
    # the edited answers: fluent, or an edit acting on its own output?
    answers = dict(zip([e.id for e in active if e.inputs],
                       fluency_answers(model, tok, inputs, fmt) if inputs else []))

    drift, total_rel = weight_drift(w, ws.base_weights)

    edits = []
    for e in active:
        norms = e.delta_norms or {}
        own = [(a, k) for (i, _), a, k in zip(own_loc, own_ag, own_kl) if i == e.id]
        edits.append({
            "entry": e.id, "kind": e.kind, "inputs": list(e.inputs), "targets": list(e.targets),
            "edit_success": retention.get(e.id), "paraphrase_success": para.get(e.id),
            "locality": _mean([a for a, _ in own]), "locality_kl": _mean([k for _, k in own]),
            "delta_norm": math.sqrt(sum(v * v for v in norms.values())) if norms else None,
            "delta_norms": norms,
            "edit_success_when_made": (e.metrics_after or {}).get("edit_success"),
            "answer": answers.get(e.id),
            "repeats_target": float(repeats_target(answers[e.id], e.targets[0]))
            if e.id in answers and e.targets else None,
        })

    ppl_drawdown = (ppl / scorer.ppl_base - 1) if ppl is not None and scorer.ppl_base else None
    summary = {
        "state": target.id, "state_hash": target.state_hash, "active_edits": len(active),
        "edit_retention": _mean([x["edit_success"] for x in edits]),
        "holding_fraction": _mean([float(x["edit_success"] == 1.0) for x in edits]),
        "paraphrase_retention": _mean([x["paraphrase_success"] for x in edits]),
        "edit_locality": _mean(own_ag), "edit_locality_kl": _mean(own_kl),
        "audit_locality": aud_ag, "audit_kl": aud_kl,
        "ppl_before": scorer.ppl_base, "ppl_after": ppl, "ppl_drawdown": ppl_drawdown,
        "fluency": _mean([ngram_entropy(a) for a in answers.values()]),
        "fluency_base": _mean([ngram_entropy(a) for a in base_answers]),
        "repeats_target": _mean([x["repeats_target"] for x in edits]),
        "relative_drift": total_rel,
        "max_relative_drift": max((d["relative"] or 0.0) for d in drift.values()),
    }

    flags = []
    for x in edits:
        if x["edit_success"] is not None and x["edit_success"] < 1.0:
            flags.append({"kind": "edit_lost", "entry": x["entry"],
                          "message": f"edit {x['entry']} no longer holds "
                                     f"({x['edit_success']:.0%} of its targets are the answer)"})
    for key in ("edit_locality", "audit_locality"):
        v = summary[key]
        if v is not None and v < thresholds["locality"]:
            flags.append({"kind": "locality", "key": key,
                          "message": f"{key} {v:.3f} is below {thresholds['locality']}"})
    for name, d in drift.items():
        if d["relative"] is not None and d["relative"] > thresholds["relative_drift"]:
            flags.append({"kind": "drift", "weight": name,
                          "message": f"{name} moved {d['relative']:.3%} of its norm from the "
                                     f"base (threshold {thresholds['relative_drift']:.1%})"})

    result = {
        "format": AUDIT_FORMAT, "format_version": AUDIT_FORMAT_VERSION,
        "model": lm.model_id, "base_model_hash": lm.base_hash,
        "range": [first, last], "audit_set": {"source": audit_set.source,
                                              "prompts": len(audit_set.prompts),
                                              "passages": len(audit_set.passages),
                                              "sha256": audit_set.sha256},
        "thresholds": thresholds, "summary": summary, "edits": edits, "drift": drift,
        "ud_statistics": ({"base": stats_base, "state": stats_head} if editor else None),
        "flags": flags,
    }
    if matrix:
        result["chain"] = _chain(ws, scorer, chain, by_id, audit_set, progress)
    result["seconds"] = round(time.perf_counter() - t_start, 2)
    ws.forget_loaded_state()  # the audit moved the model through other states
    return result


def _cached_cells(ws, audit_sha: str) -> tuple[dict, dict]:
    """Retention cells {state_hash: {entry: value}} and audit-set locality {state_hash:
    [agreement, kl]} that earlier audits recorded."""
    ret: dict = {}
    loc: dict = {}
    for a in ws.ledger.audits():
        cache = (a.summary or {}).get("cache") or {}
        for h, cells in (cache.get("retention") or {}).items():
            ret.setdefault(h, {}).update({int(k): v for k, v in cells.items()})
        for h, v in ((cache.get("locality") or {}).get(audit_sha) or {}).items():
            loc.setdefault(h, v)
    return ret, loc


class _Reach:
    """Which rows a chain's routed edits can touch: for each routed entry, the retention rows
    (entry j's prompt + target sequences) and audit-set prompts on which its gate opens at
    some token (`route.open_matrix`). Two states with the same plain weights whose routed
    edits differ only by gates shut on a row compute that row alike, so its score is carried
    over instead of re-scored: in a chain of routed edits most states change nothing but the
    new edit's own rows."""

    def __init__(self, ws, scorer: _Scorer, routed_entries, row_entries):
        tok, fmt = scorer.tok, scorer.fmt
        self.col = {e.id: c for c, e in enumerate(routed_entries)}
        pairs = [(e.id, c.input, c.target) for e in row_entries for c in e.cases()]
        encoded = (encode_pairs(tok, [p for _, p, _ in pairs[i:i + 32]],
                                [t for _, _, t in pairs[i:i + 32]], fmt)
                   for i in range(0, len(pairs), 32))
        ret = gate_columns(ws, routed_entries, ((b.input_ids, b.attention_mask) for b in encoded))
        aud_batch = scorer.ref_audit.batch
        aud = gate_columns(ws, routed_entries,
                           [(aud_batch.input_ids[i:i + 32], aud_batch.attention_mask[i:i + 32])
                            for i in range(0, aud_batch.input_ids.shape[0], 32)])
        owner = torch.tensor([j for j, _, _ in pairs])
        self.retention = {j: ret[owner == j] for j in {j for j, _, _ in pairs}}
        self.audit = aud

    def _cols(self, ids) -> torch.Tensor:
        return torch.tensor(sorted(self.col[i] for i in ids), dtype=torch.long)

    def touches(self, j: int, ids) -> bool:
        """Does any of the routed entries `ids` open its gate on entry j's rows?"""
        if not ids:
            return False
        return j not in self.retention or bool(self.retention[j][:, self._cols(ids)].any())

    def audit_rows(self, ids) -> list[int]:
        """The audit-set prompts on which one of the routed entries `ids` opens its gate."""
        if not ids:
            return []
        return self.audit[:, self._cols(ids)].any(1).nonzero()[:, 0].tolist()


def _chain(ws, scorer: _Scorer, chain, by_id, audit_set: AuditSet, progress=None) -> dict:
    """The retention matrix and per-state series along the chain (see the module docstring)."""
    rows = [e.id for e in chain if e.delta_sha256]
    cached_ret, cached_loc = _cached_cells(ws, audit_set.sha256)
    base = ws.base_weights
    cells: dict[int, dict[int, float]] = {}
    series = []
    cost = {"states": len(chain), "states_rebuilt": 0, "cells": 0, "cells_from_ledger": 0,
            "cells_from_earlier_audits": 0, "cells_carried": 0, "cells_computed": 0,
            "audit_prompts_scored": 0}
    new_ret: dict = {}
    new_loc: dict = {}
    prev_active: list[int] | None = None
    prev_w = None
    t0 = time.perf_counter()
    # each state's plain entries (in the weights) and routed ones (hooks)
    split = {e.id: (tuple(i for i in e.active_ids if not routing.of(by_id[i])),
                    frozenset(i for i in e.active_ids if routing.of(by_id[i]))) for e in chain}
    routed_ids = sorted(set().union(*(r for _, r in split.values())))
    reach = _Reach(ws, scorer, [by_id[i] for i in routed_ids], [by_id[i] for i in rows]) \
        if routed_ids else None
    last_cell: dict[int, tuple] = {}  # entry → (plain, routed, value) of the last state scored
    last_loc: tuple | None = None  # (plain, routed, per-prompt agreement, per-prompt KL)
    drift_of: dict[tuple, float] = {}  # plain entries → relative drift
    for e in (progress(chain) if progress else chain):
        plain, routed_now = split[e.id]
        want = [i for i in e.active_ids if i in rows and i <= e.id]
        known = dict(cached_ret.get(e.state_hash, {}))
        cost["cells_from_earlier_audits"] += sum(1 for i in want if i in known)
        if e.id in want and e.kind == "edit" and e.id not in known \
                and (e.metrics_after or {}).get("edit_success") is not None:
            known[e.id] = float(e.metrics_after["edit_success"])
            cost["cells_from_ledger"] += 1
        if reach is not None:  # unchanged unless a gate that differs opens on the rows
            for i in want:
                last = last_cell.get(i)
                if i not in known and last is not None and last[0] == plain \
                        and not reach.touches(i, last[1] ^ routed_now):
                    known[i] = last[2]
                    cost["cells_carried"] += 1
        missing = [i for i in want if i not in known]
        loc = cached_loc.get(e.state_hash)  # [agreement, kl, relative drift]
        rescore = None  # audit prompts to re-score (None: all)
        if loc is None and reach is not None and last_loc is not None and last_loc[0] == plain:
            rescore = reach.audit_rows(last_loc[1] ^ routed_now)
            if not rescore:
                loc = [_mean(last_loc[2]), _mean(last_loc[3]), drift_of[plain]]
        if missing or loc is None:
            # states along a chain usually extend the previous one by one delta: add just that
            if routed_now:  # routed edits are hooks, not weights: load it whole
                w = ws.use_state(e)
                cost["states_rebuilt"] += 1
            else:
                w, added = ws.chain_weights(list(e.active_ids), prev_active, prev_w)
                cost["states_rebuilt"] += added
            if ws.loaded_state != e.state_hash:  # (use_state checked a routed state's hash)
                got = state_hash(w) if e.active_ids else ws.base_state_hash
                if got != e.state_hash:
                    raise LedgerError(f"entry {e.id}: rebuilt state {got[:12]} differs from the "
                                      f"recorded {e.state_hash[:12]}; run `mendctl replay --verify`")
                ws.set_weights(w, e.state_hash)
            if missing:
                known.update(scorer.retention([by_id[i] for i in missing]))
                cost["cells_computed"] += len(missing)
            if loc is None:
                if plain not in drift_of:
                    drift_of[plain] = weight_drift(w, base)[1]
                if rescore is not None:  # the previous state's figures, but where gates differ
                    ag, kl = list(last_loc[2]), list(last_loc[3])
                    for p, a, k in zip(rescore, *locality_scores(scorer.model,
                                                                 scorer.ref_audit.rows(rescore))):
                        ag[p], kl[p] = a, k
                else:
                    ag, kl = locality_scores(scorer.model, scorer.ref_audit)
                cost["audit_prompts_scored"] += len(ag) if rescore is None else len(rescore)
                last_loc = (plain, routed_now, ag, kl)
                loc = [_mean(ag), _mean(kl), drift_of[plain]]
            prev_active, prev_w = list(e.active_ids), w
        for i in want:
            last_cell[i] = (plain, routed_now, known[i])
        cost["cells"] += len(want)
        cells[e.id] = {i: known[i] for i in want}
        new_ret[e.state_hash] = {str(i): known[i] for i in want}
        new_loc[e.state_hash] = loc
        series.append({"entry": e.id, "kind": e.kind, "active_edits": len(e.active_ids),
                       "retention": _mean(list(cells[e.id].values())),
                       "audit_locality": loc[0], "audit_kl": loc[1], "relative_drift": loc[2]})
    cost["seconds"] = round(time.perf_counter() - t0, 2)
    matrix = [[cells[k].get(j) for k in [e.id for e in chain]] for j in rows]
    return {"rows": rows, "columns": [e.id for e in chain], "matrix": matrix, "series": series,
            "cost": cost, "cache": {"retention": new_ret, "locality": {audit_set.sha256: new_loc}}}


def check_result(result: dict, fail_under: dict, fail_over: dict) -> list[str]:
    """The `--fail-under` / `--fail-over` checks that fail, as messages."""
    s = result["summary"]
    failed = []
    for key, limit in fail_under.items():
        v = s.get(key)
        if v is None or v < limit:
            failed.append(f"{key} = {'n/a' if v is None else f'{v:.4g}'} is under {limit:g}")
    for key, limit in fail_over.items():
        v = s.get(key)
        if v is None or v > limit:
            failed.append(f"{key} = {'n/a' if v is None else f'{v:.4g}'} is over {limit:g}")
    return failed


def record_audit(ws, result: dict, report_path: str | None = None) -> int:
    """Store the audit in the ledger (summary, flags and the matrix cache); returns its id."""
    doc = {k: v for k, v in result.items() if k != "chain"}
    if "chain" in result:
        doc["chain"] = {k: v for k, v in result["chain"].items() if k != "cache"}
        doc["cache"] = result["chain"]["cache"]
    with ws.ledger.transaction() as s:
        a = ws.ledger.add_audit(result["summary"]["state"], doc, report_path, session=s)
        s.flush()
        return a.id
