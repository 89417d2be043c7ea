"""The workspace lock: one mendctl process at a time changes a workspace.

This module owns the lock file and its side file. The lock itself is an OS file lock (the
`filelock` package: flock on Unix), so it dies with its process and can never go stale. The
side file `<lock>.holder.json` records who holds it (pid, host, command, since) purely so
that a process that cannot get the lock can say who has it; it is advisory text, never
what decides who holds the lock.

The lock is per workspace directory (it lives in .mendctl/), and it covers the whole of a
command: loading the head, computing an edit, recording it. The ledger has a lock of its own
for the recording step (mendctl.ledger: SQLite's write lock, or on PostgreSQL an advisory lock
per chain), which is what keeps a chain linear when writers do not share this file, e.g. two
directories, or two hosts, configured with the same PostgreSQL ledger and chain: there the
second writer's edit is refused ("the ledger moved while editing") instead of forking the chain.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from mendctl.errors import LockError

HOLDER_SUFFIX = ".holder.json"


def _this_command() -> str:
    argv = list(sys.argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return " ".join(shlex.quote(a) for a in argv) or "python"


class WorkspaceLock:
    """An exclusive lock on `path`, held for a `with` block (or acquire/release).

    `timeout` is in seconds: 0 tries once; None (or a negative value) waits as long as the
    holder runs: the OS lock dies with its process, so a crashed holder never blocks anyone.
    On timeout a LockError names the holder and says what to do. `on_wait(holder)` is called
    once, with the holder's side file, when the lock is busy and the caller is going to wait.
    Not re-entrant across instances: a second WorkspaceLock on the same path, even in the same
    process, waits like any other.
    """

    def __init__(self, path: Path | str, timeout: float | None = 10.0, command: str | None = None,
                 on_wait: Callable[[dict | None], None] | None = None):
        self.path = Path(path)
        self.timeout = None if timeout is None or timeout < 0 else float(timeout)
        self.command = command if command is not None else _this_command()
        self.holder_path = self.path.with_name(self.path.name + HOLDER_SUFFIX)
        self.on_wait = on_wait
        self._lock = FileLock(str(self.path), timeout=0)

    @property
    def is_locked(self) -> bool:
        """Whether this object holds the lock."""
        return self._lock.is_locked

    def acquire(self) -> "WorkspaceLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            if self.timeout == 0:
                raise self._busy_error() from None
            if self.on_wait is not None:
                self.on_wait(self.holder())
            try:
                self._lock.acquire(timeout=-1 if self.timeout is None else self.timeout,
                                   poll_interval=0.2)
            except Timeout:
                raise self._busy_error() from None
        try:
            self._write_holder()
        except BaseException:
            self._lock.release()
            raise
        return self

    def release(self) -> None:
        if not self._lock.is_locked:
            return
        try:
            # Removed before the lock goes, so a new holder's file is never deleted by us.
            self.holder_path.unlink(missing_ok=True)
        finally:
            self._lock.release()

    def __enter__(self) -> "WorkspaceLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def holder(self) -> dict | None:
        """What the side file says about the current holder (None if unknown)."""
        try:
            info = json.loads(self.holder_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def _write_holder(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        # Write-then-rename: a waiter reading the side file never sees half of it.
        tmp = self.holder_path.with_name(f"{self.holder_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info), encoding="utf-8")
        os.replace(tmp, self.holder_path)

    def _busy_error(self) -> LockError:
        info = self.holder()
        waited = f"after waiting {self.timeout:g} s" if self.timeout else "right now"
        if info is None:
            who = "another process (it has not said which)"
        else:
            who = (f"process {info.get('pid')} on host {info.get('host')} running "
                   f"`{info.get('command')}` since {info.get('since')}")
        err = LockError(
            f"the workspace is locked ({self.path}) by {who}; could not get the lock "
            f"{waited}. Wait for that command to finish (or stop it) and try again, or set "
            "`lock_timeout: null` in mendctl.yaml to wait as long as the holder runs. The lock "
            "is released automatically when that process exits, so there is no lock file to "
            "delete.")
        err.holder = info
        return err
