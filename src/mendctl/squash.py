"""Squash: replace a segment of the active edit chain with one delta.

This module owns `squash(ws, first, last, rank)`: it takes the head state's active entries whose
ids lie in [first, last], combines their deltas into one, records that delta as a new `squash`
entry (the segment's ids leave the active list, the new id takes the place of the first), and
reports what the squash cost: per weight the relative reconstruction error of the stored delta
against the exact sum, how far the new state moved from the old head, and how many of the
segment's facts the model still gets right before and after.

Without `rank` the combination is exact: low-rank factors are stacked (the sum of
−α_k δ̃_kᵀ ũ_k is −δ̃'ᵀ ũ' with ũ' = [ũ_k], δ̃' = [α_k δ̃_k], α' = 1; when every α_k is the
same, as with one editor checkpoint, δ̃' = [δ̃_k] and α' = α), and a weight that any segment
delta changes densely (fine-tuning baselines) becomes the dense sum. With `rank=r`
each weight keeps the top r singular triplets of its summed ΔW instead, which bounds the
file size and the per-edit cost of later states at the price of a measured error.

History is not rewritten: the squashed entries stay in the ledger and their delta files stay
in the store; only the active list of the new head changes. The recording follows every
operation's crash rules (recorder.py): the file is staged, the ledger row and the file's
rename land in one transaction, and a failure leaves no row and discards the staged file.
"""
from __future__ import annotations

import json
from functools import reduce

import torch
from sqlalchemy import select

from .editors.delta import Delta, LayerDelta, apply_deltas, state_hash
from .editors.metrics import target_scores
from .errors import InputError, LedgerError
from .ledger import Entry
from .record import EntryNotes
from .workspace import Workspace

EDITOR_NAME = "squash"


def squash(ws: Workspace, first: int, last: int, rank: int | None = None,
           command: str | None = None) -> dict:
    """Replace the active entries with ids in [first, last] by one `squash` entry.

    Returns a JSON-ready dict: entry (the new id), parent, squashed (the segment's ids, in
    active order), skipped (ids in the range that were not active edits), rank, ranks (factor
    rows per weight; None for a dense one), reconstruction_error (per weight) and
    max_reconstruction_error, max_abs_state_diff (new state vs the old head, over the edited
    weights), retention ({"before", "after"}: fraction of the segment's facts whose targets
    are the argmax; None if it recorded none), active_ids, state_hash, delta_sha256,
    delta_bytes, dense_bytes, segment_delta_bytes and file_bytes.

    Raises InputError, with nothing written, for a reversed range, an unknown id, a rank < 1,
    or a range holding fewer than two active edits.
    """
    _check_args(first, last, rank)
    with ws.lock():
        head = ws.head()
        routed = ws.routed_ids(head.active_ids) if head else []
        if routed:
            # a squash is one delta added to the weights; routed edits act behind their gates
            raise InputError(f"this state routes edits {routed} (routing); squash combines plain "
                             f"weight edits only, and its hash would not cover the routed ones")
        segment, skipped = _segment(ws, head, first, last)
        return _squash_locked(ws, head, segment, skipped, rank, command)


