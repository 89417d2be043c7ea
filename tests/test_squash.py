"""Tests of `mendctl.squash`: one delta in place of a segment of the edit chain.

The workspace tests run the library in-process on clones of the shared three-edit chain
(tests/e2e_helpers.py: tiny Llama, untrained MEND editor) and check what lands in the ledger
and the store; `combine` is also checked on bare tensors, in both weight orientations and
with a dense (fine-tuning) delta in the mix.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import (CHAIN, chain, clone_workspace, sha256_file,  # noqa: E402,F401
                         tiny_assets)

from mendctl.editors.delta import Delta, LayerDelta, apply_deltas, state_hash  # noqa: E402
from mendctl.errors import InputError  # noqa: E402
from mendctl.squash import combine, squash  # noqa: E402
from mendctl.replay import verify_chain  # noqa: E402
from mendctl.revert import revert  # noqa: E402
from mendctl.verify import verify  # noqa: E402
from mendctl.edit import edit  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps  # float32 rounding: 1.19e-7 relative


@pytest.fixture
def opened(chain, tmp_path):
    """(the clone's test handle, an open Workspace on it); the ledger is closed afterwards."""
    from mendctl.workspace import Workspace

    ws = clone_workspace(chain.ws, tmp_path / "ws")
    w = Workspace.open(str(ws.root))
    try:
        yield ws, w
    finally:
        w.ledger.close()


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        scale = float(b[n].abs().max())
        assert torch.allclose(a[n], b[n], rtol=0, atol=1e-6 * scale), \
            (n, float((a[n] - b[n]).abs().max()), scale)


def _segment_dense(w, ids: list[int]) -> dict[str, torch.Tensor]:
    """Σ ΔW of the entries, float64, (out, in) sense, from the stored deltas."""
    out: dict[str, torch.Tensor] = {}
    for i in ids:
        for n, l in w.store.load(w.ledger.get(i).delta_sha256).layers.items():
            dw = l.to_dense().double()
            out[n] = out.get(n, 0) + (dw.T if l.transposed else dw)
    return out


def test_exact_squash_of_the_whole_chain(opened):
    ws, w = opened
    head = w.head()
    w_old = w.weights_for(list(head.active_ids), head.state_hash)
    files_before = set(ws.delta_files())

    r = squash(w, 1, 3, command="mendctl squash 1..3")

    assert r["entry"] == 4 and r["squashed"] == [1, 2, 3] and r["active_ids"] == [4]
    assert r["rank"] is None and r["skipped"] == [] and r["parent"] == 3
    assert r["max_reconstruction_error"] < 1e-12
    assert set(r["reconstruction_error"]) == set(w.ledger.get(1).weight_names)
    # the squashed state against the chain's: float32 sums of the same ΔWs in another order,
    # a few eps32 × the weights' size (measured 0.5 eps32 × max |W|; 64 allowed)
    assert r["max_abs_state_diff"] <= 64 * EPS32 * max(float(t.abs().max()) for t in w_old.values())
    assert r["delta_bytes"] <= r["segment_delta_bytes"]  # one editor: the rows, stacked as is
    assert r["retention"]["before"] == r["retention"]["after"]
    e = w.ledger.get(4)
    assert e.kind == "squash" and e.parent_id == 3 and e.active_ids == [4]
    assert e.editor_name == "squash" and e.state_hash == r["state_hash"]
    assert e.inputs == [x for x, _ in CHAIN] and e.targets == [y for _, y in CHAIN]
    assert [c["input"] for c in e.request] == e.inputs
    assert e.record.squashed == [1, 2, 3] and e.record.rank is None
    assert e.record.max_reconstruction_error == r["max_reconstruction_error"]
    assert e.metrics_after == {"edit_success": r["retention"]["after"]}
    assert e.command == "mendctl squash 1..3"
    # the squashed entries stay in history, untouched
    assert [w.ledger.get(i).kind for i in (1, 2, 3)] == ["edit"] * 3
    assert w.ledger.get(3).active_ids == [1, 2, 3]

    new = set(ws.delta_files()) - files_before
    assert [p.name for p in new] == [e.delta_sha256 + ".safetensors"]
    assert sha256_file(next(iter(new))) == e.delta_sha256 == r["delta_sha256"]
    assert e.delta_size == next(iter(new)).stat().st_size
    assert not ws.tmp_dir.exists() or not any(ws.tmp_dir.iterdir())

    w_new = w.weights_for([4], e.state_hash, use_cache=False)
    _close(w_new, w_old)
    # stacked factors: as many rows as the three edits together
    d = w.store.load(e.delta_sha256)
    for n, layer in d.layers.items():
        rows = sum(w.store.load(w.ledger.get(i).delta_sha256).layers[n].rank for i in (1, 2, 3))
        assert layer.is_lowrank and layer.rank == rows == r["ranks"][n]
    assert verify_chain(w)["ok"]
    assert verify(w)["ok"]


def test_truncated_squash_reports_the_true_error(opened):
    ws, w = opened
    dense = _segment_dense(w, [1, 2, 3])
    expected = {}
    for n, dw in dense.items():
        s = torch.linalg.svd(dw, full_matrices=False).S
        assert s[1] > 1e-6 * s[0], f"{n}: the segment is rank 1; the test needs more"
        expected[n] = float(s[1:].norm() / s.norm())  # Eckart–Young: what rank 1 leaves out

    r = squash(w, 1, 3, rank=1)

    assert r["rank"] == 1 and set(r["ranks"].values()) == {1}
    for n, err in expected.items():
        assert err > 0
        assert r["reconstruction_error"][n] == pytest.approx(err, rel=1e-4)
    assert r["max_reconstruction_error"] == pytest.approx(max(expected.values()), rel=1e-4)
    assert r["max_abs_state_diff"] > 0
    e = w.ledger.get(r["entry"])
    assert e.record.rank == 1
    assert e.record.reconstruction_error == r["reconstruction_error"]
    # the stored delta really is the rank-1 truncation: its error, measured on the file
    stored = w.store.load(e.delta_sha256)
    for n, layer in stored.layers.items():
        got = layer.to_dense().double()
        got = got.T if layer.transposed else got
        measured = float((got - dense[n]).norm() / dense[n].norm())
        assert measured == pytest.approx(expected[n], rel=1e-4)
    assert r["delta_bytes"] < r["segment_delta_bytes"]
    assert verify_chain(w)["ok"]


def test_refusals_write_nothing(opened):
    ws, w = opened
    revert(w, 3)  # entry 4: a revert, no delta; active [1, 2]
    assert w.head().active_ids == [1, 2]
    rows, files = ws.ledger_count(), ws.delta_files()
    cases = [
        ((2, 4), {}, ["only entry 2", "at least two"]),  # 3 is reverted, 4 has no delta
        ((3, 4), {}, ["none of them", "at least two"]),
        ((2, 2), {}, ["only entry 2"]),
        ((2, 1), {}, ["reversed", "1..2"]),
        ((1, 9), {}, ["no entry 5..9", "mendctl log"]),
        ((0, 2), {}, ["no entry 0"]),
        ((1, 2), {"rank": 0}, ["--rank", "≥ 1"]),
    ]
    for (a, b), kw, words in cases:
        with pytest.raises(InputError) as err:
            squash(w, a, b, **kw)
        for word in words:
            assert word in str(err.value), (a, b, str(err.value))
        assert ws.ledger_count() == rows and ws.delta_files() == files
        assert not ws.tmp_dir.exists() or not any(ws.tmp_dir.iterdir())


def test_failed_recording_leaves_no_row_and_no_file(opened, monkeypatch):
    ws, w = opened
    rows, files = ws.ledger_count(), ws.delta_files()

    def boom(*a, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(w.ledger, "add_entry", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        squash(w, 1, 3)
    assert ws.ledger_count() == rows and ws.delta_files() == files
    assert not ws.tmp_dir.exists() or not any(ws.tmp_dir.iterdir())
    monkeypatch.undo()
    # the model was left in an unrecorded state: the head must be reloaded, not assumed
    head = w.head()
    _close(w.use_state(head), w.weights_for(list(head.active_ids), head.state_hash,
                                            use_cache=False))


def test_middle_segment_keeps_the_others_in_order_and_reverts(opened):
    from mendctl.editors.data import EditCase

    ws, w = opened
    edit(w, [EditCase(input="The sun rises in the", target="west")], command="edit 4")
    assert w.head().active_ids == [1, 2, 3, 4]
    w_old = w.weights_for([1, 2, 3, 4])

    r = squash(w, 2, 3)

    assert r["entry"] == 5 and r["squashed"] == [2, 3] and r["active_ids"] == [1, 5, 4]
    e = w.ledger.get(5)
    assert e.active_ids == [1, 5, 4] and e.parent_id == 4
    _close(w.weights_for([1, 5, 4], e.state_hash, use_cache=False), w_old)
    assert verify_chain(w)["ok"]

    # reverting the squash removes the whole segment: the state is base + Δ1 + Δ4, in order
    rv = revert(w, 5)
    assert rv["mode"] == "exact" and rv["later_edits"] == [4]
    head = w.head()
    assert head.kind == "revert" and head.reverts_id == 5 and head.active_ids == [1, 4]
    deltas = [w.store.load(w.ledger.get(i).delta_sha256) for i in (1, 4)]
    expected = apply_deltas(w.weights_for([]), deltas)
    assert state_hash(expected) == head.state_hash == rv["state_hash"]
    assert max(float((expected[n] - w_old[n]).abs().max()) for n in expected) > 0
    assert verify_chain(w)["ok"]


# -- combine on bare tensors -----------------------------------------------------------------------
def _lowrank(name, shape, n, transposed, seed, alpha):
    g = torch.Generator().manual_seed(seed)
    out_dim, in_dim = shape[::-1] if transposed else shape
    return LayerDelta(name, shape, u=torch.randn(n, in_dim, generator=g),
                      d=torch.randn(n, out_dim, generator=g), alpha=alpha, transposed=transposed)


@pytest.mark.parametrize("transposed", [False, True])
def test_combine_stacks_exactly_and_densifies_when_needed(transposed):
    shape = (6, 10)
    a = Delta({"w1": _lowrank("w1", shape, 2, transposed, 0, 0.5),
               "w2": _lowrank("w2", shape, 1, transposed, 1, 3.0)})
    b = Delta({"w1": _lowrank("w1", shape, 3, transposed, 2, -2.0)})  # w2 untouched by b
    g = torch.Generator().manual_seed(3)
    c = Delta({"w2": LayerDelta("w2", shape, dense=torch.randn(*shape, generator=g),
                                transposed=transposed)})
    want = {n: sum(d.layers[n].to_dense().double() for d in (a, b, c) if n in d.layers)
            for n in ("w1", "w2")}

    out, err = combine([a, b, c])
    w1, w2 = out.layers["w1"], out.layers["w2"]
    assert w1.is_lowrank and w1.rank == 5 and w1.transposed == transposed
    assert not w2.is_lowrank and w2.transposed == transposed  # a dense part makes it dense
    for n in want:
        # to_dense rounds the float64 product to float32: ½ eps32 × each entry, and the
        # combined float32 factors are off by eps32 relative (measured ≤ 0.5 eps32 × max |ΔW|;
        # 16 allowed)
        off = float((out.layers[n].to_dense().double() - want[n]).abs().max())
        assert off <= 16 * EPS32 * float(want[n].abs().max()), (n, off)
        assert err[n] < 1e-7
    # the stored form survives the store's serialisation unchanged
    back = Delta.from_tensors(*out.to_tensors())
    assert torch.equal(back.layers["w1"].to_dense(), w1.to_dense())

    cut, err1 = combine([a, b, c], rank=2)
    for n in want:
        layer = cut.layers[n]
        assert layer.is_lowrank and layer.rank == 2 and layer.transposed == transposed
        m = want[n].T if transposed else want[n]
        s = torch.linalg.svd(m).S
        assert err1[n] == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-5)
    keep, err9 = combine([a, b], rank=9)  # 5 stacked rows ≤ 9: kept exact, not re-factored
    assert keep.layers["w1"].rank == 5 and err9["w1"] < 1e-12


def test_combine_keeps_a_shared_alpha_and_the_factor_dtype():
    """One editor's deltas share α per weight: the stack is their rows, nothing multiplied."""
    shape = (6, 10)
    parts = [Delta({"w": _lowrank("w", shape, n, False, seed, 0.25)})
             for n, seed in ((2, 0), (1, 1), (3, 2))]
    out, err = combine(parts)
    layer = out.layers["w"]
    assert layer.rank == 6 and float(layer.alpha) == 0.25 and layer.d.dtype == torch.float32
    assert torch.equal(layer.d, torch.cat([p.layers["w"].d for p in parts]))
    assert err["w"] < 1e-12
    assert out.nbytes() < sum(p.nbytes() for p in parts)


def test_cli_squash_exact_and_truncated(chain, tmp_path):
    """`mendctl squash` records the entry and reports it; a bad segment is one error line."""
    from e2e_helpers import one_line_error

    ws = clone_workspace(chain.ws, tmp_path / "ws")
    msg = one_line_error(ws.run("squash", "3..1"))
    assert "3" in msg and "1" in msg
    msg = one_line_error(ws.run("squash", "2.."))
    assert "both ends" in msg
    assert ws.ledger_count() == 3
    r = ws.ok("squash", "1..3", "--rank", "1", "--json").json()
    assert r["entry"] == 4 and r["squashed"] == [1, 2, 3] and r["rank"] == 1
    assert r["max_reconstruction_error"] > 0
    log = {e["id"]: e for e in ws.ok("log", "--json").json()}
    assert log[4]["kind"] == "squash" and log[4]["active_ids"] == [4]
    text = ws.ok("log").stdout
    assert "squash" in text
    assert ws.run("replay", "--verify").returncode == 0


def test_revert_by_replay_recomputes_a_squash_as_its_edits(chain, tmp_path):
    """Replaying past a squash re-runs the edits it combined, one by one, not one batch."""
    from mendctl.workspace import Workspace

    ws = clone_workspace(chain.ws, tmp_path / "ws")
    w = Workspace.open(str(ws.root))
    try:
        squash(w, 2, 3)  # entry 4; active [1, 4]
        r = revert(w, 1, replay=True)
        by_id = {e.id: e for e in w.ledger.entries()}
        replays = [by_id[i] for i in r["entries"][1:]]
        assert [e.replay_of_id for e in replays] == [2, 3]
        assert [list(e.inputs) for e in replays] == [[CHAIN[1][0]], [CHAIN[2][0]]]
        assert w.head().active_ids == [e.id for e in replays]
        assert verify_chain(w)["ok"]
    finally:
        w.ledger.close()
