"""The MEND editor on tiny random models: the paper's invariants (identity start, raw gradient
without normalisation, rank ≤ tokens, one network per shape), the normaliser, the checkpoint,
a short training run, and the fine-tuning baselines."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from conftest import LOCALITY_PROMPTS, fact_paraphrase, fact_prompt
from mendctl.editors.data import EditCase
from mendctl.editors.delta import Delta
from mendctl.editors.ft import FTEditor
from mendctl.editors.mend import network
from mendctl.editors.mend.capture import edit_loss
from mendctl.editors.mend.editor import CONFIG_FILE, EditorMismatch, MendConfig, MendEditor
from mendctl.editors.mend.network import GradientTransform, RunningNorm
from mendctl.editors.mend.trainer import TrainConfig, Trainer
from mendctl.editors.forward import selected_logits
from mendctl.editors.metrics import (edit_success, locality_reference, locality_scores,
                                     target_scores, top1_agreement)
from mendctl.editors.text import encode_pairs
from mendctl.editors.weights import applied, select_weights

PROMPTS = ["the capital of s3 is", "water is"]
TARGETS = ["c7", "blue and cold"]
ALL_LINEAR = r"re:.*\.(mlp|attn|self_attn)\..*weight"


def _stored_grads(model, specs, batch):
    """dL/dW by plain autograd, in each parameter's stored orientation."""
    params = [model.get_parameter(s.name) for s in specs]
    for p in params:
        p.requires_grad_(True)
    with torch.enable_grad():
        loss = edit_loss(model, batch)
        grads = torch.autograd.grad(loss, params)
    return {s.name: g for s, g in zip(specs, grads)}


def _feed_norm(editor, model, tok, specs):
    """Give the editor non-trivial normalisation statistics from real (u, δ) pairs."""
    from mendctl.editors.mend.capture import capture_edit_gradients

    editor.train()
    for p, t in [(PROMPTS, TARGETS), (["the capital of s5 is", "grass is"], ["c1", "green"])]:
        pairs, _ = capture_edit_gradients(model, specs, encode_pairs(tok, p, t))
        with torch.no_grad():
            editor.factors(pairs)  # observes in training mode
    editor.eval()


