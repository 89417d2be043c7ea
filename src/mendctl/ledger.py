"""The ledger: an SQL database recording every change made to a workspace's model.

This module owns the schema (SQLAlchemy ORM models `Entry`, `WorkspaceMeta`, `Audit`), the
database connection and its transactions, and bringing the schema up to date (Alembic,
in-process, from the migrations shipped inside the package as `mendctl.migrations`).

History is append-only: an edit, a revert, a replay each add an entry; nothing is rewritten.
Every entry records `active_ids`, the ordered ids of the entries whose deltas make up the
state after it, so any state is a pure function of the base checkpoint and that list, and
`state_hash` records what that function must give.

One database can hold several chains (a `chain` column on entries and workspace meta):
workspaces that share a ledger, typically on PostgreSQL, each read and write only their own
chain, so "the head", the history and the workspace facts are per chain. Entry ids stay unique
across the whole database (they are cited in other entries and reports).

Two back ends are supported and run the same Alembic migrations:

* SQLite (the default, a file in the workspace): a write transaction opens with BEGIN
  IMMEDIATE, which takes the database's single write lock up front.
* PostgreSQL (`postgresql+psycopg://...`, for a ledger shared between machines): a write
  transaction first takes `pg_advisory_xact_lock(<64-bit key derived from the chain name>)`.
  Writers of one chain queue there, so the head they read inside the transaction is still the
  head at commit; writers of other chains do not wait for each other. The lock is released
  by COMMIT/ROLLBACK or when the connection dies, so it cannot go stale.

Either way a writer that waits longer than `busy_timeout` gets a LedgerError saying so.

It knows nothing of models, editors or the delta store beyond the hashes and paths it records.
"""
from __future__ import annotations

import hashlib
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import (JSON, DateTime, ForeignKey, Index, Integer, MetaData, String, Text,
                        create_engine, event, or_, select, text)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from mendctl.config import CHAIN_MAX_LEN, DEFAULT_CHAIN, chain_problem
from mendctl.editors.data import EditCase
from mendctl.errors import InputError, LedgerError
from mendctl.record import EntryNotes

DEFAULT_BUSY_TIMEOUT = 30.0

#: Back ends mendctl knows how to lock (see the module docstring); others are refused.
BACKENDS = ("sqlite", "postgresql")

#: Entry kinds mendctl writes. The column is free text so a new kind needs no migration.
KINDS = ("init", "edit", "revert", "replay", "squash", "import")

# Explicit constraint names: SQLite batch migrations (table rebuilds) can only drop or alter
# a constraint that has a name, and autogenerate compares by name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def sqlite_url(path: Path | str) -> str:
    """`sqlite:///<absolute path>` for a database file, escaped: a path holding `?`, `%`, `#`
    or spaces must name that file, not be read as a URL's query string."""
    return URL.create("sqlite", database=Path(path).expanduser().resolve().as_posix()) \
        .render_as_string(hide_password=False)


#: The largest id the `entries.id` column can hold (PostgreSQL's `integer`; SQLite's is wider,
#: but its ids are counted from 1 and never get near it): a larger id names no entry, and
#: passing it to the database would overflow instead of finding nothing.
MAX_ID = 2**31 - 1


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timestamp stored as naive UTC and read back timezone-aware (UTC).

    SQLite has no time zones: without this, a local time and a UTC time look the same.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger; use an aware (UTC) one")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc)


def _json() -> JSON:
    # none_as_null: a Python None is SQL NULL (not the JSON text 'null'), so IS NULL works.
    return JSON(none_as_null=True)


