"""Alembic migrations: they agree with the ORM models, go down and up, and a ledger from a
newer mendctl is refused."""
from __future__ import annotations

import sqlite3
from importlib.resources import files

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from mendctl.errors import LedgerError
from mendctl.ledger import Base, Ledger, sqlite_url

TABLES = {"entries", "workspace_meta", "audits"}


def tables(path) -> set[str]:
    with sqlite3.connect(path) as con:
        rows = con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    return {r[0] for r in rows} - {"sqlite_sequence"}


def test_migrations_are_found_in_the_package():
    root = files("mendctl.migrations")
    assert root.joinpath("env.py").is_file()
    assert root.joinpath("script.py.mako").is_file()
    script = ScriptDirectory.from_config(Ledger("sqlite://").alembic_config())
    revisions = list(script.walk_revisions())
    assert revisions and revisions[-1].down_revision is None
    assert script.get_current_head() == Ledger("sqlite://").head_revision()


def test_models_match_migrations(tmp_path):
    url = sqlite_url(tmp_path / "l.db")
    Ledger(url).open().close()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True,
                                                         "compare_server_default": True})
            diffs = compare_metadata(ctx, Base.metadata)
        assert diffs == [], diffs
        # the names of indexes and foreign keys match too (batch migrations drop by name)
        insp = inspect(engine)
        for table in Base.metadata.sorted_tables:
            assert {i["name"] for i in insp.get_indexes(table.name)} == \
                {i.name for i in table.indexes}
            assert {fk["name"] for fk in insp.get_foreign_keys(table.name)} == \
                {fk.name for fk in table.foreign_key_constraints}
    finally:
        engine.dispose()


def test_comparison_sees_a_drift(tmp_path):
    # guards the test above against passing vacuously
    from sqlalchemy import Column, Integer, MetaData, String

    url = sqlite_url(tmp_path / "l.db")
    Ledger(url).open().close()
    drifted = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(drifted)
    drifted.tables["entries"].c.kind.type = String(64)
    drifted.tables["entries"].append_column(Column("extra", Integer))
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                     drifted)
    finally:
        engine.dispose()
    flat = [d[0] if isinstance(d, tuple) else d[0][0] for d in diffs]
    assert sorted(flat) == ["add_column", "modify_type"]


def test_upgrade_downgrade_upgrade(tmp_path):
    path = tmp_path / "l.db"
    led = Ledger(sqlite_url(path))
    assert led.current_revision() is None
    led.open()
    head = led.head_revision()
    assert led.current_revision() == head
    assert TABLES <= tables(path)
    led.add_entry(kind="edit", state_hash="a" * 64)

    led.downgrade("base")
    assert led.current_revision() is None
    assert tables(path) & TABLES == set()

    led.upgrade()
    assert led.current_revision() == head
    assert TABLES <= tables(path)
    assert led.head() is None  # a fresh schema
    e = led.add_entry(kind="edit", state_hash="b" * 64)
    assert e.id == 1
    led.open()  # idempotent at head
    assert led.current_revision() == head
    led.close()


def test_unknown_target_revision(tmp_path):
    led = Ledger(sqlite_url(tmp_path / "l.db")).open()
    with pytest.raises(LedgerError, match="cannot downgrade"):
        led.downgrade("nonexistent")
    led.close()


def test_newer_ledger_is_refused(tmp_path):
    path = tmp_path / "l.db"
    Ledger(sqlite_url(path)).open().close()
    with sqlite3.connect(path) as con:  # as if a future mendctl had migrated it
        con.execute("UPDATE alembic_version SET version_num = '9999_future'")
    led = Ledger(sqlite_url(path))
    with pytest.raises(LedgerError, match=r"newer mendctl \(schema 9999_future\); upgrade mendctl"):
        led.open()
    with pytest.raises(LedgerError, match="newer"):
        led.downgrade("base")
    assert led.current_revision() == "9999_future"  # untouched
    led.close()


def test_concurrent_first_open(tmp_path):
    # Two processes opening a fresh ledger at once: the migration runs in one IMMEDIATE
    # transaction, so the second waits and then finds the schema at head.
    import threading

    url = sqlite_url(tmp_path / "l.db")
    errors = []

    def go():
        try:
            Ledger(url, busy_timeout=10).open().close()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert Ledger(url).current_revision() == Ledger(url).head_revision()


def _schema(path) -> dict:
    """What SQLite says about each table: columns, primary key, indexes, foreign keys."""
    engine = create_engine(sqlite_url(path))
    try:
        insp = inspect(engine)
        out = {}
        for t in sorted(set(insp.get_table_names()) - {"sqlite_sequence", "alembic_version"}):
            out[t] = {
                "columns": [(c["name"], str(c["type"]), c["nullable"], c["default"])
                            for c in insp.get_columns(t)],
                "pk": insp.get_pk_constraint(t)["constrained_columns"],
                "indexes": sorted((i["name"], tuple(i["column_names"]))
                                  for i in insp.get_indexes(t)),
                "fks": sorted((f["name"], tuple(f["constrained_columns"]), f["referred_table"])
                              for f in insp.get_foreign_keys(t)),
            }
        with sqlite3.connect(path) as con:
            sql = con.execute("SELECT sql FROM sqlite_master WHERE name='entries'").fetchone()[0]
        out["entries_autoincrement"] = "AUTOINCREMENT" in sql
        return out
    finally:
        engine.dispose()


def test_0002_down_to_0001_gives_back_the_0001_schema(tmp_path):
    # 0002 rebuilds tables on SQLite (batch mode): going down must restore 0001 exactly,
    # AUTOINCREMENT and constraint names included, or a later upgrade would drift.
    fresh, round_trip = tmp_path / "fresh.db", tmp_path / "round.db"
    Ledger(sqlite_url(fresh)).upgrade("0001")
    led = Ledger(sqlite_url(round_trip)).open()
    assert led.current_revision() == led.head_revision()
    led.downgrade("0001")
    led.close()
    assert _schema(round_trip) == _schema(fresh)
    assert _schema(fresh)["entries_autoincrement"]
