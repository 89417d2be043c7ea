"""`mendctl verify` and `mendctl gc`: the ledger and the delta store agree.

`verify` checks the chain's links (each entry's parent is the one before it; active ids name
entries with deltas), every delta file's hash and size, and lists files no entry refers to
(orphans: what a crash between a file's rename and its row's commit leaves behind). `gc`
removes those orphans, and refuses when the ledger knows none of the store's files (a wrong
`ledger:` setting, not orphans).
"""
from __future__ import annotations

from .config import CONFIG_FILE
from .errors import WorkspaceError


def verify(ws) -> dict:
    """The ledger's and store's problems, if any (`ok`), and the orphan files."""
    problems = []
    entries = ws.ledger.entries(reverse=False)
    ids = {e.id for e in entries}
    with_delta = {e.id for e in entries if e.delta_sha256}
    prev = None
    for e in entries:
        if prev is not None and e.parent_id != prev.id:
            problems.append(f"entry {e.id}: parent is {e.parent_id}, expected {prev.id}")
        for a in e.active_ids:
            if a not in ids or a not in with_delta:
                problems.append(f"entry {e.id}: active id {a} is not an entry with a delta")
        if e.delta_sha256:
            for p in ws.store.verify(e.delta_sha256):
                problems.append(f"entry {e.id}: {p}")
        prev = e
    orphans = ws.store.orphans(ws.ledger.known_delta_hashes())
    for o in orphans:
        problems.append(f"orphan file (no ledger entry; `mendctl gc` removes it): {o}")
    return {"entries": len(entries), "ok": not problems, "problems": problems,
            "orphans": [str(o) for o in orphans]}


def gc(ws, force: bool = False) -> list[str]:
    """Remove orphan files. Refused (unless `force`) when the ledger knows none of the
    store's deltas: that is a wrong or new ledger (a typo in `ledger:`), not orphans."""
    with ws.lock():
        known = ws.ledger.known_delta_hashes()
        files = ws.store.list_objects()
        if files and not known.intersection(files) and not force:
            size = sum(ws.store.path_for(h).stat().st_size for h in files)
            raise WorkspaceError(
                f"the ledger {ws.ledger.shown_url} records none of the {len(files)} delta "
                f"file(s) in {ws.store.root} ({size / 2**20:.1f} MiB): gc would delete them "
                f"all. If `ledger:` in {ws.root / CONFIG_FILE} points at the wrong database, "
                f"fix it; to delete those files anyway run `mendctl gc --force`")
        return [str(p) for p in ws.store.gc(known)]
