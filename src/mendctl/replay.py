"""`mendctl replay`: re-making a chain's edits, and checking its states.

- `replay_entries` recomputes recorded edits in order on another state, each with the policy it
  was made with (its entry's `record.policy`), a squash as the edits it combined; `record_replays` records
  them as `replay` entries inside the caller's recording (revert --replay, replay --editor);
- `verify_chain` (`replay --verify`) rebuilds every state from the base and the deltas, one
  delta at a time where the active list only grew, and compares each with its recorded hash;
- `replay_onto` re-runs the active edits on another base model, into a new workspace, or with
  another editor as a new chain here.
Routed edits are not recomputed: each acts behind its own gate, as it was made.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from . import routing
from .edit import edit, edit_with
from .editors.delta import Delta, apply_deltas, state_hash
from .errors import InputError, LedgerError, StoreError
from .record import EntryNotes
from .workspace import Workspace


def replay_entries(ws, start_active: list[int], ids: list[int], editor: str | None = None) -> list[dict]:
    """Recompute the edits `ids` in order on base + start_active (not recorded).

    A squash entry is recomputed as the edits it combined, each with its own editor and
    steps: re-running its facts as one batched MEND edit would be a different edit."""
    routed_ = ws.routed_ids(list(start_active) + list(ids))
    if routed_:
        raise InputError(f"entries {routed_} are routed edits (routing); replay recomputes "
                         f"plain weight edits only")
    out = []
    w = ws.weights_for(start_active)
    done = [(p, t) for i in start_active for p, t in ws.pairs_of(i)]
    for i in expand_squashes(ws, ids):
        old = ws.ledger.get(i)
        # an edit re-runs with the policy it was made with (a replay must make the same
        # delta even if the configuration has changed since); re-run by another editor, it
        # keeps the recorded steps and guards and takes this workspace's step size and
        # preserved keys
        policy = old.record.policy
        if policy is None:
            raise LedgerError(f"entry {old.id} records no edit policy; upgrade the ledger "
                              f"(`mendctl db upgrade`) and try again")
        if editor and editor != policy.editor:
            fresh = ws.policy(editor, max(len(old.inputs or []), 1), policy.max_steps)
            policy = replace(fresh, max_norm=policy.max_norm,
                             protect=policy.protect and editor in ("mend", "identity"))
        ed = ws.editor_for(policy)
        preserve = ws.preserved(ed, policy.preserve_keys)
        ws.set_weights(w, state_hash(w))
        cases = old.cases()
        # the retention guard, if it was on, over the edits active now
        protect = list(done) if policy.protect else None
        delta = edit_with(ed, ws.lm.model, ws.lm.tokenizer, cases, ws.fmt,
                          policy.max_steps, policy.max_norm, protect, preserve)
        done += [(c.input, c.target) for c in cases]
        delta.meta.update({"editor": ed.name, "base_model_hash": ws.lm.base_hash})
        w = apply_deltas(w, [delta])
        out.append({"entry": old, "delta": delta, "weights": w, "hash": state_hash(w),
                    "editor_sha256": ed.sha256, "cases": cases, "policy": policy})
    ws.forget_loaded_state()
    return out


def expand_squashes(ws, ids: list[int]) -> list[int]:
    """`ids` with every squash entry replaced by the edits it combined (recursively)."""
    out = []
    for i in ids:
        e = ws.ledger.get(i)
        squashed = e.record.squashed if e.kind == "squash" else None
        out += expand_squashes(ws, list(squashed)) if squashed else [i]
    return out


def record_replays(ws, s, parent: int, active: list[int], replayed: list[dict],
                    staged: list, command: str | None, notes: dict) -> list[int]:
    """Record recomputed edits as `replay` entries inside the caller's recording (their
    delta files staged there, in order)."""
    ids = []
    for r, st in zip(replayed, staged):
        old = r["entry"]
        e = ws.ledger.add_entry(
            session=s, kind="replay", parent_id=parent, replay_of_id=old.id,
            **ws.provenance(command), inputs=list(old.inputs),
            targets=list(old.targets), request=old.request,
            editor_name=r["delta"].meta.get("editor"), editor_sha256=r["editor_sha256"],
            base_model_id=ws.lm.model_id, base_model_hash=ws.lm.base_hash,
            weight_names=r["delta"].names(), delta_sha256=st.sha256,
            delta_path=st.rel_path, delta_size=st.size,
            delta_norms=r["delta"].norms(), state_hash=r["hash"], active_ids=active,
            notes=EntryNotes(replay_of=old.id, policy=r["policy"], **notes).to_json())
        active = active + [e.id]
        e.active_ids = active
        s.flush()
        parent = e.id
        ids.append(e.id)
    return ids


def verify_chain(ws, progress=None) -> dict:
    """Rebuild every state from the base and the deltas; compare with recorded hashes."""
    _ = ws.lm
    entries = ws.ledger.entries(reverse=False)
    cache: dict[int, Delta] = {}
    problems, checked = [], 0
    prev_active: list[int] | None = None
    w = None
    for e in (progress(entries) if progress else entries):
        # plain entries are summed into the weights; routed ones enter the hash (routing.py)
        active, routed_ = ws.split(e.active_ids)
        try:
            w, _ = ws.chain_weights(active, prev_active, w, cache)
            h = ws.state_key(w, active, ws.router.edits(routed_)) if routed_ \
                else state_hash(w)
        except (StoreError, LedgerError) as err:
            problems.append(f"entry {e.id}: {err}")
            prev_active = None
            continue
        checked += 1
        if h != e.state_hash:
            problems.append(f"entry {e.id}: rebuilt state {h[:12]} != recorded {e.state_hash[:12]}")
        prev_active = active
    return {"entries": len(entries), "checked": checked, "ok": not problems, "problems": problems}


def replay_onto(ws, out: str | Path | None, model: str | None = None,
                editor: str | None = None, command: str | None = None, progress=None) -> dict:
    """Re-run the active edits, in order, on another base model (into a new workspace at
    `out`) or with another editor (as a new chain in this workspace)."""
    head = ws.head()
    if head is None or not head.active_ids:
        raise InputError("there are no active edits to replay")
    requests = []
    for i in expand_squashes(ws, list(head.active_ids)):
        e = ws.ledger.get(i)
        requests.append((e, e.cases()))
    if model:
        if not out:
            raise InputError("--onto-model needs --out DIR: a new workspace for the new base")
        # routed edits are replayed routed, with this workspace's settings (or the defaults)
        routed_ = ws.split(head.active_ids)[1]
        settings = ws.config.routing or (
            {k: routing.of(routed_[-1]).get(k, v) for k, v in routing.DEFAULTS.items()} if routed_ else None)
        target_dir = Workspace.init(out, model=model, routing_=settings if routed_ else False)
        other = Workspace.open(str(target_dir))
        results = []
        for e, cases in (progress(requests) if progress else requests):
            # keep_failed: a replay carries the whole chain over and reports each edit's
            # success on the new model, rather than stopping at the first that fails there
            r = edit(other, cases, editor=editor or "mend",
                           command=command or f"replay of entry {e.id} from {ws.root}",
                           keep_failed=True)
            results.append({"from": e.id, "entry": r["entry"],
                            "edit_success": r["after"]["edit_success"]})
        return {"workspace": str(target_dir), "replayed": results}
    with ws.lock():
        replayed = replay_entries(ws, [], [e.id for e, _ in requests], editor=editor)
        with ws.recorder.recording([r["delta"] for r in replayed]) as (s, staged):
            ids = record_replays(ws, s, head.id, [], replayed, staged, command, {"editor": editor})
    ws.forget_loaded_state()
    return {"entries": ids, "state_hash": replayed[-1]["hash"]}