def _perturb(editor, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in editor.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        editor.alpha.abs_()


# -- the untrained editor -----------------------------------------------------------------------------

def test_untrained_editor_without_norm_reproduces_raw_gradient(tiny_model, tiny_tokenizer):
    specs = select_weights(tiny_model, ALL_LINEAR)
    alpha = 0.5
    editor = MendEditor(specs, MendConfig(norm=False, rank=4, init_alpha=alpha))
    delta = editor.edit(tiny_model, tiny_tokenizer, PROMPTS, TARGETS)
    grads = _stored_grads(tiny_model, specs, encode_pairs(tiny_tokenizer, PROMPTS, TARGETS))
    assert set(delta.layers) == set(grads) == {s.name for s in specs}
    transposed = {s.transposed for s in specs}
    assert len(transposed) == 1  # one orientation per model; the fixture gives both
    for s in specs:
        layer = delta.layers[s.name]
        dw = layer.to_dense()
        g = grads[s.name]
        assert dw.shape == g.shape == s.shape and layer.transposed == s.transposed
        assert g.abs().max() > 0, s.name
        torch.testing.assert_close(dw, -alpha * g, rtol=1e-4, atol=1e-6 * float(g.abs().max()),
                                   msg=s.name)
    assert float(delta.meta["edit_loss_before"]) > 0


def test_delta_rank_at_most_tokens(tiny_model, tiny_tokenizer):
    specs = select_weights(tiny_model, "auto")
    editor = MendEditor(specs, MendConfig(rank=4))
    _feed_norm(editor, tiny_model, tiny_tokenizer, specs)
    _perturb(editor)
    batch = encode_pairs(tiny_tokenizer, PROMPTS, TARGETS)
    n = batch.n_tokens  # non-padding tokens of the batched edit
    assert n < batch.input_ids.numel()  # the batch has padding, which must not count
    delta = editor.edit(tiny_model, tiny_tokenizer, PROMPTS, TARGETS)
    for s in specs:
        layer = delta.layers[s.name]
        assert layer.is_lowrank
        assert layer.u.shape == (n, s.in_features) and layer.d.shape == (n, s.out_features)
        assert layer.rank == n < min(s.shape)
        dense = layer.to_dense()
        assert dense.dtype == torch.float32
        assert torch.linalg.matrix_rank(dense) <= n  # float32 tolerance: to_dense rounds once
    # the factors take fewer bytes than the dense matrices
    assert delta.nbytes() < delta.dense_nbytes()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_one_network_per_weight_shape(make_model, kind):
    model = make_model(kind)
    specs = select_weights(model, ALL_LINEAR)
    shapes = Counter()
    for s in specs:  # in/out read off the module itself, independently of WeightSpec
        mod = model.get_submodule(s.module_name)
        io = (mod.in_features, mod.out_features) if kind == "llama" else (mod.weight.shape[0], mod.nf)
        shapes[io] += 1
    assert len(shapes) >= 3  # the test needs several shapes, some shared by several layers
    editor = MendEditor(specs, MendConfig(rank=3))
    assert len(editor.nets) == len(shapes)
    nets = {(net.d_in, net.d_out): net for net in editor.nets.values()}
    assert set(nets) == set(shapes)
    for io, count in shapes.items():
        net = nets[io]
        assert net.n_layers == count
        for p in (net.s1, net.o1, net.s2, net.o2):
            assert p.shape == (count, io[0] + io[1])
        assert net.U1.shape == (io[0] + io[1], 3)
    # every layer of a shape gets its own row; alpha is per weight
    rows = Counter(editor._where.values())
    assert all(c == 1 for c in rows.values()) and len(rows) == len(specs)
    assert editor.alpha.shape == (len(specs),)
    # a delta is produced for every weight, through the shared networks
    tok_free = {s.name: (torch.randn(3, s.in_features), torch.randn(3, s.out_features)) for s in specs}
    f = editor._eval_factors(tok_free)
    for s in specs:
        assert f[s.name][0].shape == (3, s.in_features) and f[s.name][1].shape == (3, s.out_features)


# -- the gradient transform ---------------------------------------------------------------------------

def test_gradient_transform_is_identity_at_init():
    torch.manual_seed(0)
    net = GradientTransform(5, 7, rank=3, n_layers=2, norm=True)
    net.train()
    for k in range(3):
        net.observe(torch.randn(10 + k, 5) * 3 + 1, torch.randn(10 + k, 7) * 0.01 - 2)
    net.eval()
    u, d = torch.randn(4, 5), torch.randn(4, 7)
    for layer in (0, 1):
        pu, pd = net(u, d, layer)
        assert torch.equal(pu, net.norm_u(u)) and torch.equal(pd, net.norm_d(d))
    # and the normalised input really is (x - mean) / std of the data seen
    torch.testing.assert_close(pu.double(), (u.double() - net.norm_u.mean) / net.norm_u.std(),
                               rtol=1e-5, atol=1e-5)
    raw = GradientTransform(5, 7, rank=3, n_layers=1, norm=False)
    pu, pd = raw(u, d, 0)
    assert torch.equal(pu, u) and torch.equal(pd, d)


@pytest.mark.parametrize("relu, flows", [(network._relu, True), (torch.relu, False)])
def test_clamp_relu_lets_gradient_leave_identity_start(monkeypatch, relu, flows):
    """The network's clamp-ReLU passes gradient at the all-zero start; nn.ReLU would not
    (the second case shows the test can tell them apart)."""
    monkeypatch.setattr(network, "_relu", relu)
    torch.manual_seed(0)
    net = GradientTransform(6, 4, rank=2, n_layers=1, norm=False)
    u, d = torch.randn(5, 6), torch.randn(5, 4)
    pu, pd = net(u, d, 0)
    loss = (pu * torch.randn_like(pu)).sum() + (pd * torch.randn_like(pd)).sum()
    loss.backward()
    assert (net.U1.grad.abs().sum() > 0) == flows
    assert (net.U2.grad.abs().sum() > 0) == flows


def test_running_norm_matches_torch_statistics():
    torch.manual_seed(0)
    rn = RunningNorm(6)
    x = torch.randn(5, 6)
    assert torch.equal(rn(x), x)  # nothing seen yet: pass through
    chunks = [torch.randn(n, 6) * torch.arange(1, 7) + 3 for n in (7, 1, 20, 2)]
    chunks.append(torch.randn(2, 3, 6))  # (batch, seq, dim) is flattened
    for c in chunks:
        rn.update(c)
    data = torch.cat([c.reshape(-1, 6) for c in chunks]).double()
    assert int(rn.count) == data.shape[0]
    torch.testing.assert_close(rn.mean, data.mean(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rn.m2 / (rn.count - 1), data.var(0, unbiased=True), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rn.std(), data.std(0) + rn.eps, rtol=1e-10, atol=1e-10)
    want = (x.double() - data.mean(0)) / data.std(0)
    # float32 at worst: x − mean and the division each rounded, off by a few eps32 × the
    # operands' size (|x| + |mean|) / std, whatever the CPU (4 eps32 of it allowed, plus 1e-5
    # of each entry for the float32 statistics)
    eps = torch.finfo(torch.float32).eps
    bound = 4 * eps * (x.double().abs() + data.mean(0).abs()) / data.std(0) + 1e-5 * want.abs()
    assert bool(((rn(x).double() - want).abs() <= bound).all()), float((rn(x).double() - want).abs().max())


def test_normaliser_frozen_in_eval_mode(tiny_llama, tiny_tokenizer):
    net = GradientTransform(4, 3, rank=2, n_layers=1)
    net.train()
    net.observe(torch.randn(8, 4), torch.randn(8, 3))
    state = {k: v.clone() for k, v in net.state_dict().items() if "norm" in k}
    net.eval()
    net.observe(torch.randn(8, 4) + 5, torch.randn(8, 3) + 5)
    net(torch.randn(3, 4), torch.randn(3, 3), 0)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    net.train()
    net.observe(torch.randn(8, 4) + 5, torch.randn(8, 3) + 5)
    assert not torch.equal(state["norm_u.mean"], net.norm_u.mean)

    # an edit is a pure function of (editor, model, example): it never moves the statistics,
    # even when the editor is left in training mode
    specs = select_weights(tiny_llama, "auto")
    editor = MendEditor(specs, MendConfig(rank=2))
    _feed_norm(editor, tiny_llama, tiny_tokenizer, specs)
    editor.train()
    before = {k: v.clone() for k, v in editor.state_dict().items()}
    d1 = editor.edit(tiny_llama, tiny_tokenizer, ["the capital of s9 is"], ["c3"])
    d2 = editor.edit(tiny_llama, tiny_tokenizer, ["the capital of s9 is"], ["c3"])
    assert editor.training
    assert all(torch.equal(v, editor.state_dict()[k]) for k, v in before.items())
    for n in d1.layers:
        assert torch.equal(d1.layers[n].u, d2.layers[n].u) and torch.equal(d1.layers[n].d, d2.layers[n].d)


# -- checkpoint -------------------------------------------------------------------------------------

def test_editor_checkpoint_round_trip(tiny_model, tiny_tokenizer, tmp_path):
    specs = select_weights(tiny_model, "auto")
    editor = MendEditor(specs, MendConfig(rank=5, init_alpha=0.01))
    _feed_norm(editor, tiny_model, tiny_tokenizer, specs)
    _perturb(editor)
    base_hash = "a" * 64
    editor.save(tmp_path / "ed", info={"base_model": {"hash": base_hash}})
    doc = json.loads((tmp_path / "ed" / CONFIG_FILE).read_text())
    assert doc["base_model"]["hash"] == base_hash and doc["config"]["rank"] == 5

    loaded = MendEditor.load(tmp_path / "ed", specs, base_model_hash=base_hash)
    assert loaded.config == editor.config and not loaded.training
    a, b = editor.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    d1 = editor.edit(tiny_model, tiny_tokenizer, PROMPTS, TARGETS)
    d2 = loaded.edit(tiny_model, tiny_tokenizer, PROMPTS, TARGETS)
    for n in d1.layers:
        l1, l2 = d1.layers[n], d2.layers[n]
        assert torch.equal(l1.u, l2.u) and torch.equal(l1.d, l2.d) and torch.equal(l1.alpha, l2.alpha)
    # the perturbation made the editor non-trivial (not the identity's output)
    d0 = editor.to_identity().edit(tiny_model, tiny_tokenizer, PROMPTS, TARGETS)
    assert not torch.allclose(d0.layers[specs[0].name].u, d1.layers[specs[0].name].u)

    # no hash given, or the same hash: fine
    MendEditor.load(tmp_path / "ed", specs)
    # other weights: refused
    with pytest.raises(EditorMismatch, match="other weights"):
        MendEditor.load(tmp_path / "ed", specs[:-1])
    with pytest.raises(EditorMismatch):
        MendEditor.load(tmp_path / "ed", select_weights(tiny_model, ALL_LINEAR))
    # another base model: refused
    with pytest.raises(EditorMismatch, match="base model"):
        MendEditor.load(tmp_path / "ed", specs, base_model_hash="b" * 64)
    # not a checkpoint at all
    with pytest.raises(EditorMismatch):
        MendEditor.load(tmp_path / "nothing", specs)


def test_resaved_loaded_editor_records_its_own_file_hash(tiny_llama, tmp_path):
    from mendctl.editors.mend.editor import WEIGHTS_FILE, file_sha256

    specs = select_weights(tiny_llama, "auto")
    MendEditor(specs, MendConfig(rank=2)).save(tmp_path / "a", info={"base_model": {"hash": "a" * 64}})
    loaded = MendEditor.load(tmp_path / "a", specs)
    with torch.no_grad():
        loaded.alpha.mul_(2)  # e.g. further training
    loaded.save(tmp_path / "b")
    doc = json.loads((tmp_path / "b" / CONFIG_FILE).read_text())
    assert doc["weights_sha256"] == file_sha256(tmp_path / "b" / WEIGHTS_FILE)


# -- training -----------------------------------------------------------------------------------------

def _fact_cases(indices, seed):
    r = random.Random(seed)
    return [EditCase(fact_prompt(f"s{i}"), f"c{r.randrange(12)}",
                     paraphrases=[fact_paraphrase(f"s{i}")],
                     locality=[r.choice(LOCALITY_PROMPTS)]) for i in indices]


def _success_rate(editor, model, tok, cases):
    ok = []
    for c in cases:
        delta = editor.edit(model, tok, [c.input], [c.target])
        with applied(model, delta):
            ok += edit_success(model, tok, [c.input], [c.target])
    return sum(ok) / len(ok)


@pytest.mark.parametrize("chain_length", [0, 4])
def test_training_raises_edit_success(tiny_llama, tiny_tokenizer, tmp_path, chain_length):
    # single edits on the base model, and chain training (each step edits the state left by
    # up to 3 earlier edits): either way the editor learns to edit the base model
    model, tok = tiny_llama, tiny_tokenizer
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    specs = select_weights(model, "auto")
    torch.manual_seed(0)
    editor = MendEditor(specs, MendConfig(rank=8, init_alpha=1e-3))
    train, held_out = _fact_cases(range(16), 1), _fact_cases(range(16, 24), 2)
    # the targets are not what the model says already
    assert not any(edit_success(model, tok, [c.input], [c.target])[0] for c in held_out)
    cfg = TrainConfig(steps=120, edits_per_step=4, lr=3e-3, alpha_lr=1e-2, val_every=1000,
                      val_cases=8, norm_warmup=5, seed=0, chain_length=chain_length)
    trainer = Trainer(editor, model, tok, train, held_out, cfg, progress=False)
    untrained = MendEditor(specs, editor.config)
    before = _success_rate(untrained, model, tok, held_out)
    result = trainer.run(tmp_path / "best")
    assert result.steps == 120 and result.history
    after = _success_rate(editor, model, tok, held_out)
    identity = _success_rate(editor.to_identity(), model, tok, held_out)  # same normaliser
    assert before <= 0.125 and identity <= 0.125
    assert after >= 0.5, (before, identity, after)
    # the best checkpoint was written and loads for these weights
    best = MendEditor.load(tmp_path / "best", specs)
    assert best.info["training"]["best_step"] == result.best_step
    assert best.info["training"]["config"]["chain_length"] == chain_length
    for n, p in model.named_parameters():  # chains live in the trainer, never in the model
        assert torch.equal(p.detach(), base[n]), n


def test_sweep_steps_matches_multi_step_edits_of_a_rescaled_editor(tiny_llama, tiny_tokenizer):
    """One pass of `sweep_steps` gives, for every (factor, step budget), what `edit` with
    max_steps=k does with α multiplied by the factor; the editor's α is left as it was."""
    import copy

    model, tok = tiny_llama, tiny_tokenizer
    specs = select_weights(model, "auto")
    editor = MendEditor(specs, MendConfig(rank=4, norm=False, init_alpha=3e-2))
    alpha = editor.alpha.detach().clone()
    cases = _fact_cases(range(4), 5)
    rows = editor.sweep_steps(model, tok, cases, [0.5, 1.0], max_steps=3)
    assert torch.equal(editor.alpha, alpha)
    assert [(r["scale"], r["max_steps"]) for r in rows] == [(s, k) for s in (0.5, 1.0) for k in (1, 2, 3)]
    for r in rows:
        scaled = copy.deepcopy(editor)
        scaled.rescale(r["scale"])
        es, steps, loc = [], [], []
        for c in cases:
            ref = locality_reference(model, tok, c.locality[:2], n_new=2)
            d = scaled.edit(model, tok, [c.input], [c.target], max_steps=r["max_steps"])
            with applied(model, d):
                es += edit_success(model, tok, [c.input], [c.target])
                loc += locality_scores(model, ref)[0]
            steps.append(int(d.meta["edit_steps"]))
        assert r["edit_success"] == pytest.approx(sum(es) / len(es)), r
        assert r["steps"] == pytest.approx(sum(steps) / len(steps)), r
        assert r["locality"] == pytest.approx(sum(loc) / len(loc), abs=1e-6), r
    # more steps never undo an edit that held: success can only grow with the budget
    for s in (0.5, 1.0):
        col = [r["edit_success"] for r in rows if r["scale"] == s]
        assert col == sorted(col)


def test_sweep_chain_scores_each_chain_on_its_last_state(tiny_llama, tiny_tokenizer):
    """The chain validation: edits made one after another on the state the earlier ones left,
    then every edit of the chain scored on the last state against the base model. Checked
    against a copy of the model whose weights really hold the chain; chains of one edit are
    the single-edit sweep."""
    import copy

    model, tok = tiny_llama, tiny_tokenizer
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    specs = select_weights(model, "auto")
    editor = MendEditor(specs, MendConfig(rank=4, norm=False, init_alpha=1e-1))
    cases = _fact_cases(range(5), 3)
    got = editor.sweep_chain(model, tok, cases, chain_length=3)
    es, para, loc, now = [], [], [], []
    for chain in (cases[:3], cases[3:]):
        m = copy.deepcopy(model)
        refs = [locality_reference(model, tok, c.locality[:2], n_new=2) for c in chain]
        for c in chain:  # each edit computed on, and written into, the chain's own model
            d = editor.edit(m, tok, [c.input], [c.target])
            with torch.no_grad():
                for name, layer in d.layers.items():
                    m.get_parameter(name).add_(layer.to_dense())
            now += edit_success(m, tok, [c.input], [c.target])
        for c, ref in zip(chain, refs):
            es += edit_success(m, tok, [c.input], [c.target])
            para += edit_success(m, tok, c.paraphrases, [c.target] * len(c.paraphrases))
            loc += locality_scores(m, ref)[0]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert 0 < mean(now) and mean(es) < 1 and mean(loc) < 1  # the chain changes things
    assert got["immediate_edit_success"] == pytest.approx(mean(now))
    assert got["edit_success"] == pytest.approx(mean(es))
    assert got["paraphrase_success"] == pytest.approx(mean(para))
    assert got["locality"] == pytest.approx(mean(loc), abs=1e-6)
    single = editor.sweep_scale(model, tok, cases, [1.0])[0]
    ones = editor.sweep_chain(model, tok, cases, chain_length=1)
    for k in ("edit_success", "paraphrase_success", "locality"):
        assert ones[k] == pytest.approx(single[k]), k
    for n, p in model.named_parameters():  # the base model is left as it was
        assert torch.equal(p.detach(), base[n]), n


# -- fine-tuning baselines ----------------------------------------------------------------------------

def test_ft_baseline_dense_deltas_raise_target(tiny_model, tiny_tokenizer):
    model, tok = tiny_model, tiny_tokenizer
    specs = select_weights(model, "auto")
    p, t = ["the capital of s3 is"], ["c7 and c2"]
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    ok0, lp0 = target_scores(model, tok, p, t)
    delta = FTEditor(specs, steps=25, lr=5e-3).edit(model, tok, p, t)
    assert isinstance(delta, Delta) and delta.meta["editor"] == "ft"
    assert set(delta.layers) == {s.name for s in specs}
    for s in specs:
        layer = delta.layers[s.name]
        assert not layer.is_lowrank and layer.transposed == s.transposed
        assert tuple(layer.dense.shape) == s.shape and layer.to_dense().shape == s.shape
    assert delta.is_finite()
    for n, q in model.named_parameters():  # the edit itself leaves the model alone
        assert torch.equal(q.detach(), before[n])
    with applied(model, delta):
        ok1, lp1 = target_scores(model, tok, p, t)
    assert not ok0[0] and ok1[0]
    assert lp1[0] > lp0[0] + 1.0


def test_ft_kl_keeps_locality_closer(tiny_model, tiny_tokenizer):
    model, tok = tiny_model, tiny_tokenizer
    specs = select_weights(model, "auto")
    p, t = ["the capital of s3 is"], ["c7 and c2"]
    loc = LOCALITY_PROMPTS[:3]
    ref = locality_reference(model, tok, loc, n_new=3)
    kls = {}
    for k in (0.0, 10.0):
        ed = FTEditor(specs, steps=25, lr=5e-3, kl_weight=k)
        delta = ed.edit(model, tok, p, t, locality=loc)
        assert delta.is_finite() and delta.meta["editor"] == ("ft_kl" if k else "ft")
        with applied(model, delta):
            assert target_scores(model, tok, p, t)[0][0]
            kls[k] = sum(locality_scores(model, ref)[1]) / len(loc)
    assert kls[10.0] < 0.5 * kls[0.0], kls


def test_multi_step_edit_is_the_exact_sum_of_its_steps(tiny_llama, tiny_tokenizer):
    """max_steps > 1 re-edits the model with the delta so far applied; the stacked (and
    compacted) factors equal the sum of the separate steps, and it stops once the target is
    the argmax."""
    specs = select_weights(tiny_llama, ["auto"])
    editor = MendEditor(specs, MendConfig(rank=4, norm=False, init_alpha=1e-3))
    p, t = ["the capital of s3 is"], ["c7"]
    one = editor.edit(tiny_llama, tiny_tokenizer, p, t, max_steps=1)
    with applied(tiny_llama, one):
        assert not all(edit_success(tiny_llama, tiny_tokenizer, p, t))  # one step is not enough
        second = editor.edit(tiny_llama, tiny_tokenizer, p, t, max_steps=1)
    two = editor.edit(tiny_llama, tiny_tokenizer, p, t, max_steps=2)
    assert two.meta["edit_steps"] == "2"
    rows_before, rows_after = map(int, two.meta["factor_rows"].split("->"))
    assert rows_before == 2 * sum(l.rank for l in one.layers.values()) >= rows_after
    for name, layer in two.layers.items():
        assert layer.u.shape[0] <= one.layers[name].u.shape[0] * 2
        a, b = one.layers[name].to_dense(), second.layers[name].to_dense()
        # Tolerance from the arithmetic: the compacted factors are rounded to float32 (each
        # off by eps32 relative), so their product, and the float32 sum a + b, are off by a
        # few eps32 × the steps' magnitude (measured ≤ 2 eps32 × max(|a| + |b|); 64 allowed;
        # a missing or doubled step is off by O(max |b|))
        tol = 64 * torch.finfo(torch.float32).eps * float((a.abs() + b.abs()).max())
        err = float((layer.to_dense() - (a + b)).abs().max())
        assert err <= tol, (name, err, tol)
    big = MendEditor(specs, MendConfig(rank=4, norm=False, init_alpha=1e3))
    d = big.edit(tiny_llama, tiny_tokenizer, p, t, max_steps=5)
    with applied(tiny_llama, d):
        ok = all(edit_success(tiny_llama, tiny_tokenizer, p, t))
    steps = int(d.meta["edit_steps"])
    # a step of α = 1e3 makes the target the answer at once (measured: after 1 step): the
    # edit holds, and the loop stopped there instead of taking all 5 steps
    assert ok, steps
    assert 1 <= steps < 5, steps


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_bf16_model_gives_the_fp32_delta_within_tolerance(make_model, tiny_tokenizer, kind):
    """A model loaded in bfloat16 records the same delta as the float32 path, to bf16's
    precision: relative Frobenius error under 5 % per weight (measured: about 1-2 %), and the
    recorded factors are float32 on the CPU whatever the model's dtype."""
    torch.manual_seed(0)
    m32 = make_model(kind)
    specs = select_weights(m32, "auto")
    editor = MendEditor(specs, MendConfig(rank=8, norm=False, init_alpha=1.0)).eval()
    args = (tiny_tokenizer, [fact_prompt("s3")], ["c7"])
    d32 = editor.edit(m32, *args)
    d16 = editor.edit(make_model(kind).to(torch.bfloat16), *args)
    for name in d32.names():
        a, b = d32.layers[name].to_dense(), d16.layers[name].to_dense()
        assert float((a - b).norm() / a.norm()) < 0.05, name
        layer = d16.layers[name]
        assert layer.u.dtype == layer.d.dtype == torch.float32
        assert layer.u.device.type == "cpu"


def test_norm_guard_scales_the_delta_down_to_the_limit(tiny_llama, tiny_tokenizer):
    """max_norm: an edit larger than the limit becomes the same ΔW scaled down to exactly the
    limit (direction kept, every weight by one factor); a smaller one is left alone."""
    specs = select_weights(tiny_llama, ["auto"])
    editor = MendEditor(specs, MendConfig(rank=4, norm=False, init_alpha=1e-2))
    p, t = ["the capital of s3 is"], ["c7"]
    free = editor.edit(tiny_llama, tiny_tokenizer, p, t)
    total = sum(v * v for v in free.norms().values()) ** 0.5
    assert total > 0
    guarded = editor.edit(tiny_llama, tiny_tokenizer, p, t, max_norm=0.25 * total)
    assert float(guarded.meta["norm_scale"]) == pytest.approx(0.25, rel=1e-5)
    assert sum(v * v for v in guarded.norms().values()) ** 0.5 == pytest.approx(0.25 * total, rel=1e-5)
    eps = torch.finfo(torch.float32).eps
    for name, layer in guarded.layers.items():
        want = 0.25 * free.layers[name].to_dense()
        # the same ΔW times one factor: the factor is 0.25 to 1e-5 (checked above), and the
        # scaled float32 factors are rounded once more, a few eps32 × the largest entry
        # (measured: identical; 16 eps32 allowed)
        bound = 1e-5 * want.abs() + 16 * eps * float(want.abs().max())
        assert bool(((layer.to_dense() - want).abs() <= bound).all()), name
    loose = editor.edit(tiny_llama, tiny_tokenizer, p, t, max_norm=2 * total)
    assert "norm_scale" not in loose.meta
    for name, layer in loose.layers.items():
        assert torch.equal(layer.to_dense(), free.layers[name].to_dense())
    # in a multi-step edit each step is bounded on its own
    stepped = editor.edit(tiny_llama, tiny_tokenizer, p, t, max_steps=3, max_norm=0.25 * total)
    steps = int(stepped.meta["edit_steps"])
    assert "norm_scale" in stepped.meta
    assert sum(v * v for v in stepped.norms().values()) ** 0.5 <= steps * 0.25 * total * (1 + 1e-5)


def test_calibrate_records_the_size_of_single_edits(tiny_llama, tiny_tokenizer):
    specs = select_weights(tiny_llama, ["auto"])
    editor = MendEditor(specs, MendConfig(rank=4, norm=False, init_alpha=1e-2))
    prompts = [fact_prompt(f"s{i}") for i in range(5)]
    targets = [f"c{i}" for i in range(5)]
    ref = editor.calibrate(tiny_llama, tiny_tokenizer, prompts, targets)
    norms = sorted(sum(v * v for v in editor.edit(tiny_llama, tiny_tokenizer, [a], [b]).norms().values()) ** 0.5
                   for a, b in zip(prompts, targets))
    assert ref["cases"] == 5 and ref["median"] == pytest.approx(norms[2])
    assert ref["max"] == pytest.approx(norms[-1]) and norms[0] <= ref["p90"] <= norms[-1]
    assert editor.info["delta_norm_reference"] == ref


def test_retention_guard_leaves_protected_keys_alone(tiny_llama, tiny_tokenizer):
    """protect=[earlier pairs]: every step's ũ is projected off the earlier edit's keys, so
    the new ΔW maps each of those keys (on the model as it is) to ~0, where the unguarded edit
    does not; the new edit still raises its own target."""
    from mendctl.editors.mend.protect import key_inputs
    specs = select_weights(tiny_llama, ["auto"])
    editor = MendEditor(specs, MendConfig(rank=4, norm=False, init_alpha=1e-2))
    first = (fact_prompt("s3"), "c7")
    a = editor.edit(tiny_llama, tiny_tokenizer, [first[0]], [first[1]])
    with applied(tiny_llama, a):
        batch = encode_pairs(tiny_tokenizer, [first[0]], [first[1]])
        keys = {n: x[0] for n, x in key_inputs(tiny_llama, specs, batch).items()}
        p, t = [fact_prompt("s5")], ["c2"]
        free = editor.edit(tiny_llama, tiny_tokenizer, p, t)
        guarded = editor.edit(tiny_llama, tiny_tokenizer, p, t, protect=[first], protect_energy=1.0)
        before = float(target_scores(tiny_llama, tiny_tokenizer, p, t)[1][0])
        with applied(tiny_llama, guarded):
            assert float(target_scores(tiny_llama, tiny_tokenizer, p, t)[1][0]) > before
    assert int(guarded.meta["protected_rank"]) >= 1 and "protected_rank" not in free.meta
    for name, k in keys.items():
        layer = guarded.layers[name]
        w = layer.to_dense()
        w = w.T if layer.transposed else w  # (out, in)
        hit = (w @ k.T).norm(dim=0) / (w.norm() * k.norm(dim=1))
        wf = free.layers[name].to_dense()
        wf = wf.T if layer.transposed else wf
        hit_free = (wf @ k.T).norm(dim=0) / (wf.norm() * k.norm(dim=1))
        assert float(hit.max()) < 1e-4, name
        assert float(hit_free.max()) > 1e-2, name


def test_key_basis_is_orthonormal_and_capped(tiny_llama, tiny_tokenizer):
    from mendctl.editors.mend.protect import key_basis
    specs = select_weights(tiny_llama, ["auto"])
    pairs = [(fact_prompt(s), "c1") for s in SUBJECTS_FOR_BASIS]
    basis = key_basis(tiny_llama, tiny_tokenizer, specs, [p for p, _ in pairs], [t for _, t in pairs],
                      energy=1.0, max_fraction=0.25)
    for s in specs:
        q = basis[s.name]
        assert q.shape[0] == s.in_features and 1 <= q.shape[1] <= int(0.25 * s.in_features)
        assert torch.allclose(q.T @ q, torch.eye(q.shape[1]), atol=1e-4)
    assert key_basis(tiny_llama, tiny_tokenizer, specs, [], []) == {}


SUBJECTS_FOR_BASIS = [f"s{i}" for i in range(12)]


def test_preserved_keys_are_the_leading_eigenvectors_and_edits_stay_off_them(tiny_llama, tiny_tokenizer):
    """preserved_basis: orthonormal, the leading eigenvectors of the texts' key second moment
    down to the cut (a smaller cut keeps more), capped; an edit with `preserve` has ΔW Q = 0
    for every preserved direction Q (alone and united with the retention guard's keys)."""
    from mendctl.editors.mend.protect import key_inputs, preserved_basis, union
    from mendctl.editors.text import encode_prompts
    specs = select_weights(tiny_llama, ["auto"])
    texts = [fact_prompt(s) for s in SUBJECTS_FOR_BASIS]
    wide = preserved_basis(tiny_llama, tiny_tokenizer, specs, texts, cut=1e-3, chunk=5)
    narrow = preserved_basis(tiny_llama, tiny_tokenizer, specs, texts, cut=1e-1)
    keys = key_inputs(tiny_llama, specs, encode_prompts(tiny_tokenizer, texts))
    for s in specs:
        q = wide[s.name]
        assert 1 <= narrow[s.name].shape[1] <= q.shape[1] <= int(0.5 * s.in_features)
        assert torch.allclose(q.T @ q, torch.eye(q.shape[1]), atol=1e-4)
        x = torch.cat(keys[s.name]).double()
        ev, vec = torch.linalg.eigh(x.T @ x)
        top = vec[:, -1].float()  # the leading eigenvector lies in the basis
        assert float((q.T @ top).norm()) > 0.999
        both = union(q, narrow[s.name])
        assert both.shape[1] == q.shape[1]  # narrow ⊂ wide: nothing new
    editor = MendEditor(specs, MendConfig(rank=4, norm=False, init_alpha=1e-2))
    first = (fact_prompt("s3"), "c7")
    d = editor.edit(tiny_llama, tiny_tokenizer, [fact_prompt("s5")], ["c2"], preserve=narrow,
                    protect=[first])
    assert "protected_rank" in d.meta
    for s in specs:
        layer = d.layers[s.name]
        w = layer.to_dense()
        w = w.T if layer.transposed else w  # (out, in)
        assert float((w @ narrow[s.name]).norm()) < 1e-5 * float(w.norm()), s.name


def test_locality_scores_do_not_depend_on_the_chunk(tiny_model, tiny_tokenizer):
    """Scoring a few prompts at a time (so a chain of 1,000's locality set fits in memory)
    gives each prompt what one forward over all of them gives."""
    model, tok = tiny_model, tiny_tokenizer
    loc = LOCALITY_PROMPTS[:5]
    whole = locality_reference(model, tok, loc, n_new=3, chunk=len(loc))
    parts = locality_reference(model, tok, loc, n_new=3, chunk=2)
    assert torch.equal(whole.positions, parts.positions) and torch.equal(whole.owner, parts.owner)
    # fp32 log-probs of order 10 over differently shaped matmuls: a few ulps of that scale
    assert torch.allclose(whole.base_logp, parts.base_logp, rtol=0, atol=1e-4)
    specs = select_weights(model, "auto")
    delta = FTEditor(specs, steps=5, lr=5e-3).edit(model, tok, ["the capital of s3 is"], ["c7"])
    with applied(model, delta):
        ag1, kl1 = locality_scores(model, whole, chunk=len(loc))
        ag2, kl2 = locality_scores(model, whole, chunk=1)
        top = top1_agreement(model, whole, chunk=3)
        with torch.no_grad():
            logits = selected_logits(model, whole.batch, whole.positions)
    # agreement is an argmax: equal across chunkings wherever the top two logits are further
    # apart than the rounding, which holds at every counted position here
    margin = logits.topk(2, -1).values
    assert float((margin[:, 0] - margin[:, 1]).min()) > 1e-3
    assert len(ag1) == len(loc) and ag1 == ag2 == top
    assert max(kl1) > 0
    assert all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(kl1, kl2)), (kl1, kl2)
