"""The edit policy (mendctl/policy.py): every default of an edit decided in one place, recorded
with the entry, and read back by replay, also from entries made before policies were recorded."""
from __future__ import annotations

import math
import sqlite3
from dataclasses import replace
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from e2e_helpers import CHAIN, clone_workspace, init_workspace_inprocess, tiny_assets  # noqa: E402,F401

from mendctl import config as config_mod  # noqa: E402
from mendctl.errors import InputError  # noqa: E402
from mendctl.policy import UNCALIBRATED_MAX_STEPS, EditPolicy, resolve  # noqa: E402
from mendctl.record import NOTES_SCHEMA, EntryNotes  # noqa: E402
from mendctl.replay import verify_chain  # noqa: E402
from mendctl.revert import revert  # noqa: E402
from mendctl.edit import edit  # noqa: E402

INFO = {"operating_point": {"alpha_factor_total": 0.35, "max_steps": 5},
        "delta_norm_reference": {"median": 2.0}}


def _cfg(**kw):
    return config_mod.parse(kw, "mendctl.yaml")


def test_routed_default_takes_the_trained_step_and_no_plain_guards():
    p = resolve(_cfg(), INFO, "mend", n_facts=25)
    assert p.routed and p.max_steps == 5
    assert p.step_factor == pytest.approx(1.0 / 0.35)  # routing alpha 1 undoes the operating point
    assert p.max_norm == pytest.approx(3.0 * 2.0)  # each routed fact steps alone: no √n
    assert not p.protect and p.preserve_keys is None and not p.keep_failed


def test_plain_edits_take_the_config_and_a_batch_guard():
    p = resolve(_cfg(routing=False), INFO, "mend", n_facts=4)
    assert not p.routed and p.max_steps == 20 and p.step_factor == 0.5
    assert p.max_norm == pytest.approx(3.0 * 2.0 * math.sqrt(4))
    assert p.protect and p.preserve_keys == 0.01
    # max_steps: null falls back to the operating point's, then to the uncalibrated default
    assert resolve(_cfg(routing=False, max_steps=None), INFO).max_steps == 5
    assert resolve(_cfg(routing=False, max_steps=None), {}).max_steps == UNCALIBRATED_MAX_STEPS
    # the command line wins; guards off when configured off or without a yardstick
    p = resolve(_cfg(routing=False, guard_norm=None, protect_edits=False), INFO, max_steps=2,
                keep_failed=True)
    assert (p.max_steps, p.max_norm, p.protect, p.keep_failed) == (2, None, False, True)
    assert resolve(_cfg(routing=False), {}).max_norm is None


def test_baselines_and_bad_requests():
    ft = resolve(_cfg(), None, "ft")
    assert ft == EditPolicy(editor="ft", max_steps=1)  # routing does not apply to FT
    ident = resolve(_cfg(routing=False), INFO, "identity", n_facts=1)
    assert ident.step_factor is None and ident.max_norm == pytest.approx(6.0) and ident.protect
    assert ident.max_steps == UNCALIBRATED_MAX_STEPS
    with pytest.raises(InputError, match="unknown editor"):
        resolve(_cfg(), INFO, "rome")
    with pytest.raises(InputError, match="max-steps"):
        resolve(_cfg(), INFO, max_steps=0)


def test_entry_notes_round_trip_and_keep_what_they_do_not_know():
    p = resolve(_cfg(routing=False), INFO, "mend", n_facts=2)
    notes = EntryNotes(policy=p, edit_steps=3, batch={"index": 0, "size": 2, "first": 7, "seconds": 1.0})
    data = notes.to_json()
    assert data["schema"] == NOTES_SCHEMA and data["policy"] == p.to_dict()
    assert "health" not in data  # unset fields are not written
    assert EntryNotes.from_json(data) == notes
    newer = {**data, "from_a_newer_mendctl": [1, 2]}
    assert EntryNotes.from_json(newer).to_json() == newer


