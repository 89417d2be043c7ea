"""The ledger on PostgreSQL, side by side with SQLite: migrations, the API, chains, locking.

Most tests are parametrized over both back ends (`backend`): whatever holds on SQLite must hold
on PostgreSQL. The PostgreSQL server is a throw-away one the session starts itself
(tests/pg_helpers.py); without the server binaries those cases skip, saying
`apt-get install postgresql`.

The workspace tests use the tiny offline model and untrained MEND editor of
tests/e2e_helpers.py, so a full edit takes a fraction of a second.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import (cli_env, init_workspace_inprocess, run_cli,  # noqa: E402,F401
                         tiny_assets)
from pg_helpers import pg_server, pg_url  # noqa: E402,F401

from mendctl.errors import InputError, LedgerError  # noqa: E402
from mendctl.ledger import Base, Entry, Ledger, chain_lock_key, sqlite_url  # noqa: E402
from mendctl.replay import verify_chain  # noqa: E402
from mendctl.verify import gc  # noqa: E402
from mendctl.verify import verify  # noqa: E402
from mendctl.edit import edit  # noqa: E402

TABLES = {"entries", "workspace_meta", "audits"}
H1, H2, H3 = "1" * 64, "2" * 64, "3" * 64


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def url(backend, request, tmp_path) -> str:
    """A fresh, empty ledger database on the back end under test."""
    if backend == "sqlite":
        return sqlite_url(tmp_path / "ledger.db")
    return request.getfixturevalue("pg_url")


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url, poolclass=sa.pool.NullPool)


def _tables(url: str) -> set[str]:
    engine = _engine(url)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"sqlite_sequence"}
    finally:
        engine.dispose()


def _columns(url: str, table: str) -> set[str]:
    engine = _engine(url)
    try:
        return {c["name"] for c in sa.inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def fields(**over):
    f = dict(kind="edit", user="alice", host="box", command="mendctl edit",
             inputs=["Who is India's PM?"], targets=["Narendra Modi"],
             request=[{"input": "Who is India's PM?", "target": "Narendra Modi"}],
             editor_name="mend", weight_names=["w"], delta_sha256=H1,
             delta_path=f"objects/11/{H1}.safetensors", delta_size=12,
             delta_norms={"w": 0.25}, metrics_after={"edit_success": 1.0},
             state_hash=H2, active_ids=[], notes={"seed": 0})
    f.update(over)
    return f


# -- (1) migrations ---------------------------------------------------------------------------
def test_migrations_to_head_down_and_up(url):
    led = Ledger(url)
    assert led.current_revision() is None
    led.open()
    head = led.head_revision()
    assert head == "0003" and led.current_revision() == head
    assert TABLES <= _tables(url)
    assert "chain" in _columns(url, "entries") and "chain" in _columns(url, "workspace_meta")

    # the ORM models and the migrated schema agree on this back end too
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True,
                                                         "compare_server_default": True})
            assert compare_metadata(ctx, Base.metadata) == []
        insp = sa.inspect(engine)
        for table in Base.metadata.sorted_tables:
            assert {i["name"] for i in insp.get_indexes(table.name)} == \
                {i.name for i in table.indexes}
            assert insp.get_pk_constraint(table.name)["constrained_columns"] == \
                [c.name for c in table.primary_key.columns]
    finally:
        engine.dispose()

    # 0003 (data): a policy record down to the separate keys 0002 read, and back
    policy = {"editor": "mend", "max_steps": 5, "step_factor": 0.5, "max_norm": None,
              "protect": True, "preserve_keys": 0.01, "routing": None, "keep_failed": False}
    led.add_entry(kind="edit", state_hash="a" * 64, editor_name="mend",
                  notes={"schema": 2, "policy": policy, "edit_steps": 2})
    led.downgrade("0002")
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            raw = conn.execute(sa.text("SELECT notes FROM entries")).scalar_one()
    finally:
        engine.dispose()
    raw = json.loads(raw) if isinstance(raw, str) else raw
    assert raw == {"edit_steps": 2, "max_steps": 5, "max_norm": None, "protect": True,
                   "step_factor": 0.5, "preserve_keys": 0.01}
    led.upgrade()
    assert led.entries()[0].record.policy.to_dict() == policy
    led.downgrade("0001")
    assert led.current_revision() == "0001"
    assert "chain" not in _columns(url, "entries")
    assert "chain" not in _columns(url, "workspace_meta")
    led.downgrade("base")
    assert led.current_revision() is None
    assert _tables(url) & TABLES == set()
    led.upgrade()
    assert led.current_revision() == head
    assert led.head() is None
    assert led.add_entry(kind="edit", state_hash="b" * 64).chain == "main"
    led.open()  # idempotent at head
    led.close()


def test_existing_ledger_upgrades_in_place(url):
    """A ledger written by schema 0001 (no chains) gains them: its rows become chain 'main'."""
    led = Ledger(url)
    led.upgrade("0001")
    # Rows as mendctl 0001 wrote them, through plain SQL (the ORM is at head).
    entries = sa.table("entries", *(sa.column(c) for c in ("id", "parent_id", "kind", "status")),
                       sa.column("created_at", sa.DateTime), sa.column("state_hash"),
                       *(sa.column(c, sa.JSON) for c in ("inputs", "targets", "weight_names",
                                                          "active_ids")),
                       sa.column("delta_sha256"))
    meta = sa.table("workspace_meta", sa.column("key"), sa.column("value"))
    audits = sa.table("audits", sa.column("entry_id"), sa.column("created_at", sa.DateTime),
                      sa.column("summary", sa.JSON))
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            row = dict(kind="edit", status="ok", created_at=now, inputs=["x"], targets=["y"],
                       weight_names=["w"], delta_sha256=H1)
            first = conn.execute(entries.insert().returning(entries.c.id),
                                 dict(row, parent_id=None, state_hash=H1, active_ids=[])).scalar()
            conn.execute(entries.update().where(entries.c.id == first)
                         .values(active_ids=[first]))
            second = conn.execute(entries.insert().returning(entries.c.id),
                                  dict(row, parent_id=first, state_hash=H2,
                                       active_ids=[first])).scalar()
            conn.execute(meta.insert(), [{"key": "base_model_hash", "value": "b" * 64}])
            conn.execute(audits.insert(), [{"entry_id": second, "created_at": now,
                                            "summary": {"ppl": 1.5}}])
    finally:
        engine.dispose()

    led.open()  # 0001 -> 0003, in place
    assert led.current_revision() == "0003"
    assert [e.id for e in led.entries(reverse=False)] == [first, second]
    assert {e.chain for e in led.entries()} == {"main"}
    assert led.head().id == second and led.get(first).active_ids == [first]
    assert led.get_meta("base_model_hash") == "b" * 64
    assert [a.entry_id for a in led.audits()] == [second]
    third = led.add_entry(**fields(parent_id=second, state_hash=H3))
    assert third.id > second and led.head().id == third.id

    # ...and back: a single-chain ledger downgrades, keeping its rows
    led.downgrade("0001")
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM entries")).scalar() == 3
            assert conn.execute(sa.text("SELECT value FROM workspace_meta")).scalar() == "b" * 64
            if url.startswith("sqlite"):  # the rebuilt table still never reuses ids
                sql = conn.execute(sa.text("SELECT sql FROM sqlite_master "
                                           "WHERE name = 'entries'")).scalar()
                assert "AUTOINCREMENT" in sql
    finally:
        engine.dispose()
    led.upgrade()
    assert led.head().id == third.id
    led.close()


def test_downgrade_refuses_to_merge_chains(url):
    Ledger(url, chain="a").open().add_entry(kind="edit", state_hash=H1)
    led = Ledger(url)
    with pytest.raises(LedgerError, match=r"chains other than 'main' \(entries: a\).*nothing"):
        led.downgrade("0001")
    assert led.current_revision() == "0003"
    assert Ledger(url, chain="a").open().head().state_hash == H1
    led.close()


# -- (2) the ledger API -------------------------------------------------------------------------
def test_ledger_api_basics(url):
    with Ledger(url, busy_timeout=5) as led:
        assert led.head() is None and led.entries() == [] and led.known_delta_hashes() == set()
        with pytest.raises(InputError, match=r"no entry 7; see `mendctl log`"):
            led.get(7)
        e1 = led.add_entry(**fields())
        e2 = led.add_entry(**fields(parent_id=e1.id, delta_sha256=H3, state_hash=H3,
                                    active_ids=[e1.id, e1.id + 1]))
        r = led.add_entry(kind="revert", parent_id=e2.id, reverts_id=e2.id, state_hash=H2,
                          active_ids=[e1.id])
        assert led.head().id == r.id
        assert [e.id for e in led.entries()] == [r.id, e2.id, e1.id]
        assert [e.id for e in led.entries(reverse=False, limit=2)] == [e1.id, e2.id]
        assert led.known_delta_hashes() == {H1, H3}

        got = led.get(e1.id)
        for key, value in fields().items():
            assert getattr(got, key) == value, key
        assert got.created_at.tzinfo is not None
        assert abs((datetime.now(timezone.utc) - got.created_at).total_seconds()) < 60
        d = got.to_dict()
        assert json.loads(json.dumps(d)) == d and d["chain"] == "main"

        with pytest.raises(LedgerError, match="existing entry"):  # foreign keys
            led.add_entry(**fields(parent_id=10**6))
        with pytest.raises(TypeError, match="chain"):
            led.add_entry(**fields(chain="other"))
        with pytest.raises(RuntimeError):
            with led.transaction() as s:
                led.add_entry(session=s, **fields())
                led.set_meta("k", "v", session=s)
                raise RuntimeError("the file commit failed")
        assert led.head().id == r.id and led.get_meta("k") is None

        led.set_meta("base_model_hash", "b" * 64)
        led.set_meta("base_model_hash", "c" * 64)
        led.set_meta("base_model_id", "tiny")
        assert led.get_meta("base_model_hash") == "c" * 64
        assert led.get_meta("missing", "none") == "none"
        assert led.all_meta() == {"base_model_hash": "c" * 64, "base_model_id": "tiny"}

        a0 = led.add_audit(None, {"ppl": 12.5})
        a1 = led.add_audit(e2.id, {"es": [1, 0]}, report_path="audits/1.html")
        assert [a.id for a in led.audits()] == [a1.id, a0.id]
        assert [a.summary for a in led.audits(entry_id=e2.id)] == [{"es": [1, 0]}]
        with pytest.raises(LedgerError):
            led.add_audit(10**6, {})


def test_unopened_ledger_says_so(url):
    with pytest.raises(LedgerError, match="Ledger.open"):
        Ledger(url).head()


# -- (3) chains -----------------------------------------------------------------------------------
def test_chains_share_a_database_but_not_a_history(url):
    a, b = Ledger(url, chain="team-a").open(), Ledger(url, chain="team.b_2").open()
    try:
        a1 = a.add_entry(**fields(state_hash=H1))
        b1 = b.add_entry(**fields(delta_sha256=H2, state_hash=H2))
        a2 = a.add_entry(**fields(parent_id=a1.id, delta_sha256=H3, state_hash=H3))
        assert (a.head().id, b.head().id) == (a2.id, b1.id)
        assert [e.id for e in a.entries()] == [a2.id, a1.id]
        assert [e.id for e in b.entries()] == [b1.id]
        assert Ledger(url, chain="main").open().head() is None  # nothing in the default chain
        with pytest.raises(InputError, match="belongs to chain 'team-a'"):
            b.get(a1.id)
        with pytest.raises(LedgerError, match="chain 'team-a'"):
            b.add_entry(**fields(parent_id=a2.id))
        # every chain's deltas are "known": gc in one workspace must not delete another's
        assert a.known_delta_hashes() == b.known_delta_hashes() == {H1, H2, H3}
        a.set_meta("base_model_id", "model-a")
        b.set_meta("base_model_id", "model-b")
        assert (a.get_meta("base_model_id"), b.get_meta("base_model_id")) == ("model-a", "model-b")
        assert b.all_meta() == {"base_model_id": "model-b"}
        audit = a.add_audit(a2.id, {"x": 1})
        assert [x.id for x in a.audits()] == [audit.id] and b.audits() == []
    finally:
        a.close()
        b.close()
    with pytest.raises(LedgerError, match="chain"):
        Ledger(url, chain="no spaces")


def test_postgresql_url_forms(pg_url):
    bare = pg_url.replace("postgresql+psycopg://", "postgresql://")
    led = Ledger(bare).open()  # a bare postgresql:// means psycopg 3 here, not psycopg2
    assert led.url.startswith("postgresql+psycopg://")
    led.close()
    secret = Ledger("postgresql+psycopg://me:s3cret@127.0.0.1:1/nodb", busy_timeout=1)
    with pytest.raises(LedgerError) as err:
        secret.open()
    assert "s3cret" not in str(err.value) and "PostgreSQL server running" in str(err.value)
    assert "s3cret" not in repr(secret)
    with pytest.raises(LedgerError, match="SQLite or PostgreSQL"):
        Ledger("mysql://x@y/z")


# -- locking --------------------------------------------------------------------------------------
def test_a_waiting_writer_gives_up_after_busy_timeout(url, backend):
    Ledger(url).open().close()
    a = Ledger(url, busy_timeout=5).open()
    b, b0 = Ledger(url, busy_timeout=0.3).open(), Ledger(url, busy_timeout=0).open()
    try:
        with a.transaction():  # holds the write lock from its start, before writing anything
            t0 = time.monotonic()
            with pytest.raises(LedgerError, match="locked by another mendctl process"):
                with b.transaction():
                    pass
            assert time.monotonic() - t0 >= 0.25
            with pytest.raises(LedgerError, match="locked by another mendctl process"):
                with b0.transaction():
                    pass
            assert b.head() is None  # readers are not blocked
            if backend == "postgresql":  # another chain's writer does not wait on PostgreSQL
                other = Ledger(url, chain="other", busy_timeout=0.3).open()
                other.add_entry(kind="edit", state_hash=H1)
                other.close()
        b.add_entry(**fields())  # free again
    finally:
        for led in (a, b, b0):
            led.close()


def test_chain_lock_keys_are_stable_64_bit():
    # Derived from the name alone (sha256, not Python's salted hash()), so every process on
    # every host, and every mendctl version sharing the database, takes the same lock: changing
    # the derivation would let an old and a new mendctl write one chain at once.
    digest = hashlib.sha256(b"mendctl.ledger.chain:main").digest()
    assert chain_lock_key("main") == int.from_bytes(digest[:8], "big", signed=True)
    assert chain_lock_key("main") != chain_lock_key("main2")
    assert all(-2**63 <= chain_lock_key(c) < 2**63 for c in ("main", "a", "x" * 128))


_APPENDER = textwrap.dedent("""
    import sys
    from mendctl.ledger import Ledger
    url, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    led = Ledger(url, busy_timeout=60).open()
    for i in range(n):
        with led.transaction() as s:  # read the head and append after it, atomically
            head = led.head(session=s)
            led.add_entry(session=s, kind="edit", parent_id=head.id if head else None,
                          state_hash="%064x" % (hash((tag, i)) % 16**64),
                          active_ids=(list(head.active_ids) if head else []),
                          inputs=[f"{tag}-{i}"])
    led.close()
