"""The delta store: one safetensors file per edit delta, named by the sha256 of its bytes.

This module owns the files under a workspace's store root and nothing else:

    <root>/objects/ab/abcdef....safetensors   committed deltas (content-addressed, immutable)
    <root>/tmp/                                staged files not yet committed

Writing a delta is two steps so that the ledger row and the file land together: `stage`
writes the file into tmp/ (fsynced, hashed) and `commit` renames it into objects/ atomically;
the caller commits the ledger row in between, so a crash leaves at worst an unreferenced file
(an orphan, removed by `gc`), never a row pointing at a missing or half-written file.

The store does not know the ledger: `orphans` and `gc` are told which hashes are referenced.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from mendctl.editors.delta import Delta
from mendctl.errors import StoreError

OBJECTS_DIR = "objects"
TMP_DIR = "tmp"
SUFFIX = ".safetensors"
TMP_SUFFIX = ".safetensors.tmp"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class StagedDelta:
    """A delta written to the store's tmp/ but not yet committed.

    `rel_path` is where `commit` will put it, relative to the store root (POSIX separators,
    the form the ledger records); `tmp_path` is the absolute temp file.
    """

    sha256: str
    tmp_path: Path
    rel_path: str
    size: int


def _canonical_bytes(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """safetensors bytes for (tensors, meta) that depend only on their content.

    safetensors keeps `__metadata__` in a Rust HashMap, so the same metadata is written in a
    different key order by every process, and content addressing would give the same delta a
    different hash each run. We let safetensors serialise the tensors (dtype names, order,
    offsets) and rewrite only the JSON header with the metadata keys sorted; the data section
    is kept byte for byte, and its offsets are relative to the end of the header, so they stay
    valid whatever the header's new length.
    """
    raw = _st_save(tensors, meta)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    canon = {"__metadata__": dict(sorted(header.pop("__metadata__", {}).items()))}
    canon.update(header)  # tensor entries keep safetensors' own (deterministic) order
    text = json.dumps(canon, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone tensors that share storage: safetensors refuses to save aliases (an editor may
    hand back u and d as views of one output tensor)."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[name] = t
    return out


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or a new entry in it survives a crash."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms (Windows) cannot open directories; nothing to do there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


class DeltaStore:
    """Content-addressed safetensors files of `Delta` objects under `root`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # -- paths ----------------------------------------------------------------------------

    @property
    def objects_dir(self) -> Path:
        return self.root / OBJECTS_DIR

    @property
    def tmp_dir(self) -> Path:
        return self.root / TMP_DIR

    @staticmethod
    def rel_path_for(sha256: str) -> str:
        """`objects/ab/abcdef....safetensors`, relative to the store root."""
        sha256 = DeltaStore._check_hash(sha256)
        return f"{OBJECTS_DIR}/{sha256[:2]}/{sha256}{SUFFIX}"

    def path_for(self, sha256: str) -> Path:
        return self.root / self.rel_path_for(sha256)

    def has(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    @staticmethod
    def _check_hash(sha256: str) -> str:
        if not isinstance(sha256, str) or not _HEX64.match(sha256.lower()):
            raise StoreError(f"{sha256!r} is not a sha256 (64 hex digits); "
                             "take delta hashes from `mendctl log`")
        return sha256.lower()

    # -- writing --------------------------------------------------------------------------

    def stage(self, delta: Delta) -> StagedDelta:
        """Write `delta` to a temp file in tmp/, fsync it and hash it. Nothing is visible in
        objects/ until `commit`. A delta with NaN or inf is refused and nothing is written."""
        if not delta.layers:
            raise StoreError("refusing to store an empty delta (it changes no weight)")
        if not delta.is_finite():
            bad = sorted(n for n, l in delta.layers.items() if not l.is_finite())
            raise StoreError(f"refusing to store a delta with NaN or inf values (in "
                             f"{', '.join(bad)}); the edit diverged: try a smaller step or "
                             "another editor checkpoint")
        tensors, meta = delta.to_tensors()
        try:
            data = _canonical_bytes(_unshare(tensors), meta)
        except Exception as e:  # safetensors rejects e.g. unsupported dtypes
            raise StoreError(f"cannot serialise the delta: {e}") from e
        sha = hashlib.sha256(data).hexdigest()

        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=sha[:12] + ".", suffix=TMP_SUFFIX, dir=self.tmp_dir)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StagedDelta(sha256=sha, tmp_path=tmp, rel_path=self.rel_path_for(sha),
                           size=len(data))

    def commit(self, staged: StagedDelta) -> Path:
        """Move a staged file into objects/ (atomic rename, then fsync of the directory).

        Idempotent: if the object already exists with the right hash the temp file is dropped;
        if it exists but is damaged, the fresh copy replaces it.
        """
        final = self.root / staged.rel_path
        if not staged.tmp_path.is_file():
            if final.is_file() and _sha256_file(final) == staged.sha256:
                return final  # committed already
            raise StoreError(f"staged delta {staged.tmp_path} is gone (discarded or removed "
                             "by `gc`?); run the edit again")
        if final.is_file() and _sha256_file(final) == staged.sha256:
            staged.tmp_path.unlink(missing_ok=True)
            return final
        new_dir = not final.parent.exists()
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged.tmp_path, final)
        _fsync_dir(final.parent)
        if new_dir:  # the new objects/ab/ entry itself must also reach the disk
            _fsync_dir(final.parent.parent)
        return final

    def discard(self, staged: StagedDelta) -> None:
        """Remove a staged file that will not be committed (no error if already gone)."""
        staged.tmp_path.unlink(missing_ok=True)

    # -- reading --------------------------------------------------------------------------

    def _read(self, sha256: str, verify: bool) -> tuple[Delta | None, list[str]]:
        """Load and check one object; returns the delta (None if unusable) and the problems."""
        sha256 = self._check_hash(sha256)
        path = self.path_for(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None, [f"delta {sha256[:12]} is missing: {path} does not exist; restore the "
                          "store from a backup, or replay the ledger to recompute it"]
        except OSError as e:
            return None, [f"delta {sha256[:12]}: cannot read {path}: {e}"]

        problems = []
        if verify:
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha256:
                problems.append(f"delta {sha256[:12]} is corrupted: {path} hashes to "
                                f"{actual[:12]}; restore it from a backup, or replay the ledger")
        meta, why = self._parse_header(data)
        if meta is None:
            problems.append(f"delta {sha256[:12]}: {path} is not a valid safetensors file "
                            f"({why}); it may be truncated")
            return None, problems
        try:
            tensors = _st_load(data)
            delta = Delta.from_tensors(tensors, meta)
        except Exception as e:
            problems.append(f"delta {sha256[:12]}: {path} cannot be read as a delta ({e})")
            return None, problems
        if not delta.is_finite():
            problems.append(f"delta {sha256[:12]}: {path} holds NaN or inf values")
        return delta, problems

    @staticmethod
    def _parse_header(data: bytes) -> tuple[dict[str, str] | None, str]:
        """The `__metadata__` of a safetensors file (safetensors.torch.load drops it)."""
        if len(data) < 8:
            return None, f"{len(data)} bytes, shorter than the 8-byte header length"
        (n,) = struct.unpack("<Q", data[:8])
        if n > len(data) - 8:
            return None, f"header claims {n} bytes, file has {len(data) - 8} after the length"
        try:
            header = json.loads(data[8:8 + n])
        except ValueError as e:
            return None, f"header is not JSON: {e}"
        if not isinstance(header, dict):
            return None, "header is not a JSON object"
        meta = header.get("__metadata__") or {}
        return {str(k): str(v) for k, v in meta.items()}, ""

    def load(self, sha256: str, verify: bool = True) -> Delta:
        """The delta stored under `sha256`. With `verify` the file is re-hashed first.
        Raises StoreError if it is missing, corrupted, truncated or holds NaN/inf."""
        delta, problems = self._read(sha256, verify)
        if problems or delta is None:
            raise StoreError("; ".join(problems))
        return delta

    def verify(self, sha256: str) -> list[str]:
        """Problems with one stored delta (empty list: it is intact and loadable)."""
        try:
            return self._read(sha256, verify=True)[1]
        except StoreError as e:  # a malformed hash
            return [str(e)]

    # -- housekeeping ---------------------------------------------------------------------

    def list_objects(self) -> list[str]:
        """Hashes of all committed objects, sorted."""
        return sorted(sha for sha, _ in self._scan_objects()[0])

    def _scan_objects(self) -> tuple[list[tuple[str, Path]], list[Path]]:
        """(well-named objects, stray files) under objects/."""
        good, stray = [], []
        if not self.objects_dir.is_dir():
            return good, stray
        for p in sorted(self.objects_dir.rglob("*")):
            if not p.is_file() and not p.is_symlink():
                continue
            rel = p.relative_to(self.root).as_posix()
            sha = p.name[:-len(SUFFIX)] if p.name.endswith(SUFFIX) else ""
            if _HEX64.match(sha) and rel == self.rel_path_for(sha):
                good.append((sha, p))
            else:
                stray.append(p)
        return good, stray

    def orphans(self, known_hashes) -> list[Path]:
        """Files the ledger does not need: objects whose hash is not in `known_hashes`,
        stray files under objects/, and everything in tmp/ (staged, never committed)."""
        known = {h.lower() for h in known_hashes if h}
        good, stray = self._scan_objects()
        out = [p for sha, p in good if sha not in known] + stray
        if self.tmp_dir.is_dir():
            out += sorted(p for p in self.tmp_dir.iterdir() if p.is_file() or p.is_symlink())
        return out

    def gc(self, known_hashes) -> list[Path]:
        """Delete `orphans(known_hashes)` and return what was removed.

        Call it under the workspace lock: a file in tmp/ may be an edit being staged right
        now by another process, and `gc` cannot tell it from a leftover of a crash.
        """
        removed = []
        for p in self.orphans(known_hashes):
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            removed.append(p)
        if self.objects_dir.is_dir():
            for d in self.objects_dir.iterdir():
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()  # empty fan-out directories are noise in listings
        return removed
