"""Deltas as data: factor/dense reconstruction, the flat-tensor round trip, the state rule
(base + ΔW_1 + ΔW_2 ..., in order, bit for bit), the state hash, `applied`, and weight
selection with its orientation flag."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mendctl.editors.delta import FORMAT_VERSION, Delta, LayerDelta, apply_deltas, state_hash
from mendctl.editors.weights import applied, read_weights, select_weights


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lowrank(name="w", shape=(6, 4), n=3, alpha=0.37, transposed=False, seed=0) -> LayerDelta:
    """A random low-rank LayerDelta for a weight stored as `shape`."""
    g = _gen(seed)
    out_f, in_f = (shape[1], shape[0]) if transposed else shape
    return LayerDelta(name, shape, u=torch.randn(n, in_f, generator=g),
                      d=torch.randn(n, out_f, generator=g), alpha=torch.tensor(alpha),
                      transposed=transposed)


def dense(name="w", shape=(6, 4), seed=0, transposed=False) -> LayerDelta:
    return LayerDelta(name, shape, dense=torch.randn(*shape, generator=_gen(seed)),
                      transposed=transposed)


# -- LayerDelta ------------------------------------------------------------------------------------

def test_lowrank_to_dense_is_minus_alpha_dT_u():
    ld = lowrank(shape=(6, 4), n=3, alpha=0.37)
    want = -ld.alpha.double() * (ld.d.double().T @ ld.u.double())  # (out, in) = (6, 4)
    torch.testing.assert_close(ld.alpha, torch.tensor(0.37))
    got = ld.to_dense()
    assert got.dtype == torch.float32 and got.shape == (6, 4)
    torch.testing.assert_close(got, want.float(), rtol=0, atol=0)
    assert ld.is_lowrank and ld.rank == 3


def test_lowrank_to_dense_transposed_for_conv1d():
    # Conv1D stores (in, out) = (4, 6): factors are still in the (out, in) sense
    ld = lowrank(shape=(4, 6), n=2, alpha=-1.5, transposed=True)
    assert ld.u.shape == (2, 4) and ld.d.shape == (2, 6)
    want = (1.5 * (ld.d.double().T @ ld.u.double())).T
    got = ld.to_dense()
    assert got.shape == (4, 6) and got.is_contiguous()
    torch.testing.assert_close(got, want.float(), rtol=0, atol=0)


def test_rank_and_sizes():
    ld = lowrank(shape=(64, 32), n=5)
    assert torch.linalg.matrix_rank(ld.to_dense()) == 5
    assert ld.nbytes() == 4 * (5 * 32 + 5 * 64 + 1)
    dl = dense(shape=(8, 3))
    assert not dl.is_lowrank and dl.rank == 3
    assert torch.equal(dl.to_dense(), dl.dense)
    with pytest.raises(ValueError):
        LayerDelta("w", (3, 3), u=torch.zeros(1, 3), d=torch.zeros(1, 3))  # no alpha, no dense


@pytest.mark.parametrize("transposed", [False, True])
def test_compacted_keeps_delta_w_with_fewer_rows(transposed):
    """Steps that repeat directions (here: 4 steps over the same 3 directions plus noise far
    below float precision) compact to the directions' rank; ΔW is kept to float rounding; a
    factor pair already of full row rank, a dense delta and a one-row delta are returned as is."""
    g = torch.Generator().manual_seed(0)
    u0, d0 = torch.randn(3, 40, generator=g), torch.randn(3, 24, generator=g)
    mix = torch.randn(12, 3, generator=g)
    u = mix @ u0 + 1e-12 * torch.randn(12, 40, generator=g)
    d = torch.randn(12, 3, generator=g) @ d0
    shape = (40, 24) if transposed else (24, 40)
    layer = LayerDelta("w", shape, u=u, d=d, alpha=0.3, transposed=transposed)
    c = layer.compacted()
    assert c.rank == 3 and c.transposed == transposed and c.shape == layer.shape
    ref = layer.to_dense().double()
    assert float((c.to_dense().double() - ref).norm() / ref.norm()) < 1e-6
    full = LayerDelta("w", (24, 40), u=u0, d=d0, alpha=0.3)
    assert full.compacted() is full
    one = LayerDelta("w", (24, 40), u=u0[:1], d=d0[:1], alpha=0.3)
    assert one.compacted() is one
    dense = LayerDelta("w", (24, 40), dense=torch.ones(24, 40))
    assert dense.compacted() is dense
    delta = Delta({"w": layer}, {"editor": "x"}).compacted()
    assert delta.meta == {"editor": "x", "factor_rows": "12->3"} and delta.nbytes() < layer.nbytes()


def test_float_alpha_is_converted_to_tensor():
    g = _gen(1)
    ld = LayerDelta("w", (3, 2), u=torch.randn(1, 2, generator=g), d=torch.randn(1, 3, generator=g),
                    alpha=0.5)
    assert isinstance(ld.alpha, torch.Tensor)
    torch.testing.assert_close(ld.to_dense(), -0.5 * ld.d.T @ ld.u)


def test_is_finite():
    ld = lowrank()
    assert ld.is_finite()
    ld.u[0, 0] = float("nan")
    assert not ld.is_finite()
    assert not Delta({"w": ld}).is_finite()


# -- Delta <-> flat tensors ------------------------------------------------------------------------

def _mixed_delta() -> Delta:
    return Delta({
        "b.weight": lowrank("b.weight", (4, 6), n=3, transposed=True, seed=1),
        "a.weight": lowrank("a.weight", (6, 4), n=2, seed=2),
        "c.weight": dense("c.weight", (5, 7), seed=3),
    }, {"editor": "mend", "note": "x"})


def test_to_from_tensors_round_trip_bit_exact(tmp_path):
    delta = _mixed_delta()
    tensors, meta = delta.to_tensors()
    assert meta["format_version"] == str(FORMAT_VERSION)
    back = Delta.from_tensors(tensors, meta)
    assert back.names() == delta.names()
    assert back.meta == {"editor": "mend", "note": "x"}
    for name, l in delta.layers.items():
        b = back.layers[name]
        assert (b.shape, b.transposed, b.is_lowrank) == (l.shape, l.transposed, l.is_lowrank)
        if l.is_lowrank:
            assert torch.equal(b.u, l.u) and torch.equal(b.d, l.d) and torch.equal(b.alpha, l.alpha)
        else:
            assert torch.equal(b.dense, l.dense)
        assert torch.equal(b.to_dense(), l.to_dense())
    # and through an actual safetensors file
    p = str(tmp_path / "x.safetensors")
    save_file(tensors, p, metadata=meta)
    with safe_open(p, "pt") as f:
        meta2 = f.metadata()
    back2 = Delta.from_tensors(load_file(p), meta2)
    for name in delta.names():
        assert torch.equal(back2.layers[name].to_dense(), delta.layers[name].to_dense())


def test_from_tensors_rejects_wrong_factor_shape():
    tensors, meta = _mixed_delta().to_tensors()
    bad = dict(tensors)
    bad["a.weight::u"] = torch.zeros(2, 5)  # in-dim of a (6, 4) Linear weight is 4
    with pytest.raises(ValueError, match="a.weight"):
        Delta.from_tensors(bad, meta)
    bad = dict(tensors)
    bad["b.weight::d"] = torch.zeros(2, 6)  # row count differs from u's 3
    with pytest.raises(ValueError, match="b.weight"):
        Delta.from_tensors(bad, meta)
    bad = dict(tensors)
    bad["c.weight::dense"] = torch.zeros(7, 5)
    with pytest.raises(ValueError, match="c.weight"):
        Delta.from_tensors(bad, meta)
    bad = dict(tensors)
    del bad["a.weight::alpha"]
    with pytest.raises(ValueError, match="missing"):
        Delta.from_tensors(bad, meta)


def test_from_tensors_rejects_newer_version_and_foreign_format():
    tensors, meta = _mixed_delta().to_tensors()
    with pytest.raises(ValueError, match="newer"):
        Delta.from_tensors(tensors, {**meta, "format_version": str(FORMAT_VERSION + 1)})
    with pytest.raises(ValueError, match="not a mendctl delta"):
        Delta.from_tensors(tensors, {**meta, "format": "something.else"})


# -- states --------------------------------------------------------------------------------------

def _base() -> dict[str, torch.Tensor]:
    g = _gen(7)
    return {"a.weight": torch.randn(6, 4, generator=g), "b.weight": torch.randn(4, 6, generator=g),
            "c.weight": torch.randn(5, 7, generator=g)}


def test_apply_deltas_incremental_equals_batched_bit_exact():
    base = _base()
    d1 = _mixed_delta()
    d2 = Delta({"a.weight": lowrank("a.weight", (6, 4), n=4, alpha=1e-3, seed=11),
                "c.weight": dense("c.weight", (5, 7), seed=12)})
    d3 = Delta({"b.weight": lowrank("b.weight", (4, 6), n=1, transposed=True, seed=13)})
    step = apply_deltas(apply_deltas(apply_deltas(base, [d1]), [d2]), [d3])
    once = apply_deltas(base, [d1, d2, d3])
    for n in base:
        assert torch.equal(step[n], once[n])
        assert not torch.equal(once[n], base[n])
    assert state_hash(step) == state_hash(once)
    # the base dict is not modified
    assert all(torch.equal(base[n], _base()[n]) for n in base)
    # the rule is base + ΔW in order: check one element by hand
    want = base["a.weight"] + d1.layers["a.weight"].to_dense() + d2.layers["a.weight"].to_dense()
    assert torch.equal(once["a.weight"], want)


def test_apply_deltas_scales_and_errors():
    base = _base()
    d1 = _mixed_delta()
    # scale -1 undoes the change up to rounding
    back = apply_deltas(base, [d1, d1], scales=[1.0, -1.0])
    eps = torch.finfo(torch.float32).eps
    for n in base:
        dw = d1.layers[n].to_dense() if n in d1.layers else torch.zeros_like(base[n])
        # (W + Δ) − Δ in float32: each of the two roundings is off by up to ½ eps32 × the
        # operands' size |W| + |Δ| (measured ≤ 0.5 eps32 of it; 4 allowed)
        bound = 4 * eps * (base[n].abs() + dw.abs())
        assert bool(((back[n] - base[n]).abs() <= bound).all()), n
    with pytest.raises(KeyError):
        apply_deltas({"a.weight": base["a.weight"]}, [d1])
    with pytest.raises(ValueError, match="shape"):
        apply_deltas({**base, "c.weight": torch.zeros(7, 5)}, [d1])


def test_state_hash_sensitive_and_order_independent():
    base = _base()
    h = state_hash(base)
    reordered = {n: base[n] for n in reversed(list(base))}
    assert list(reordered) != list(base)
    assert state_hash(reordered) == h
    one = {n: t.clone() for n, t in base.items()}
    one["b.weight"][2, 3] = torch.nextafter(one["b.weight"][2, 3], torch.tensor(float("inf")))
    assert state_hash(one) != h
    # name and shape are part of the hash
    renamed = {("z" + n if n == "a.weight" else n): t for n, t in base.items()}
    assert state_hash(renamed) != h
    reshaped = {**base, "a.weight": base["a.weight"].reshape(4, 6)}
    assert state_hash(reshaped) != h


# -- applied -------------------------------------------------------------------------------------

def _delta_for(model, specs, seed=0, n=2, alpha=0.5) -> Delta:
    g = _gen(seed)
    return Delta({s.name: LayerDelta(s.name, s.shape, u=torch.randn(n, s.in_features, generator=g),
                                     d=torch.randn(n, s.out_features, generator=g),
                                     alpha=torch.tensor(alpha), transposed=s.transposed)
                  for s in specs})


def test_applied_writes_state_and_restores_exactly(tiny_model):
    specs = select_weights(tiny_model, "auto")
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    d1, d2 = _delta_for(tiny_model, specs, 1), _delta_for(tiny_model, specs, 2)
    want = apply_deltas(read_weights(tiny_model, specs), [d1, d2])
    with applied(tiny_model, [d1, d2]) as m:
        assert m is tiny_model
        for s in specs:
            assert torch.equal(m.get_parameter(s.name).detach(), want[s.name])
            assert not torch.equal(m.get_parameter(s.name).detach(), before[s.name])
    for n, p in tiny_model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    # restored on an exception too
    with pytest.raises(RuntimeError):
        with applied(tiny_model, d1):
            raise RuntimeError("boom")
    for n, p in tiny_model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


# -- weight selection ----------------------------------------------------------------------------

def test_select_weights_patterns_llama(tiny_llama):
    m = tiny_llama
    name = "model.layers.2.mlp.down_proj.weight"
    assert [s.name for s in select_weights(m, name)] == [name]
    # suffix
    got = [s.name for s in select_weights(m, "mlp.down_proj.weight")]
    assert got == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(4)]
    # regex (full match), canonical (block, name) order
    got = [s.name for s in select_weights(m, r"re:model\.layers\.[13]\.mlp\.(up|gate)_proj\.weight")]
    assert got == ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
                   "model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight"]
    with pytest.raises(ValueError):
        select_weights(m, "re:mlp")  # fullmatch: a bare fragment matches nothing
    # auto: MLP weights of the last three blocks
    auto = [s.name for s in select_weights(m, "auto")]
    assert auto == [f"model.layers.{b}.mlp.{w}.weight" for b in (1, 2, 3)
                    for w in ("down_proj", "gate_proj", "up_proj")]
    # several patterns, duplicates dropped
    both = select_weights(m, [name, "re:.*layers\\.2\\.mlp\\.down_proj\\.weight"])
    assert [s.name for s in both] == [name]
    with pytest.raises(ValueError, match="matches no"):
        select_weights(m, "mlp.nonexistent.weight")
    with pytest.raises(ValueError):
        select_weights(m, "re:.*layernorm.*")  # not a Linear/Conv1D weight


def test_select_weights_orientation_from_module(tiny_llama, tiny_gpt2):
    for s in select_weights(tiny_llama, "re:.*(mlp|self_attn).*weight"):
        mod = tiny_llama.get_submodule(s.module_name)
        assert isinstance(mod, nn.Linear) and s.transposed is False
        assert s.shape == tuple(mod.weight.shape) == (mod.out_features, mod.in_features)
        assert (s.in_features, s.out_features) == (mod.in_features, mod.out_features)
    specs = select_weights(tiny_gpt2, "re:.*(mlp|attn).*weight")
    assert {s.name.split(".", 3)[3] for s in specs} == {"mlp.c_fc.weight", "mlp.c_proj.weight",
                                                        "attn.c_attn.weight", "attn.c_proj.weight"}
    for s in specs:
        mod = tiny_gpt2.get_submodule(s.module_name)
        assert type(mod).__name__ == "Conv1D" and s.transposed is True
        # Conv1D stores (in, out); nf is the output size
        assert s.shape == tuple(mod.weight.shape) == (s.in_features, s.out_features)
        assert s.out_features == mod.nf
        x = torch.randn(3, s.in_features)
        assert mod(x).shape == (3, s.out_features)
    auto = [s.name for s in select_weights(tiny_gpt2, "auto")]
    assert auto == [f"transformer.h.{b}.mlp.{w}.weight" for b in (1, 2, 3) for w in ("c_fc", "c_proj")]


def test_select_weights_auto_needs_blocks():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="auto"):
        select_weights(model, "auto")
    assert [s.name for s in select_weights(model, "0.weight")] == ["0.weight"]


def test_select_weights_suffix_respects_name_boundary(tiny_llama):
    with pytest.raises(ValueError):
        select_weights(tiny_llama, "p_proj.weight")


def test_from_tensors_rejects_non_scalar_alpha():
    tensors, meta = _mixed_delta().to_tensors()
    bad = dict(tensors)
    bad["a.weight::alpha"] = torch.full((4,), 0.5)  # a (6, 4) Linear weight: d_in = 4
    with pytest.raises(ValueError, match="a.weight"):
        Delta.from_tensors(bad, meta)


def test_low_rank_norm_is_the_dense_norm():
    """‖ΔW‖_F from the factors' Gram matrices equals the norm of the dense ΔW (float64 both
    ways, from the same float32 factors: agreement to float32 rounding of the dense form)."""
    from mendctl.editors.delta import LayerDelta

    g = torch.Generator().manual_seed(3)
    layer = LayerDelta("w", (48, 32), u=torch.randn(7, 32, generator=g),
                       d=torch.randn(7, 48, generator=g) * 1e-3, alpha=torch.tensor(-0.4))
    dense = float(torch.linalg.norm(layer.to_dense().double()))
    assert layer.frobenius_norm() == pytest.approx(dense, rel=8 * torch.finfo(torch.float32).eps)


def test_applied_factors_are_u_and_minus_alpha_d_made_once():
    """What a routing hook applies: ΔW x = dᵀ(−α)(u x), from factors made once per delta (a
    state of a thousand routed edits installs them all on every load, without copying)."""
    g = torch.Generator().manual_seed(0)
    layer = LayerDelta("m.weight", (5, 3), u=torch.randn(2, 3, generator=g),
                       d=torch.randn(2, 5, generator=g), alpha=torch.tensor(0.25))
    u, d = layer.applied_factors()
    assert torch.equal(u, layer.u) and torch.equal(d, layer.d * -0.25)
    assert layer.applied_factors()[0] is u and layer.applied_factors()[1] is d
    x = torch.randn(3, generator=g, dtype=torch.float64)
    want = layer.to_dense().double() @ x
    got = (d.double().T @ (u.double() @ x))
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def test_summed_is_the_sum_and_difference_of_its_deltas():
    """What a routed edit made together with its subject's earlier facts records: the new
    deltas less the earlier ones, exactly, as one low-rank delta (rows stacked, each scaled by
    its α over the first's)."""
    from mendctl.editors.delta import summed

    a = Delta({"w": lowrank(seed=1, alpha=0.5)}, {"editor": "mend"})
    b = Delta({"w": lowrank(seed=2, alpha=0.25)})
    c = Delta({"w": lowrank(seed=3, n=2, alpha=0.5)})
    s = summed([a, b], [c])
    assert s.meta == {"editor": "mend"} and s.layers["w"].rank == 8
    want = (a.layers["w"].to_dense().double() + b.layers["w"].to_dense().double()
            - c.layers["w"].to_dense().double())
    scale = max(float(x.layers["w"].to_dense().abs().max()) for x in (a, b, c))
    # float32 factors: each entry a sum of 8 products, off by a few ulps of the terms' size
    assert torch.allclose(s.layers["w"].to_dense().double(), want, rtol=0, atol=1e-5 * scale)
    # a delta less itself is nothing
    assert float(summed([a], [a]).compacted().layers["w"].to_dense().abs().max()) <= 1e-6 * scale
    with pytest.raises(ValueError, match="low-rank"):
        summed([a], [Delta({"w": dense()})])