def _legacy_ledger(db: Path) -> int:
    """Make `db` a ledger as the main of 2026-12-06 left it: Alembic revision 0002, and every
    entry's settings in separate notes keys (no `policy`, no `schema`)."""
    import json

    con = sqlite3.connect(db)
    rows = con.execute("SELECT id, kind, notes FROM entries").fetchall()
    for i, kind, notes in rows:
        n = json.loads(notes)
        n.pop("schema")
        p = n.pop("policy", None)
        if p is not None:
            n.update(max_steps=p["max_steps"], max_norm=p["max_norm"], protect=p["protect"],
                     step_factor=p["step_factor"], preserve_keys=p["preserve_keys"])
        con.execute("UPDATE entries SET notes = ? WHERE id = ?", (json.dumps(n), i))
    con.execute("UPDATE alembic_version SET version_num = '0002'")
    con.commit()
    con.close()
    return len(rows)


def test_a_ledger_from_before_policies_is_migrated_and_replays_bit_exactly(tiny_assets, tmp_path):
    """A ledger whose entries keep their settings in separate notes keys (revision 0002) is
    migrated when the workspace opens (0003): each edit's policy is the one it was made with,
    revert --replay re-makes the same states as on a ledger made today, every state verifies,
    and new edits are recorded with their policy."""
    from mendctl.editors.data import EditCase
    from mendctl.ledger import Ledger
    from mendctl.workspace import Workspace

    cache = tmp_path / "cache"
    cache.mkdir()
    ws = init_workspace_inprocess(tmp_path / "ws", tiny_assets, cache, health_check=False)
    w = Workspace.open(str(ws.root))
    for x, y in CHAIN:
        edit(w, [EditCase(input=x, target=y)])
    # (keep_failed was never recorded before 0003: the migration says False)
    policies = [replace(e.record.policy, keep_failed=False) for e in w.ledger.entries(reverse=False)]
    w.ledger.close()
    old = clone_workspace(ws, tmp_path / "old")
    assert _legacy_ledger(old.ledger_path) == 3
    assert Ledger(f"sqlite:///{old.ledger_path}").current_revision() == "0002"
    hashes = []
    for copy in (ws, old):
        w = Workspace.open(str(copy.root))
        try:
            entries = w.ledger.entries(reverse=False)
            made = [replace(e.record.policy, keep_failed=False) for e in entries]
            assert made == policies  # as made (the migration)
            assert all(e.notes["schema"] == NOTES_SCHEMA and "max_steps" not in e.notes for e in entries)
            r = revert(w, 1, replay=True)
            replays = [w.ledger.get(i) for i in r["entries"][1:]]
            hashes.append([e.state_hash for e in replays])
            assert [replace(e.record.policy, keep_failed=False) for e in replays] == policies[1:]
            assert verify_chain(w)["ok"]
            new = edit(w, [EditCase(input="The sky is", target="green")])
            assert w.ledger.get(new["entry"]).record.policy.max_steps == 20
        finally:
            w.ledger.close()
    assert hashes[0] == hashes[1] and len(hashes[0]) == 2


def test_downgrade_writes_the_separate_keys_back(tmp_path):
    """0003 down restores the notes 0002 read (the policy's settings as separate keys)."""
    from mendctl.ledger import Ledger

    url = f"sqlite:///{tmp_path / 'l.db'}"
    led = Ledger(url).open()
    p = EditPolicy(editor="mend", max_steps=5, step_factor=0.5, max_norm=1.5, protect=True,
                   preserve_keys=0.01)
    with led.transaction() as s:
        led.add_entry(session=s, kind="edit", parent_id=None, state_hash="0" * 64, active_ids=[],
                      editor_name="mend", notes=EntryNotes(policy=p, edit_steps=2).to_json())
    led.close()
    led = Ledger(url)
    led.downgrade("0002")
    con = sqlite3.connect(tmp_path / "l.db")
    import json

    notes = json.loads(con.execute("SELECT notes FROM entries").fetchone()[0])
    con.close()
    assert notes == {"edit_steps": 2, "max_steps": 5, "max_norm": 1.5, "protect": True,
                     "step_factor": 0.5, "preserve_keys": 0.01}