""")


@pytest.mark.subprocess
def test_concurrent_ledger_writers_never_interleave(url, tmp_path):
    """Four processes appending to one chain with no workspace lock at all: the ledger's write
    transaction alone keeps the chain linear (BEGIN IMMEDIATE / the chain's advisory lock)."""
    Ledger(url).open().close()
    n = 15
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, url, f"p{k}", str(n)],
                              cwd=tmp_path, stderr=subprocess.PIPE, text=True) for k in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    with Ledger(url) as led:
        log = led.entries(reverse=False)
    assert len(log) == 4 * n
    assert log[0].parent_id is None
    assert all(e.parent_id == prev.id for prev, e in zip(log, log[1:]))
    assert sorted(i for e in log for i in e.inputs) == \
        sorted(f"p{k}-{i}" for k in range(4) for i in range(n))


# -- workspaces -----------------------------------------------------------------------------------
@pytest.fixture
def ws_factory(tiny_assets, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)

    def make(name: str, **config):
        return init_workspace_inprocess(tmp_path / name, tiny_assets, cache, **config)
    return make


def _edit(ws_root: Path, facts):
    from mendctl.editors.data import EditCase
    from mendctl.workspace import Workspace

    w = Workspace.open(str(ws_root))
    try:
        return [edit(w, [EditCase(input=x, target=y)])["entry"] for x, y in facts]
    finally:
        w.ledger.close()


