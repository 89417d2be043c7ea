"""Recording an operation: its delta files and its ledger rows land together or not at all.

Every operation that writes deltas (edit, revert --replay, replay, squash) records through
`Recorder.recording`: each delta is staged in the store (written and fsynced under a temporary
name), the rows are added in one ledger transaction, the staged files are renamed into place
inside it, and the transaction commits. Any failure on the way discards the staged files and
removes a renamed one that no row refers to, so no half-recorded edit can exist (`verify`
reports and `gc` removes anything a crash between the two commits leaves behind).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from .errors import LedgerError

#: `recording(head=ANY)`: record on whatever the head is (the caller holds no expectation).
ANY = object()


class Recorder:
    def __init__(self, ledger, store):
        self.ledger = ledger
        self.store = store

    @contextmanager
    def recording(self, deltas=(), head=ANY, what: str = "editing") -> Iterator[tuple]:
        """Yields (session, staged files, in the order of `deltas`); the caller adds its rows
        with the session. `head`: the entry id (or None) the caller computed on; if another
        writer moved the ledger since, nothing is recorded."""
        staged = []
        try:
            for d in deltas:
                staged.append(self.store.stage(d))
            with self.ledger.transaction() as s:
                if head is not ANY:
                    now = self.ledger.head(session=s)
                    if (now.id if now else None) != head:
                        raise LedgerError(f"the ledger moved while {what} (another writer "
                                          f"without the lock?); nothing was recorded, try again")
                yield s, staged
                for st in staged:
                    self.store.commit(st)
        except BaseException:
            for st in staged:
                self.store.discard(st)
                self.drop_unrecorded(st.sha256)
            raise

    def drop_unrecorded(self, sha256: str) -> None:
        """After a failed commit: remove the object if the rename happened but no row refers
        to it (objects are content-addressed, so another entry may legitimately share it)."""
        try:
            if self.store.has(sha256) and sha256 not in self.ledger.known_delta_hashes():
                self.store.path_for(sha256).unlink(missing_ok=True)
        except Exception:  # best effort: `verify` reports and `gc` removes what is left
            pass
