"""A throw-away PostgreSQL server for the tests, started by the test session itself.

`pg_server` (session scope) runs Debian's `initdb` into a fresh temporary directory, starts
`postgres` with `pg_ctl` listening on a Unix socket in that directory only (no TCP port: nothing
outside this machine, nor another user on it, can reach it; the port number only names the
socket file), and stops it at the end of the session, also when tests failed or were
interrupted. `pg_url` (function scope) creates a new empty database on it per test and gives
its SQLAlchemy URL, `postgresql+psycopg://postgres@/<db>?host=<socket dir>&port=<port>`.

PostgreSQL refuses to run as root: when the tests run as root (containers, CI), the server
runs as the system user `postgres` (created by the Debian package) via `runuser`, and the
temporary directory is handed to it.

Without the server binaries (`apt-get install postgresql`) or the psycopg driver
(`pip install 'psycopg[binary]'`, in the `test` extra) the PostgreSQL tests are skipped
with a reason saying which to install.
"""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVER_USER = "postgres"  # the system user Debian's package creates; also the DB superuser
INSTALL_HINT = ("PostgreSQL server binaries not found (looked for initdb and pg_ctl in "
                "/usr/lib/postgresql/*/bin and on PATH); install them with "
                "`apt-get install postgresql` to run the PostgreSQL tests")


def find_pg_bin() -> Path | None:
    """The directory holding initdb and pg_ctl: Debian's newest, or the ones on PATH."""
    def version(d: str):
        try:
            return int(Path(d).parent.name)
        except ValueError:
            return -1

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file():
            return Path(d)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    return None


def _free_port() -> int:
    # Only names the socket file (.s.PGSQL.<port>) since TCP is off; a free TCP port keeps
    # the name unlike any other server's all the same.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    bin_dir: Path
    root: Path
    socket_dir: Path
    port: int
    as_user: str | None  # run the server's tools as this user (we are root), or as ourselves
    _names = itertools.count(1)

    def url(self, dbname: str, user: str = SERVER_USER) -> str:
        return (f"postgresql+psycopg://{user}@/{dbname}"
                f"?host={self.socket_dir}&port={self.port}")

    def _connect(self, dbname: str = "postgres"):
        import psycopg

        return psycopg.connect(host=str(self.socket_dir), port=self.port, user=SERVER_USER,
                               dbname=dbname, autocommit=True)

    def create_database(self, prefix: str = "mendctl_test") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        name = f"{prefix}_{next(self._names)}"
        with self._connect() as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def sql(self, statement: str, dbname: str = "postgres") -> list[tuple]:
        with self._connect(dbname) as con:
            cur = con.execute(statement)
            return cur.fetchall() if cur.description else []


def _cmd(server_user: str | None, *args) -> list[str]:
    args = [str(a) for a in args]
    return ["runuser", "-u", server_user, "--", *args] if server_user else args


def start_server(bin_dir: Path) -> PgServer:
    as_user = None
    if os.geteuid() == 0:  # postgres refuses root: run it as the package's system user
        try:
            pw = pwd.getpwnam(SERVER_USER)
        except KeyError:
            pytest.skip(f"running as root and there is no `{SERVER_USER}` system user to run "
                        "PostgreSQL as (`apt-get install postgresql` creates it)")
        if shutil.which("runuser") is None:
            pytest.skip("running as root and `runuser` (util-linux) is missing: cannot start "
                        "PostgreSQL as a non-root user")
        as_user = SERVER_USER
    # Short path: a Unix socket path must stay under ~100 bytes.
    root = Path(tempfile.mkdtemp(prefix="mendctl-pg-"))
    data, socket_dir = root / "data", root / "sock"
    socket_dir.mkdir()
    if as_user:
        for p in (root, socket_dir):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    port = _free_port()
    server = PgServer(bin_dir, root, socket_dir, port, as_user)
    try:
        subprocess.run(_cmd(as_user, bin_dir / "initdb", "-D", data, "-U", SERVER_USER,
                            "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"),
                       check=True, capture_output=True, text=True, timeout=120)
        # Throw-away data: no fsync; small memory; unix socket in our directory only.
        opts = (f"-k {socket_dir} -p {port} -c listen_addresses='' -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c shared_buffers=16MB "
                "-c max_connections=50")
        subprocess.run(_cmd(as_user, bin_dir / "pg_ctl", "-D", data, "-l", root / "server.log",
                            "-o", opts, "-w", "-t", "60", "start"),
                       check=True, capture_output=True, text=True, timeout=90)
    except subprocess.CalledProcessError as e:
        log = (root / "server.log").read_text(errors="replace") if (root / "server.log").exists() else ""
        stop_server(server)
        raise RuntimeError(f"could not start the test PostgreSQL server: {e.cmd}\n"
                           f"{e.stdout}\n{e.stderr}\n{log}") from e
    return server


def stop_server(server: PgServer) -> None:
    data = server.root / "data"
    if (data / "postmaster.pid").exists():
        subprocess.run(_cmd(server.as_user, server.bin_dir / "pg_ctl", "-D", data,
                            "-m", "immediate", "-w", "-t", "60", "stop"),
                       capture_output=True, timeout=90)
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    """A running throw-away PostgreSQL server (skips the test if none can be had)."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: "
                        "pip install 'psycopg[binary]>=3.1' (in mendctl's `test` extra)")
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip(INSTALL_HINT)
    server = start_server(bin_dir)
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def pg_url(pg_server) -> str:
    """The SQLAlchemy URL of a new, empty database on the test server."""
    return pg_server.create_database()
