"""`mendctl revert`: an edit taken out of the chain, recorded, never rewritten.

An exact revert drops the entry's delta from the active list (its state is base + the other
deltas, or their routes, as they were made). `--replay` also recomputes every later plain edit
on the state without it (they were made on a model that contained it; replay.py). Both report
the gap between the two: how far the later edits' success and the locality prompts' answers
move (`exact_replay_gap`), or for routed edits, the later edits' success before and after
(`routed_gap`), which have no replay alternative: each acts behind its own gate.
"""
from __future__ import annotations

from .editors.data import generic_text_samples
from .editors.delta import state_hash
from .editors.metrics import locality_reference, locality_scores, target_scores
from .errors import InputError
from .ledger import Entry
from .record import EntryNotes
from .replay import record_replays, replay_entries


def active_check(ws, entry_id: int) -> tuple[Entry, Entry]:
    """(the entry to revert, the head), or InputError when it cannot be reverted."""
    target = ws.ledger.get(entry_id)
    head = ws.head()
    if target.delta_sha256 is None:
        raise InputError(f"entry {entry_id} is a {target.kind}, not an edit; only entries "
                         f"with a delta can be reverted (see `mendctl log`)")
    if entry_id not in head.active_ids:
        by = [e.id for e in ws.ledger.entries() if e.reverts_id == entry_id]
        why = f" (reverted by entry {by[0]})" if by else ""
        raise InputError(f"entry {entry_id} is not active in the current state{why}; "
                         f"nothing to revert")
    # a routed edit of a subject edited before holds the subject's earlier facts too, made
    # again with its own (`together`): dropping one of those alone would leave the later
    # entry's share of it behind
    later = [i for i in head.active_ids[head.active_ids.index(entry_id) + 1:]
             if entry_id in ((ws.ledger.get(i).record.routing or {}).get("remade") or [])]
    if later:
        raise InputError(f"entry {later[-1]} made entry {entry_id}'s fact again together with "
                         f"its own (an edit of the same subject): revert entry {later[-1]} "
                         f"first, then entry {entry_id}, and edit entry {later[-1]}'s fact "
                         f"again if it should stay")
    return target, head


def revert(ws, entry_id: int, replay: bool = False, command: str | None = None) -> dict:
    """Revert entry `entry_id` of `ws`'s head state (exactly, or `replay`ing the later edits)."""
    with ws.lock():
        target, head = active_check(ws, entry_id)
        active = list(head.active_ids)
        k = active.index(entry_id)
        keep, later = active[:k], active[k + 1:]
        exact_active = keep + later
        w_exact = ws.weights_for(exact_active)
        plain, routed_ = ws.split(exact_active)
        exact_hash = ws.state_key(w_exact, plain, ws.router.edits(routed_))
        routed_here = ws.routed_ids(active)
        if routed_here and replay:
            raise InputError(f"this state routes edits {routed_here} (routing); `revert "
                             f"--replay` recomputes plain weight edits only. Revert exactly "
                             f"(without --replay): a routed edit acts behind its own gate, so "
                             f"dropping it leaves the others as they were made")
        # the replay alternative: every later edit recomputed on the state without entry_id
        # (not for routed states: see above)
        replayed = [] if routed_here else replay_entries(ws, keep, later)
        gap = routed_gap(ws, w_exact, exact_hash, routed_, later) if routed_here and later \
            else exact_replay_gap(ws, w_exact, replayed[-1]["weights"] if replayed else w_exact, later)
        # (an exact revert records no delta: the replayed ones only measured the gap)
        with ws.recorder.recording([r["delta"] for r in replayed] if replay else []) as (s, staged):
            rev = ws.ledger.add_entry(
                session=s, kind="revert", parent_id=head.id, reverts_id=entry_id,
                **ws.provenance(command), inputs=list(target.inputs),
                targets=list(target.targets), base_model_id=ws.lm.model_id,
                base_model_hash=ws.lm.base_hash, weight_names=list(target.weight_names),
                state_hash=exact_hash if not replay else state_hash(ws.weights_for(keep)),
                active_ids=exact_active if not replay else keep,
                notes=EntryNotes(mode="replay" if replay else "exact", gap=gap).to_json())
            ids = [rev.id]
            if replay:
                ids += record_replays(ws, s, rev.id, list(keep), replayed, staged, command,
                                      {"reverted": entry_id})
    ws.forget_loaded_state()
    return {"reverted": entry_id, "mode": "replay" if replay else "exact", "entries": ids,
            "state_hash": exact_hash if not replay else (replayed[-1]["hash"] if replayed else exact_hash),
            "restores_parent": (not later and not replay and target.parent_id is not None
                                and exact_hash == ws.ledger.get(target.parent_id).state_hash),
            "later_edits": later, "gap": gap}


def routed_gap(ws, w_exact, exact_hash: str, routed_entries, later: list[int]) -> dict:
    """What an exact revert of a routed edit does to the edits after it (there is no replay
    alternative: see `revert`): the share of their facts that are still the model's answer
    without it, beside the share before (an edit made together with the reverted one, in
    a batch, took its steps with it installed)."""
    entries = [ws.ledger.get(i) for i in later]
    prompts = [p for e in entries for p in e.inputs]
    targets = [t for e in entries for t in e.targets]
    lm = ws.lm
    ws.use_state(ws.head())
    before = target_scores(lm.model, lm.tokenizer, prompts, targets, ws.fmt)[0]
    ws.set_weights(w_exact, exact_hash)
    ws.router.install(ws.router.edits(routed_entries))
    after = target_scores(lm.model, lm.tokenizer, prompts, targets, ws.fmt)[0]
    return {"later_edits": len(later), "kl": None, "top1_agreement": None,
            "es_before": float(sum(before) / len(before)),
            "es_exact": float(sum(after) / len(after)), "es_replay": None, "routed": True}


def exact_replay_gap(ws, w_exact, w_replay, later: list[int]) -> dict:
    """How far exact revert and revert-by-replay end apart: KL on locality prompts and the
    later edits' success under each."""
    if not later:
        return {"later_edits": 0, "kl": 0.0, "es_exact": None, "es_replay": None}
    entries = [ws.ledger.get(i) for i in later]
    prompts = [p for e in entries for p in e.inputs]
    targets = [t for e in entries for t in e.targets]
    loc = [p for e in entries for c in (e.request or []) for p in c.get("locality", [])]
    loc = loc or [" ".join(t.split()[:24]) for t in generic_text_samples(4)]
    lm = ws.lm
    ws.set_weights(w_exact, state_hash(w_exact))
    es_exact = target_scores(lm.model, lm.tokenizer, prompts, targets, ws.fmt)[0]
    ref = locality_reference(lm.model, lm.tokenizer, loc, ws.fmt)
    ws.set_weights(w_replay, state_hash(w_replay))
    es_replay = target_scores(lm.model, lm.tokenizer, prompts, targets, ws.fmt)[0]
    ag, kl = locality_scores(lm.model, ref)
    ws.forget_loaded_state()
    return {"later_edits": len(later), "kl": float(sum(kl) / len(kl)),
            "top1_agreement": float(sum(ag) / len(ag)),
            "es_exact": float(sum(es_exact) / len(es_exact)),
            "es_replay": float(sum(es_replay) / len(es_replay))}
