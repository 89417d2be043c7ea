"""Ledger (real SQLite files in tmp_path) and the workspace lock (a real second process)."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timezone

import pytest

from mendctl.errors import InputError, LedgerError, LockError
from mendctl.ledger import Entry, Ledger, sqlite_url
from mendctl.locking import WorkspaceLock

H1, H2, H3 = "1" * 64, "2" * 64, "3" * 64


@pytest.fixture
def ledger(tmp_path):
    with Ledger(sqlite_url(tmp_path / "ledger.db"), busy_timeout=5) as led:
        yield led


def edit_fields(**over):
    fields = dict(
        kind="edit", user="alice", host="box", command="mendctl edit --input X --target Y",
        inputs=["Who is India's PM?"], targets=["Narendra Modi"],
        request=[{"input": "Who is India's PM?", "target": "Narendra Modi",
                  "paraphrases": ["Who is the prime minister of India?"],
                  "locality": ["Where in the US is Raleigh?"], "subject": "India"}],
        editor_name="mend", editor_sha256="e" * 64, base_model_id="smollm2-135m",
        base_model_hash="b" * 64, weight_names=["model.layers.1.mlp.up_proj.weight"],
        delta_sha256=H1, delta_path=f"objects/11/{H1}.safetensors", delta_size=1234,
        delta_norms={"model.layers.1.mlp.up_proj.weight": 0.25},
        metrics_before={"es": 0.0, "ppl": 12.5}, metrics_after={"es": 1.0, "ppl": 12.75},
        state_hash=H2, active_ids=[], notes={"seed": 0})
    fields.update(over)
    return fields


def test_empty_ledger(ledger):
    assert ledger.head() is None
    assert ledger.entries() == []
    assert ledger.known_delta_hashes() == set()
    with pytest.raises(InputError, match=r"no entry 7; see `mendctl log`"):
        ledger.get(7)


def test_plain_path_becomes_sqlite_url(tmp_path):
    led = Ledger(tmp_path / "sub" / "l.db")
    assert led.url == "sqlite:///" + (tmp_path / "sub" / "l.db").resolve().as_posix()
    led.open().close()
    assert (tmp_path / "sub" / "l.db").is_file()


def test_add_entries_head_get_and_order(ledger):
    e1 = ledger.add_entry(**edit_fields(active_ids=[]))
    e1_active = [e1.id]
    e2 = ledger.add_entry(**edit_fields(parent_id=e1.id, delta_sha256=H3, state_hash=H3,
                                        active_ids=e1_active + [e1.id + 1]))
    r = ledger.add_entry(kind="revert", parent_id=e2.id, reverts_id=e2.id, state_hash=H2,
                         active_ids=[e1.id])
    assert (e1.id, e2.id, r.id) == (1, 2, 3)
    assert ledger.head().id == r.id
    assert [e.id for e in ledger.entries()] == [3, 2, 1]
    assert [e.id for e in ledger.entries(reverse=False)] == [1, 2, 3]
    assert [e.id for e in ledger.entries(limit=2)] == [3, 2]
    assert ledger.get(2).parent_id == 1
    assert ledger.known_delta_hashes() == {H1, H3}
    assert r.delta_sha256 is None and r.status == "ok" and r.inputs == []


def test_json_fields_round_trip_and_to_dict(tmp_path):
    url = sqlite_url(tmp_path / "l.db")
    fields = edit_fields()
    with Ledger(url) as led:
        e = led.add_entry(**fields)
    with Ledger(url) as led:  # a fresh connection: values really come from the file
        got = led.get(e.id)
    for key, value in fields.items():
        assert getattr(got, key) == value, key
    assert got.created_at.tzinfo is not None
    assert abs((datetime.now(timezone.utc) - got.created_at).total_seconds()) < 60
    d = got.to_dict()
    assert set(d) == {c.key for c in Entry.__table__.columns}
    assert json.loads(json.dumps(d)) == d
    assert d["id"] == e.id and d["request"][0]["paraphrases"] == fields["request"][0]["paraphrases"]
    assert datetime.fromisoformat(d["created_at"]) == got.created_at


def test_entry_usable_after_session(ledger):
    e = ledger.add_entry(**edit_fields())
    ledger.close()  # even with the engine gone, loaded attributes stay readable
    assert e.state_hash == H2 and e.inputs == ["Who is India's PM?"]


def test_add_entry_validation(ledger):
    with pytest.raises(TypeError, match="unknown entry field"):
        ledger.add_entry(**edit_fields(colour="red"))
    with pytest.raises(TypeError, match="state_hash"):
        ledger.add_entry(kind="edit")
    with pytest.raises(TypeError, match="kind"):
        ledger.add_entry(kind="Edit!", state_hash=H1)
    with pytest.raises(LedgerError, match="existing entry"):  # foreign keys are enforced
        ledger.add_entry(**edit_fields(parent_id=42))
    assert ledger.head() is None


def test_transaction_rolls_back_together(ledger):
    with pytest.raises(RuntimeError):
        with ledger.transaction() as s:
            ledger.add_entry(session=s, **edit_fields())
            ledger.set_meta("base_model_hash", "b" * 64, session=s)
            raise RuntimeError("file commit failed")
    assert ledger.head() is None and ledger.get_meta("base_model_hash") is None
    with ledger.transaction() as s:
        e = ledger.add_entry(session=s, **edit_fields())
        assert e.id == 1
        assert ledger.head(session=s).id == 1
    assert ledger.head().id == 1


def test_meta_and_audits(ledger):
    assert ledger.get_meta("base_model_hash") is None
    assert ledger.get_meta("base_model_hash", "none") == "none"
    ledger.set_meta("base_model_hash", "b" * 64)
    ledger.set_meta("base_model_hash", "c" * 64)  # overwrite
    ledger.set_meta("base_model_id", "smollm2")
    assert ledger.get_meta("base_model_hash") == "c" * 64
    assert ledger.all_meta() == {"base_model_hash": "c" * 64, "base_model_id": "smollm2"}
    with pytest.raises(TypeError):
        ledger.set_meta("n", 3)

    e = ledger.add_entry(**edit_fields())
    a0 = ledger.add_audit(None, {"ppl": 12.5})
    a1 = ledger.add_audit(e.id, {"locality": 0.98, "es": [1, 0]}, report_path="audits/1.html")
    assert [a.id for a in ledger.audits()] == [a1.id, a0.id]
    got = ledger.audits(entry_id=e.id)
    assert len(got) == 1 and got[0].summary == {"locality": 0.98, "es": [1, 0]}
    assert got[0].to_dict()["report_path"] == "audits/1.html"
    with pytest.raises(LedgerError):
        ledger.add_audit(999, {})


def test_writers_queue_with_begin_immediate(tmp_path):
    url = sqlite_url(tmp_path / "l.db")
    Ledger(url).open().close()
    a, b = Ledger(url, busy_timeout=0.2).open(), Ledger(url, busy_timeout=0.2).open()
    try:
        with a.transaction():
            # a holds the write lock from BEGIN on, before writing anything...
            with pytest.raises(LedgerError, match="locked by another mendctl process"):
                with b.transaction():
                    pass
            # ...while readers are not blocked (WAL)
            assert b.head() is None
        with b.transaction() as s:
            b.add_entry(session=s, **edit_fields())
    finally:
        a.close()
        b.close()


def test_writer_waits_for_busy_timeout(tmp_path):
    url = sqlite_url(tmp_path / "l.db")
    a, b = Ledger(url).open(), Ledger(url, busy_timeout=10).open()
    try:
        released = threading.Event()

        def hold():
            with a.transaction() as s:
                a.add_entry(session=s, **edit_fields())
                started.set()
                time.sleep(0.3)
            released.set()

        started = threading.Event()
        t = threading.Thread(target=hold)
        t.start()
        started.wait(5)
        b.add_entry(**edit_fields(parent_id=1))  # waits for a's commit, then sees entry 1
        assert released.is_set()
        t.join()
        assert [e.id for e in b.entries()] == [2, 1]
    finally:
        a.close()
        b.close()


def test_unreadable_file_is_a_ledger_error(tmp_path):
    p = tmp_path / "l.db"
    p.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="not an SQLite database"):
        Ledger(p).open()


def test_foreign_database_is_refused(tmp_path):
    p = tmp_path / "other.db"
    with sqlite3.connect(p) as con:
        con.execute("CREATE TABLE entries (x)")
    with pytest.raises(LedgerError, match="not a mendctl ledger"):
        Ledger(p).open()


def test_unopened_ledger_says_so(tmp_path):
    with pytest.raises(LedgerError, match="open"):
        Ledger(tmp_path / "l.db").head()


# -- workspace lock -----------------------------------------------------------------------

_HOLDER = textwrap.dedent("""
    import sys
    from mendctl.locking import WorkspaceLock
    with WorkspaceLock(sys.argv[1], timeout=10, command="mendctl edit --input X"):
        print("locked", flush=True)
        sys.stdin.read()  # hold until the test closes our stdin
