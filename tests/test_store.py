"""DeltaStore: real safetensors files in tmp_path, tiny tensors."""
from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch

from mendctl.editors.delta import Delta, LayerDelta
from mendctl.errors import StoreError
from mendctl.store import DeltaStore


def lowrank_delta(seed: int = 0, meta: dict | None = None) -> Delta:
    g = torch.Generator().manual_seed(seed)
    layers = {
        # nn.Linear orientation: weight (out=5, in=3); factors u (n, in), d (n, out)
        "model.layers.0.mlp.up_proj.weight": LayerDelta(
            "model.layers.0.mlp.up_proj.weight", (5, 3),
            u=torch.randn(4, 3, generator=g), d=torch.randn(4, 5, generator=g),
            alpha=torch.tensor(0.125)),
        # GPT-2 Conv1D orientation: weight stored (in=3, out=6)
        "h.0.mlp.c_fc.weight": LayerDelta(
            "h.0.mlp.c_fc.weight", (3, 6), u=torch.randn(2, 3, generator=g),
            d=torch.randn(2, 6, generator=g), alpha=torch.tensor(-0.5), transposed=True),
    }
    return Delta(layers, meta if meta is not None else
                 {"editor": "mend", "base": "abc", "z": "1", "a": "2", "m": "3", "q": "4"})


def dense_delta(seed: int = 1) -> Delta:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 7, generator=g)
    return Delta({"w": LayerDelta("w", (4, 7), dense=w)}, {"editor": "ft"})


def assert_same(a: Delta, b: Delta) -> None:
    assert a.names() == b.names()
    assert a.meta == b.meta
    for n in a.names():
        la, lb = a.layers[n], b.layers[n]
        assert la.shape == lb.shape and la.transposed == lb.transposed
        assert la.is_lowrank == lb.is_lowrank
        if la.is_lowrank:
            assert torch.equal(la.u, lb.u) and torch.equal(la.d, lb.d)
            assert torch.equal(la.alpha.reshape(()), lb.alpha.reshape(()))
        else:
            assert torch.equal(la.dense, lb.dense)
        assert torch.equal(la.to_dense(), lb.to_dense())


def put(store: DeltaStore, delta: Delta) -> str:
    staged = store.stage(delta)
    store.commit(staged)
    return staged.sha256


@pytest.mark.parametrize("make", [lowrank_delta, dense_delta])
def test_round_trip_bit_exact(tmp_path, make):
    store = DeltaStore(tmp_path)
    delta = make()
    staged = store.stage(delta)
    assert staged.tmp_path.is_file() and staged.tmp_path.parent == store.tmp_dir
    assert staged.rel_path == f"objects/{staged.sha256[:2]}/{staged.sha256}.safetensors"
    assert staged.size == staged.tmp_path.stat().st_size
    assert hashlib.sha256(staged.tmp_path.read_bytes()).hexdigest() == staged.sha256
    final = store.commit(staged)
    assert final == tmp_path / staged.rel_path and final.is_file()
    assert not staged.tmp_path.exists()
    assert store.list_objects() == [staged.sha256]
    assert_same(store.load(staged.sha256), delta)
    assert store.verify(staged.sha256) == []


def test_bf16_round_trip(tmp_path):
    store = DeltaStore(tmp_path)
    w = torch.randn(3, 4).to(torch.bfloat16)
    delta = Delta({"w": LayerDelta("w", (3, 4), dense=w)})
    loaded = store.load(put(store, delta))
    assert loaded.layers["w"].dense.dtype == torch.bfloat16
    assert torch.equal(loaded.layers["w"].dense, w)


def test_content_addressing(tmp_path):
    store = DeltaStore(tmp_path)
    # safetensors writes its metadata map in a random key order on every call; the store
    # must still give the same delta the same bytes, hash and path.
    hashes = {store.stage(lowrank_delta()).sha256 for _ in range(5)}
    assert len(hashes) == 1
    first = store.stage(lowrank_delta())
    second = store.stage(lowrank_delta())
    assert first.rel_path == second.rel_path
    store.commit(first)
    store.commit(second)  # idempotent: the object exists with the same hash
    store.commit(second)  # ...even when the temp file is already gone
    assert store.list_objects() == [first.sha256]
    assert store.stage(lowrank_delta(seed=7)).sha256 != first.sha256
    assert store.stage(lowrank_delta(meta={"editor": "other"})).sha256 != first.sha256