def test_two_workspaces_keep_their_own_chains(url, ws_factory, tmp_path):
    """Two workspaces, one ledger database, one shared delta store: separate heads and
    histories, each reproducible, and gc in one keeps the other's deltas."""
    store = str(tmp_path / "shared-deltas")
    wa = ws_factory("ws-a", ledger=url, chain="team-a", store=store)
    wb = ws_factory("ws-b", ledger=url, chain="team-b", store=store)
    ids_a = _edit(wa.root, [("The capital of France is", "Rome"),
                            ("The Eiffel Tower is in", "Madrid")])
    ids_b = _edit(wb.root, [("Water boils at", "fifty degrees")])

    from mendctl.workspace import Workspace

    for ws, ids in ((wa, ids_a), (wb, ids_b)):
        w = Workspace.open(str(ws.root))
        try:
            log = w.ledger.entries(reverse=False)
            assert [e.id for e in log] == ids
            assert w.head().id == ids[-1] and list(w.head().active_ids) == ids
            assert w.ledger.get_meta("base_model_id")  # recorded per chain
            assert verify_chain(w)["ok"]
            assert verify(w)["ok"], verify(w)
            assert gc(w) == []  # the other chain's files in the shared store are kept
        finally:
            w.ledger.close()
    assert len(list(Path(store).rglob("*.safetensors"))) == 3

    if url.startswith("postgresql"):  # the CLI reads its own chain too
        r = run_cli("log", "--json", cwd=wb.root, cache_dir=wb.cache_dir)
        assert r.returncode == 0, str(r)
        assert [e["id"] for e in r.json()] == ids_b
        assert r.json()[0]["chain"] == "team-b"