""")


@pytest.mark.subprocess
def test_lock_held_by_another_process(tmp_path):
    lock_path = tmp_path / ".mendctl" / "lock"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(LockError) as err:
            with WorkspaceLock(lock_path, timeout=0.3):
                pass
        assert time.monotonic() - t0 >= 0.25
        msg = str(err.value)
        assert f"process {proc.pid}" in msg
        assert "mendctl edit --input X" in msg and "since" in msg and "Wait" in msg
        assert err.value.holder["pid"] == proc.pid
    finally:
        proc.stdin.close()
        proc.wait(10)
    # the holder exited: the lock is free again and its side file is gone
    with WorkspaceLock(lock_path, timeout=1) as lk:
        assert lk.is_locked and lk.holder()["pid"] == os.getpid()
    assert not lk.holder_path.exists()


@pytest.mark.subprocess
def test_lock_released_when_holder_dies(tmp_path):
    lock_path = tmp_path / "lock"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    proc.kill()  # no clean release: the OS drops the lock, the stale side file is ignored
    proc.wait(10)
    with WorkspaceLock(lock_path, timeout=2):
        pass


def test_lock_in_process_is_exclusive(tmp_path):
    with WorkspaceLock(tmp_path / "lock", timeout=1, command="first"):
        with pytest.raises(LockError, match=rf"process {os.getpid()} .*`first`"):
            WorkspaceLock(tmp_path / "lock", timeout=0).acquire()