def _check_args(first, last, rank) -> None:
    for what, v in (("first id", first), ("last id", last)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise InputError(f"the {what} of the range must be an entry id (an integer), got {v!r}")
    if first > last:
        raise InputError(f"the range {first}..{last} is reversed; write the smaller id first, "
                         f"e.g. `mendctl squash {last}..{first}`")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise InputError(f"--rank must be an integer ≥ 1, got {rank!r}; leave it out to keep "
                         f"the squashed delta exact")


def _segment(ws: Workspace, head: Entry | None, first: int,
             last: int) -> tuple[list[Entry], list[int]]:
    """The active entries in [first, last] in active order, and the range's inactive ids."""
    if head is None:
        raise InputError("the ledger is empty: there is nothing to squash; make edits with "
                         "`mendctl edit` first")
    with ws.ledger.transaction(write=False) as s:
        known = set(s.scalars(select(Entry.id).where(Entry.id.between(first, last))))
    if len(known) != last - first + 1:
        # ids are never reused, so anything past the head or below 1 is a typo; a gap inside
        # (a non-SQLite ledger's sequence can skip) is just as unknown
        named = [str(i) for i in range(max(first, 1), min(last, head.id) + 1) if i not in known]
        span = lambda a, b: f"{a}" if a == b else f"{a}..{b}"  # noqa: E731
        if first < 1:
            named.insert(0, span(first, min(last, 0)))
        if last > head.id:
            named.append(span(max(first, head.id + 1), last))
        raise InputError(f"no entry {', '.join(named[:6])} in the ledger (the newest is "
                         f"{head.id}); pick a range of existing ids from `mendctl log`")
    ids = [i for i in head.active_ids if first <= i <= last]
    entries = [ws.ledger.get(i) for i in ids]
    segment = [e for e in entries if e.delta_sha256]
    skipped = sorted(known - {e.id for e in segment})
    if len(segment) < 2:
        have = (f"only entry {segment[0].id} is" if segment else "none of them is")
        raise InputError(f"entries {first}..{last}: {have} an active edit, and a squash needs "
                         f"at least two; widen the range (`mendctl log` marks the active "
                         f"entries with *)")
    return segment, skipped


def _squash_locked(ws: Workspace, head: Entry, segment: list[Entry], skipped: list[int],
                   rank: int | None, command: str | None) -> dict:
    lm = ws.lm
    seg_ids = [e.id for e in segment]
    cache: dict[int, Delta] = {}
    seg_deltas = [ws.load_delta(i, cache) for i in seg_ids]
    delta, errors = combine(seg_deltas, rank)
    delta.meta.update({"editor": EDITOR_NAME, "base_model_hash": lm.base_hash,
                       "squashed": json.dumps(seg_ids)})

    # The new id is unknown until the row exists; the state only needs the order, so the
    # slot of the first segment id stands for it until then.
    slot = head.active_ids.index(seg_ids[0])
    before_slot = list(head.active_ids[:slot])
    after_slot = [i for i in head.active_ids[slot:] if i not in set(seg_ids)]

    prompts = [p for e in segment for p in e.inputs]
    targets = [t for e in segment for t in e.targets]
    try:
        w_old = ws.use_state(head)
        retention_before = _success(ws, prompts, targets)
        # Built in the new active order from the base, exactly as `replay --verify` and
        # `weights_for` will rebuild it, so the recorded hash is the one they find.
        w_new = apply_deltas(ws.weights_for(before_slot),
                             [delta] + [ws.load_delta(i, cache) for i in after_slot])
        new_hash = state_hash(w_new)
        diff = max(float((w_new[n].float() - w_old[n].float()).abs().max()) for n in w_new)
        ws.set_weights(w_new, new_hash)
        retention_after = _success(ws, prompts, targets)
    except BaseException:
        ws.forget_loaded_state()  # the model may hold a state no entry records
        raise

    max_err = max(errors.values())
    notes = EntryNotes(squashed=seg_ids, rank=rank, reconstruction_error=errors,
                       max_reconstruction_error=max_err).to_json()
    request = [c for e in segment for c in _request_of(e)]
    try:
        with ws.recorder.recording([delta], head.id, "squashing") as (s, (staged,)):
            ws.record_base_model(s)
            entry = ws.ledger.add_entry(
                session=s, kind="squash", parent_id=head.id, **ws.provenance(command),
                inputs=prompts, targets=targets, request=request, editor_name=EDITOR_NAME,
                base_model_id=lm.model_id, base_model_hash=lm.base_hash,
                weight_names=delta.names(), delta_sha256=staged.sha256,
                delta_path=staged.rel_path, delta_size=staged.size, delta_norms=delta.norms(),
                metrics_before=_metrics(retention_before), metrics_after=_metrics(retention_after),
                state_hash=new_hash, active_ids=before_slot + after_slot,  # own id inserted below
                notes=notes)
            active = before_slot + [entry.id] + after_slot
            entry.active_ids = active
            s.flush()
    except BaseException:
        ws.forget_loaded_state()
        raise
    ws.remember_state(w_new, new_hash)
    return {
        "entry": entry.id, "parent": head.id, "squashed": seg_ids, "skipped": skipped,
        "rank": rank, "ranks": {n: (l.rank if l.is_lowrank else None)
                                for n, l in sorted(delta.layers.items())},
        "reconstruction_error": errors, "max_reconstruction_error": max_err,
        "max_abs_state_diff": diff,
        "retention": {"before": retention_before, "after": retention_after},
        "active_ids": active, "state_hash": new_hash, "delta_sha256": staged.sha256,
        "delta_bytes": delta.nbytes(), "dense_bytes": delta.dense_nbytes(),
        "segment_delta_bytes": sum(d.nbytes() for d in seg_deltas), "file_bytes": staged.size,
    }


def _request_of(e: Entry) -> list[dict]:
    # A replay of the squash entry re-runs its request, so it must cover every fact, even of
    # entries recorded without one.
    return list(e.request or []) or [c.to_dict() for c in e.cases()]


def _success(ws: Workspace, prompts: list[str], targets: list[str]) -> float | None:
    if not prompts:
        return None
    ok, _ = target_scores(ws.lm.model, ws.lm.tokenizer, prompts, targets, ws.fmt)
    return float(sum(ok) / len(ok))


def _metrics(success: float | None) -> dict | None:
    # `edit_success` is the key `mendctl log` shows: here, the segment's facts in that state
    return None if success is None else {"edit_success": success}


# -- combining deltas -----------------------------------------------------------------------
def _dw64(layer: LayerDelta) -> torch.Tensor:
    """ΔW in the (out, in) sense, float64, without the fp32 rounding of `to_dense`."""
    if layer.is_lowrank:
        u = layer.u.detach().cpu().double()
        d = layer.d.detach().cpu().double()
        return -layer.alpha.detach().cpu().double() * (d.T @ u)
    w = layer.dense.detach().cpu().double()
    return w.T if layer.transposed else w


def combine(deltas: list[Delta], rank: int | None = None) -> tuple[Delta, dict[str, float]]:
    """One delta whose ΔW is the sum of `deltas`' (exact), or its best rank-`rank`
    approximation per weight; plus per weight ‖ΔW_stored − ΣΔW‖_F / ‖ΣΔW‖_F."""
    names = sorted({n for d in deltas for n in d.layers})
    layers, errors = {}, {}
    for name in names:
        parts = [d.layers[name] for d in deltas if name in d.layers]
        shape, transposed = parts[0].shape, parts[0].transposed
        if any(p.shape != shape or p.transposed != transposed for p in parts):
            raise LedgerError(f"{name}: the segment's deltas disagree on the weight's shape or "
                              f"orientation; run `mendctl verify`")
        exact = sum(_dw64(p) for p in parts)
        lowrank = all(p.is_lowrank for p in parts)
        exact_rank = sum(p.rank for p in parts) if lowrank else min(shape)
        if rank is not None and exact_rank > rank:
            layer = _truncated(name, shape, transposed, exact, rank)
        elif lowrank:
            layer = _stacked(name, parts)
        else:
            dense = exact.T if transposed else exact
            layer = LayerDelta(name, shape, dense=dense.float().contiguous(), transposed=transposed)
        ref = float(torch.linalg.norm(exact))
        err = float(torch.linalg.norm(_dw64(layer) - exact))
        errors[name] = err / ref if ref > 0 else err  # edits that cancel out: absolute
        layers[name] = layer
    return Delta(layers), errors


def _stacked(name: str, parts: list[LayerDelta]) -> LayerDelta:
    """The parts' factor rows stacked: ΔW = −α' δ̃'ᵀ ũ' is exactly their sum."""
    def cat(ts):
        dtype = reduce(torch.promote_types, [t.dtype for t in ts])
        return torch.cat([t.detach().cpu().to(dtype) for t in ts]).contiguous()

    u = cat([p.u for p in parts])
    alphas = [p.alpha.detach().cpu().double() for p in parts]
    if all(torch.equal(a, alphas[0]) for a in alphas):
        # One editor checkpoint uses one α per weight: keep it and the factors as they are
        # (no arithmetic, so no rounding, and the file is no bigger than the segment's).
        return LayerDelta(name, parts[0].shape, u=u, d=cat([p.d for p in parts]),
                          alpha=parts[0].alpha.detach().cpu().clone(),
                          transposed=parts[0].transposed)
    # Different α's are folded into δ̃ in float64, where the product of two float32
    # numbers is exact: the factors add no rounding of their own (at twice the bytes of δ̃).
    d = torch.cat([a * p.d.detach().cpu().double() for a, p in zip(alphas, parts)])
    return LayerDelta(name, parts[0].shape, u=u, d=d.contiguous(), alpha=torch.tensor(1.0),
                      transposed=parts[0].transposed)


def _truncated(name: str, shape, transposed: bool, exact: torch.Tensor, rank: int) -> LayerDelta:
    U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
    # −dᵀu = U_r S_r V_rᵀ with α = 1. The factors stay float64 (r rows are cheap) so the
    # error reported is the truncation's alone, and describes the file as stored.
    d = -(U[:, :rank] * S[:rank]).T
    u = Vh[:rank]
    return LayerDelta(name, shape, u=u.contiguous(), d=d.contiguous(), alpha=torch.tensor(1.0),
                      transposed=transposed)