_EDITOR_LOOP = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    from mendctl.edit import edit
    from mendctl.editors.data import EditCase
    from mendctl.workspace import Workspace
    root, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    w = Workspace.open(root)
    for i in range(n):
        edit(w, [EditCase(input=f"Fact {i} of writer {tag} is", target=f"{tag}{i}")],
             command=f"edit {tag}-{i}")
    w.ledger.close()
""")


@pytest.mark.subprocess
def test_concurrent_edits_on_one_workspace(url, ws_factory):
    """4 processes x 10 edits on one workspace: 40 entries in one linear chain, none lost, and
    every recorded state rebuilds to its hash."""
    ws = ws_factory("ws", ledger=url, lock_timeout=300)
    writers, n = 4, 10
    env = cli_env(ws.cache_dir)
    procs = [subprocess.Popen([sys.executable, "-c", _EDITOR_LOOP, str(ws.root), f"w{k}", str(n)],
                              cwd=ws.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for k in range(writers)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err

    from mendctl.workspace import Workspace

    w = Workspace.open(str(ws.root))
    try:
        log = w.ledger.entries(reverse=False)
        assert len(log) == writers * n
        assert log[0].parent_id is None
        for prev, e in zip(log, log[1:]):
            assert e.parent_id == prev.id
            assert list(e.active_ids) == list(prev.active_ids) + [e.id]
        assert sorted(e.command for e in log) == \
            sorted(f"edit w{k}-{i}" for k in range(writers) for i in range(n))
        check = verify_chain(w)
        assert check["ok"] and check["checked"] == writers * n, check
        assert verify(w)["ok"]
    finally:
        w.ledger.close()