def test_shared_storage_tensors_are_saved(tmp_path):
    store = DeltaStore(tmp_path)
    both = torch.randn(3, 2)  # an editor may return u and d as overlapping views of one tensor
    delta = Delta({"w": LayerDelta("w", (2, 2), u=both[:2], d=both[1:],
                                   alpha=torch.tensor(1.0))})
    assert_same(store.load(put(store, delta)), delta)


def test_corrupted_file(tmp_path):
    store = DeltaStore(tmp_path)
    sha = put(store, dense_delta())
    path = store.path_for(sha)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip a byte of tensor data: still parses, wrong hash
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupted"):
        store.load(sha)
    problems = store.verify(sha)
    assert problems and "corrupted" in problems[0]
    store.load(sha, verify=False)  # without verification it still parses


def test_truncated_file(tmp_path):
    store = DeltaStore(tmp_path)
    sha = put(store, lowrank_delta())
    path = store.path_for(sha)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(StoreError, match="truncated"):
        store.load(sha)
    with pytest.raises(StoreError):
        store.load(sha, verify=False)
    assert any("truncated" in p for p in store.verify(sha))


def test_missing_and_bad_hash(tmp_path):
    store = DeltaStore(tmp_path)
    with pytest.raises(StoreError, match="missing"):
        store.load("0" * 64)
    assert "missing" in store.verify("0" * 64)[0]
    with pytest.raises(StoreError, match="sha256"):
        store.load("../etc/passwd")


def test_non_finite_on_disk_is_refused(tmp_path):
    # A NaN file that got into the store some other way (stage refuses them): rewrite the
    # data in place and rename it to its new hash, so only the NaN check can catch it.
    store = DeltaStore(tmp_path)
    sha = put(store, dense_delta())
    data = bytearray(store.path_for(sha).read_bytes())
    data[-4:] = struct.pack("<f", float("nan"))
    new_sha = hashlib.sha256(bytes(data)).hexdigest()
    store.path_for(new_sha).parent.mkdir(parents=True, exist_ok=True)
    store.path_for(new_sha).write_bytes(bytes(data))
    with pytest.raises(StoreError, match="NaN"):
        store.load(new_sha)
    assert store.verify(new_sha)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_refused_at_stage(tmp_path, bad):
    store = DeltaStore(tmp_path)
    delta = lowrank_delta()
    delta.layers["h.0.mlp.c_fc.weight"].u[0, 0] = bad
    with pytest.raises(StoreError, match="NaN or inf"):
        store.stage(delta)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_header_metadata_is_sorted_and_valid(tmp_path):
    store = DeltaStore(tmp_path)
    staged = store.stage(lowrank_delta())
    raw = staged.tmp_path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    keys = list(header["__metadata__"])
    assert keys == sorted(keys)
    from safetensors import safe_open  # an independent reader accepts the rewritten header
    with safe_open(staged.tmp_path, "pt") as f:
        assert f.metadata()["format"] == "mendctl.delta"


def test_orphans_and_gc(tmp_path):
    store = DeltaStore(tmp_path)
    keep = put(store, lowrank_delta())
    drop = put(store, dense_delta())
    pending = store.stage(lowrank_delta(seed=3))  # staged, never committed
    stray = store.objects_dir / "zz" / "notes.txt"
    stray.parent.mkdir(parents=True)
    stray.write_text("x")

    orphans = store.orphans({keep})
    assert set(orphans) == {store.path_for(drop), pending.tmp_path, stray}
    assert set(store.orphans({keep, drop})) == {stray, pending.tmp_path}

    removed = store.gc({keep})
    assert set(removed) == set(orphans)
    assert store.list_objects() == [keep]
    assert store.orphans({keep}) == []
    assert not (store.objects_dir / drop[:2]).exists() or drop[:2] == keep[:2]
    assert_same(store.load(keep), lowrank_delta())


def test_discard(tmp_path):
    store = DeltaStore(tmp_path)
    staged = store.stage(dense_delta())
    store.discard(staged)
    store.discard(staged)
    assert not staged.tmp_path.exists()
    assert store.list_objects() == [] and store.orphans(set()) == []
    with pytest.raises(StoreError, match="gone"):
        store.commit(staged)


def test_commit_repairs_damaged_object(tmp_path):
    store = DeltaStore(tmp_path)
    sha = put(store, dense_delta())
    store.path_for(sha).write_bytes(b"garbage")
    store.commit(store.stage(dense_delta()))
    assert store.verify(sha) == []