def _columns(row) -> dict[str, Any]:
    """A row's columns, JSON-ready (datetimes as ISO 8601 with their UTC offset)."""
    out = {}
    for col in row.__table__.columns:
        v = getattr(row, col.key)
        out[col.key] = v.isoformat() if isinstance(v, datetime) else v
    return out


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Entry(Base):
    """One recorded change: an edit, a revert, a replay... and the state it leads to."""

    __tablename__ = "entries"
    # AUTOINCREMENT: ids are never reused, even if rows were ever removed (ids are cited in
    # reports, `active_ids` lists and other entries' reverts_id/replay_of_id).
    # ix_entries_chain is on (chain, id): it serves "this chain's entries in id order" and
    # "this chain's head" (the highest id) directly, on SQLite and PostgreSQL alike.
    __table_args__ = (Index("ix_entries_chain", "chain", "id"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Which workspace's history the entry belongs to (migration 0002; older rows got 'main').
    # Set by the Ledger from its own chain, never by callers.
    chain: Mapped[str] = mapped_column(String(CHAIN_MAX_LEN), server_default=DEFAULT_CHAIN)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("entries.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=_utcnow, index=True)
    user: Mapped[str | None] = mapped_column(String(255))
    host: Mapped[str | None] = mapped_column(String(255))
    command: Mapped[str | None] = mapped_column(Text)
    inputs: Mapped[list] = mapped_column(_json(), default=list)
    targets: Mapped[list] = mapped_column(_json(), default=list)
    request: Mapped[Any | None] = mapped_column(_json())
    editor_name: Mapped[str | None] = mapped_column(String(255))
    editor_sha256: Mapped[str | None] = mapped_column(String(64))
    base_model_id: Mapped[str | None] = mapped_column(Text)
    base_model_hash: Mapped[str | None] = mapped_column(String(64))
    weight_names: Mapped[list] = mapped_column(_json(), default=list)
    delta_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    delta_path: Mapped[str | None] = mapped_column(Text)
    delta_size: Mapped[int | None] = mapped_column(Integer)
    delta_norms: Mapped[dict | None] = mapped_column(_json())
    metrics_before: Mapped[dict | None] = mapped_column(_json())
    metrics_after: Mapped[dict | None] = mapped_column(_json())
    state_hash: Mapped[str] = mapped_column(String(64), index=True)
    active_ids: Mapped[list] = mapped_column(_json(), default=list)
    reverts_id: Mapped[int | None] = mapped_column(ForeignKey("entries.id"), index=True)
    replay_of_id: Mapped[int | None] = mapped_column(ForeignKey("entries.id"), index=True)
    status: Mapped[str] = mapped_column(String(32), default="ok")
    notes: Mapped[Any | None] = mapped_column(_json())

    @property
    def record(self) -> EntryNotes:
        """How the entry was made, typed (`notes`; record.py)."""
        return EntryNotes.from_json(self.notes)

    def cases(self) -> list[EditCase]:
        """The edit request this entry recorded (with paraphrases and locality prompts) or,
        for an entry recorded without one, one bare case per (input, target)."""
        return [EditCase.from_dict(c) for c in (self.request or [])] or \
            [EditCase(input=a, target=b) for a, b in zip(self.inputs or [], self.targets or [])]

    def to_dict(self) -> dict[str, Any]:
        """All columns, JSON-ready (created_at as ISO 8601 with its UTC offset)."""
        return _columns(self)

    def __repr__(self) -> str:
        return f"<Entry {self.id} {self.kind} state={str(self.state_hash)[:12]}>"


class WorkspaceMeta(Base):
    """Workspace-wide facts as text (base_model_hash, ...): JSON-encode structured values.

    Keyed by (chain, key): each chain, i.e. each workspace sharing the database, has its own
    facts (two workspaces on one PostgreSQL ledger may use different base models)."""

    __tablename__ = "workspace_meta"

    chain: Mapped[str] = mapped_column(String(CHAIN_MAX_LEN), primary_key=True,
                                       server_default=DEFAULT_CHAIN)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Audit(Base):
    """An audit run on the state after `entry_id` (None: the base model)."""

    __tablename__ = "audits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=_utcnow, index=True)
    entry_id: Mapped[int | None] = mapped_column(ForeignKey("entries.id"), index=True)
    summary: Mapped[Any | None] = mapped_column(_json())
    report_path: Mapped[str | None] = mapped_column(Text)

    def to_dict(self) -> dict[str, Any]:
        return _columns(self)


_ENTRY_FIELDS = frozenset(c.key for c in Entry.__table__.columns) - {"id", "chain"}
_KIND_RE = re.compile(r"^[a-z][a-z0-9_-]*$")


def _locked(e: BaseException) -> bool:
    msg = str(e).lower()
    # SQLite's busy timeout; PostgreSQL's lock_timeout (set from busy_timeout, see _pg_lock).
    return ("database is locked" in msg or "database is busy" in msg
            or "lock timeout" in msg or "lock_not_available" in msg)


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for `pg_advisory_xact_lock`, derived from `name`.

    sha256 rather than Python's hash(): every process, on every machine, must derive the same
    key. A collision between two names would only make their writers queue behind each other.
    """
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big", signed=True)


def chain_lock_key(chain: str) -> int:
    """The advisory-lock key of a chain's write transactions (PostgreSQL)."""
    return advisory_key(f"mendctl.ledger.chain:{chain}")


#: The advisory-lock key of schema migrations (PostgreSQL): two processes opening a fresh
#: database at once must not both create the tables.
MIGRATION_LOCK_KEY = advisory_key("mendctl.ledger.migrate")


def _read_only_connection(path: Path, timeout: float) -> sqlite3.Connection:
    """A read-only connection to the SQLite file `path` (a ledger on a read-only mount, or
    one this user may not write). SQLite's `mode=ro` still needs the WAL side files of a
    WAL database, which a read-only directory cannot have created: then the file is opened
    as `immutable`, which reads it without any locking (nobody can be writing it there)."""
    uri = "file:" + quote(path.resolve().as_posix())
    try:
        con = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=timeout, check_same_thread=False)
        con.execute("PRAGMA schema_version").fetchone()  # opens the file (and its WAL) now
        return con
    except sqlite3.OperationalError:
        return sqlite3.connect(uri + "?immutable=1", uri=True, check_same_thread=False)


class Ledger:
    """The ledger database at `url` (`sqlite:///path`, a plain file path, or
    `postgresql+psycopg://...`), read and written as the chain `chain`.

    `open()` brings the schema to head (or refuses a ledger from a newer mendctl); use
    `transaction()` for work that must land together. Query helpers take an optional
    `session` to join a transaction the caller holds; without one they use their own.
    """

    def __init__(self, url: str | Path, busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
                 chain: str = DEFAULT_CHAIN) -> None:
        if isinstance(url, Path) or "://" not in str(url):
            url = sqlite_url(url)
        try:
            parsed = make_url(str(url))
        except Exception as e:  # sqlalchemy's ArgumentError
            raise LedgerError(f"`ledger: {url}` is not a database URL ({e}); use e.g. "
                              "sqlite:////abs/path/ledger.db or "
                              "postgresql+psycopg://user@host/dbname") from e
        backend = parsed.get_backend_name()
        if backend not in BACKENDS:
            raise LedgerError(f"ledger {parsed.render_as_string(hide_password=True)}: mendctl "
                              f"keeps its ledger in SQLite or PostgreSQL, not {backend}")
        if backend == "postgresql" and parsed.drivername == "postgresql":
            # A bare postgresql:// means psycopg2 to SQLAlchemy; mendctl depends on psycopg 3.
            parsed = parsed.set(drivername="postgresql+psycopg")
            url = parsed.render_as_string(hide_password=False)
        problem = chain_problem(chain)
        if problem:
            raise LedgerError(f"the ledger chain {problem}")
        self.url = str(url)
        self.chain = chain
        self.busy_timeout = float(busy_timeout)
        self._engine: Engine | None = None
        self._write_engine: Engine | None = None
        self._sessions: sessionmaker | None = None
        #: True when the SQLite file cannot be written here (set when the engine is made):
        #: reads work, every write is refused with a message saying so.
        self.read_only = False
        self._is_sqlite = backend == "sqlite"
        self._is_postgresql = backend == "postgresql"
        #: The URL as messages show it: never with its password.
        self.shown_url = parsed.render_as_string(hide_password=True)

    # -- connection -----------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"Ledger({self.shown_url!r}, chain={self.chain!r})"

    def __enter__(self) -> "Ledger":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def db_path(self) -> Path | None:
        """The SQLite database file (None: PostgreSQL, or an in-memory database)."""
        db = make_url(self.url).database
        if not self._is_sqlite or not db or db == ":memory:" or db.startswith("file:"):
            return None
        return Path(db)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = self._create_engine()
            # Writers open with BEGIN IMMEDIATE (see _create_engine): they take SQLite's write
            # lock up front, so two writers queue instead of both reading the same head and
            # failing at commit. Readers keep a plain (deferred) BEGIN and never block a writer.
            self._write_engine = self._engine.execution_options(mendctl_begin="IMMEDIATE")
            self._sessions = sessionmaker(expire_on_commit=False)
        return self._engine

    def _create_engine(self) -> Engine:
        if not self._is_sqlite:
            try:
                # pre_ping: a pooled connection the server dropped is replaced, not an error.
                return create_engine(self.url, pool_pre_ping=True)
            except ImportError as e:  # the driver is an optional extra
                raise LedgerError(f"ledger {self.shown_url} needs the PostgreSQL driver "
                                  f"psycopg ({e}); install it with "
                                  "`pip install 'mendctl[postgres]'`") from e
        path = self.db_path()
        if path is not None and not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
        self.read_only = path is not None and path.is_file() and not (
            os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))
        if self.read_only:
            engine = create_engine("sqlite://", creator=lambda: _read_only_connection(
                path, self.busy_timeout))
        else:
            engine = create_engine(self.url, connect_args={"timeout": self.busy_timeout})
        wal = path is not None and not self.read_only
        busy_ms = int(self.busy_timeout * 1000)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):
            # Take BEGIN away from the sqlite3 module (it emits a deferred BEGIN only before
            # DML, never before DDL or SELECT) and emit it ourselves in _on_begin, so every
            # transaction, migrations included, really is one and may be IMMEDIATE.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            try:
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute(f"PRAGMA busy_timeout={busy_ms}")
                if wal:  # readers do not block the writer, and vice versa
                    cur.execute("PRAGMA journal_mode=WAL")
            finally:
                cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            mode = conn.get_execution_options().get("mendctl_begin", "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
        self._engine = self._write_engine = self._sessions = None

    def read_only_error(self) -> LedgerError:
        return LedgerError(f"the ledger {self.shown_url} is read-only (a read-only mount, or a "
                           f"file this user may not write): reading commands work (log, show, "
                           f"ask, verify), this one writes; run it where the workspace is "
                           f"writable")

    def _busy_error(self, doing: str) -> LedgerError:
        chain = "" if self._is_sqlite else f" (chain {self.chain!r})"
        return LedgerError(f"the ledger {self.shown_url}{chain} stayed locked by another "
                           f"mendctl process for more than {self.busy_timeout:g} s while "
                           f"{doing}; wait for it to finish and run the command again")

    def _translate(self, e: SQLAlchemyError, doing: str) -> LedgerError:
        if isinstance(e, OperationalError) and _locked(e):
            return self._busy_error(doing)
        detail = str(getattr(e, "orig", None) or e)
        hint = ""
        if "no such table" in detail or ("relation" in detail and "does not exist" in detail):
            hint = " (the ledger has no schema: call Ledger.open(), which migrates it, first)"
        elif "already exists" in detail:
            hint = (" (the database has tables but no mendctl schema revision: it is not a "
                    "mendctl ledger; point mendctl at another file)")
        elif "readonly database" in detail:
            hint = (" (the ledger file cannot be written here: run the command where the "
                    "workspace is writable)")
        elif "not a database" in detail:
            hint = " (the file is not an SQLite database: restore the ledger from a backup)"
        elif self._is_postgresql and isinstance(e, OperationalError) and (
                "connect" in detail or ("database" in detail and "does not exist" in detail)):
            hint = (" (is the PostgreSQL server running, does the database exist, and are "
                    "the user and password in `ledger:` of mendctl.yaml right?)")
        return LedgerError(f"ledger {self.shown_url}: error while {doing}: "
                           f"{e.__class__.__name__}: {detail}{hint}")

    def _pg_lock(self, conn: Connection, key: int, doing: str) -> None:
        """Take the transaction-level advisory lock `key` (PostgreSQL), waiting at most
        `busy_timeout` seconds; held until COMMIT or ROLLBACK.

        The wait is bounded with a transaction-local lock_timeout (0 would mean "forever"
        there, so a zero timeout tries once instead).
        """
        if self.busy_timeout <= 0:
            got = conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}).scalar()
            if not got:
                raise self._busy_error(doing)
            return
        ms = max(1, int(self.busy_timeout * 1000))
        conn.execute(text("SELECT set_config('lock_timeout', :ms, true)"), {"ms": f"{ms}ms"})
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
        # lock_timeout stays set for the rest of the transaction (SET LOCAL): like SQLite's
        # busy timeout, it bounds every lock wait of the transaction, not only this one.

    # -- schema ---------------------------------------------------------------------------

    def alembic_config(self, connection: Connection | None = None):
        """An Alembic Config built in code: migrations come from the installed package."""
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(files("mendctl.migrations")))
        cfg.set_main_option("path_separator", "os")
        # ConfigParser interpolates '%': escape it (URL-encoded passwords contain it).
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        if connection is not None:
            cfg.attributes["connection"] = connection
        return cfg

    def _script(self):
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(self.alembic_config())

    def head_revision(self) -> str:
        """The newest schema revision this mendctl knows."""
        return self._script().get_current_head()

    def _current_heads(self, conn: Connection) -> tuple[str, ...]:
        from alembic.runtime.migration import MigrationContext

        return tuple(MigrationContext.configure(conn).get_current_heads())

    def current_revision(self) -> str | None:
        """The schema revision the database is at (None: empty, never migrated)."""
        try:
            with self.engine.connect() as conn:
                heads = self._current_heads(conn)
        except SQLAlchemyError as e:
            raise self._translate(e, "reading the schema revision") from e
        return heads[0] if heads else None

    def _check_known(self, heads: tuple[str, ...], script) -> None:
        known = {s.revision for s in script.walk_revisions()}
        unknown = [h for h in heads if h not in known]
        if unknown:
            raise LedgerError(f"this ledger was written by a newer mendctl (schema "
                              f"{', '.join(unknown)}); upgrade mendctl (this one knows schemas "
                              f"up to {script.get_current_head()})")

    def _migrate(self, action: str, revision: str) -> None:
        """Run `alembic <action> <revision>` in-process, in one IMMEDIATE transaction, so
        two processes opening a fresh ledger at once do not both create the tables."""
        from alembic import command

        script = self._script()
        self.engine  # noqa: B018 (sets read_only)
        if self.read_only:
            raise self.read_only_error()
        try:
            with self._write_conn_nofk() as conn:
                with conn.begin():
                    if self._is_postgresql:  # what BEGIN IMMEDIATE does for SQLite
                        self._pg_lock(conn, MIGRATION_LOCK_KEY, "migrating the schema")
                    heads = self._current_heads(conn)
                    self._check_known(heads, script)
                    if action == "upgrade":
                        target = set(script.get_heads()) if revision == "head" else {revision}
                        if set(heads) == target:
                            return
                        command.upgrade(self.alembic_config(conn), revision)
                    else:
                        command.downgrade(self.alembic_config(conn), revision)
                    if self._is_sqlite:
                        bad = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                        if bad:
                            raise LedgerError(f"migration to {revision} would break foreign "
                                              f"keys ({bad[:3]}...); nothing was changed")
        except SQLAlchemyError as e:
            raise self._translate(e, f"migrating the schema ({action} {revision})") from e
        except LedgerError:
            raise
        except Exception as e:  # alembic's CommandError for an unknown target revision...
            if e.__class__.__module__.startswith("alembic"):
                raise LedgerError(f"cannot {action} the ledger to {revision!r}: {e}") from e
            raise

    @contextmanager
    def _write_conn_nofk(self) -> Iterator[Connection]:
        """A write connection with foreign-key enforcement off, restored afterwards.

        SQLite's own recipe for table rebuilds (what batch migrations do) needs foreign keys
        off while the old table is dropped; the pragma is a no-op inside a transaction, so it
        is set on the raw connection before BEGIN. `_migrate` runs foreign_key_check instead.
        """
        self.engine  # noqa: B018 (creates the engines)
        with self._write_engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            if self._is_sqlite:
                raw.execute("PRAGMA foreign_keys=OFF")
            try:
                yield conn
            finally:
                if self._is_sqlite:
                    raw.execute("PRAGMA foreign_keys=ON")

    def upgrade(self, revision: str = "head") -> None:
        self._migrate("upgrade", revision)

    def downgrade(self, revision: str) -> None:
        self._migrate("downgrade", revision)

    def open(self) -> "Ledger":
        """Connect and migrate the schema to head; LedgerError if the ledger is from a newer
        mendctl or cannot be read. A ledger already at head is only read (so a read-only
        ledger at the current schema opens); a read-only one at an older schema is refused."""
        script = self._script()
        try:
            with self.engine.connect() as conn:
                heads = self._current_heads(conn)
        except SQLAlchemyError as e:
            raise self._translate(e, "reading the schema revision") from e
        self._check_known(heads, script)
        if set(heads) == set(script.get_heads()):
            return self
        if self.read_only:
            raise LedgerError(f"the ledger {self.shown_url} is read-only and at schema "
                              f"{', '.join(heads) or '(none)'}, older than this mendctl's "
                              f"{script.get_current_head()}; run `mendctl db upgrade` once where "
                              f"it is writable, or use the mendctl version that wrote it")
        self.upgrade("head")
        return self

    # -- transactions ---------------------------------------------------------------------

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on an exception.

        `write=True` takes the chain's write lock first (SQLite: the database's write lock, at
        BEGIN IMMEDIATE; PostgreSQL: the chain's advisory lock), waiting up to `busy_timeout`,
        so the head read inside is still the head at commit. Objects stay usable afterwards.
        """
        self.engine  # noqa: B018
        if write and self.read_only:
            raise self.read_only_error()
        bind = self._write_engine if write else self._engine
        try:
            with self._sessions(bind=bind) as session:
                with session.begin():
                    if write:  # sessions connect lazily: take the write lock now, at BEGIN
                        conn = session.connection()
                        if self._is_postgresql:
                            self._pg_lock(conn, chain_lock_key(self.chain), "writing")
                    yield session
        except DBAPIError as e:  # PostgreSQL reports a missing table as a ProgrammingError
            raise self._translate(e, "writing" if write else "reading") from e

    @contextmanager
    def _session(self, session: Session | None, write: bool) -> Iterator[Session]:
        if session is not None:
            yield session
        else:
            with self.transaction(write=write) as s:
                yield s

    # -- entries --------------------------------------------------------------------------

    def head(self, session: Session | None = None) -> Entry | None:
        """The latest entry of this chain (highest id), or None for an empty chain."""
        q = select(Entry).where(Entry.chain == self.chain).order_by(Entry.id.desc()).limit(1)
        with self._session(session, write=False) as s:
            return s.scalars(q).first()

    def get(self, entry_id: int, session: Session | None = None) -> Entry:
        """Entry `entry_id`, which must belong to this chain (InputError otherwise)."""
        entry = None
        if 0 < int(entry_id) <= MAX_ID:
            with self._session(session, write=False) as s:
                entry = s.get(Entry, int(entry_id))
        if entry is None:
            raise InputError(f"no entry {entry_id}; see `mendctl log`")
        if entry.chain != self.chain:
            raise InputError(f"entry {entry_id} belongs to chain {entry.chain!r} of the shared "
                             f"ledger, not to this workspace's chain {self.chain!r}; see "
                             "`mendctl log`")
        return entry

    def entries(self, limit: int | None = None, reverse: bool = True,
                session: Session | None = None) -> list[Entry]:
        """This chain's entries newest first (`reverse=True`) or oldest first, at most
        `limit`."""
        q = (select(Entry).where(Entry.chain == self.chain)
             .order_by(Entry.id.desc() if reverse else Entry.id.asc()))
        if limit is not None:
            q = q.limit(int(limit))
        with self._session(session, write=False) as s:
            return list(s.scalars(q))

    def add_entry(self, session: Session | None = None, **fields: Any) -> Entry:
        """Insert one entry and return it with its id assigned.

        Required: `kind` and `state_hash`. Unknown field names raise TypeError. Pass the
        `session` of a `transaction()` to land the row together with other work.
        """
        if "chain" in fields:
            raise TypeError(f"an entry's chain is its ledger's (Ledger(chain=...), here "
                            f"{self.chain!r}), not a field")
        unknown = set(fields) - _ENTRY_FIELDS
        if unknown:
            raise TypeError(f"unknown entry field(s) {sorted(unknown)}; "
                            f"known: {sorted(_ENTRY_FIELDS)}")
        kind = fields.get("kind")
        if not isinstance(kind, str) or not _KIND_RE.match(kind):
            raise TypeError(f"entry kind must be a lower-case word, got {kind!r}")
        if not fields.get("state_hash"):
            raise TypeError("an entry needs the state_hash of the state after it")
        active = fields.get("active_ids", [])
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in active):
            raise TypeError(f"active_ids must be entry ids (ints), got {active!r}")
        entry = Entry(**fields, chain=self.chain)
        with self._session(session, write=True) as s:
            self._check_same_chain(s, fields)
            s.add(entry)
            try:
                s.flush()
            except IntegrityError as e:
                raise LedgerError(f"cannot record the entry: {e.orig} (does parent_id, "
                                  "reverts_id or replay_of_id name an existing entry?)") from e
        return entry

    def _check_same_chain(self, s: Session, fields: dict[str, Any]) -> None:
        """An entry may only point at entries of its own chain (ids that do not exist are
        left to the foreign keys, which say so)."""
        refs = {fields.get(k) for k in ("parent_id", "reverts_id", "replay_of_id")} - {None}
        if not refs:
            return
        rows = s.execute(select(Entry.id, Entry.chain).where(Entry.id.in_(refs))).all()
        other = sorted((i, c) for i, c in rows if c != self.chain)
        if other:
            raise LedgerError(f"cannot record the entry: it refers to entry {other[0][0]} of "
                              f"chain {other[0][1]!r}, not of this ledger's chain {self.chain!r}")

    def known_delta_hashes(self, session: Session | None = None) -> set[str]:
        """Every delta hash any entry references (what the store must keep).

        Deliberately over ALL chains, not just this one: workspaces sharing a ledger may also
        share a delta store (`store:` pointing at one directory), and `gc` must never delete a
        file another chain still references. The cost is that a file only another chain
        references is never reported as an orphan of this workspace's store.
        """
        q = select(Entry.delta_sha256).where(Entry.delta_sha256.is_not(None)).distinct()
        with self._session(session, write=False) as s:
            return set(s.scalars(q))

    # -- workspace meta -------------------------------------------------------------------

    # Per chain: each workspace sharing the database keeps its own facts.

    def get_meta(self, key: str, default: str | None = None,
                 session: Session | None = None) -> str | None:
        with self._session(session, write=False) as s:
            row = s.get(WorkspaceMeta, {"chain": self.chain, "key": key})
            return default if row is None else row.value

    def set_meta(self, key: str, value: str, session: Session | None = None) -> None:
        if not isinstance(value, str):
            raise TypeError(f"workspace meta values are text; json.dumps {key!r} first")
        with self._session(session, write=True) as s:
            s.merge(WorkspaceMeta(chain=self.chain, key=key, value=value))

    def all_meta(self, session: Session | None = None) -> dict[str, str]:
        q = select(WorkspaceMeta).where(WorkspaceMeta.chain == self.chain)
        with self._session(session, write=False) as s:
            return {m.key: m.value for m in s.scalars(q)}

    # -- audits ---------------------------------------------------------------------------

    def add_audit(self, entry_id: int | None, summary: Any, report_path: str | None = None,
                  session: Session | None = None) -> Audit:
        audit = Audit(entry_id=entry_id, summary=summary, report_path=report_path)
        with self._session(session, write=True) as s:
            s.add(audit)
            try:
                s.flush()
            except IntegrityError as e:
                raise LedgerError(f"cannot record the audit: no entry {entry_id}") from e
        return audit

    def audits(self, entry_id: int | None = None, session: Session | None = None) -> list[Audit]:
        """Audits newest first, optionally only those of one entry's state.

        Those of this chain's entries, and those of the base model (entry_id NULL), which
        belong to no chain: the audits table has no chain column of its own, an audit's chain
        is its entry's."""
        q = (select(Audit).outerjoin(Entry, Audit.entry_id == Entry.id)
             .where(or_(Audit.entry_id.is_(None), Entry.chain == self.chain))
             .order_by(Audit.id.desc()))
        if entry_id is not None:
            q = q.where(Audit.entry_id == entry_id)
        with self._session(session, write=False) as s:
            return list(s.scalars(q))
