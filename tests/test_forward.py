"""The exact shortcuts of editors/forward.py, and the trainer's fast path, against naive full
forward passes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

from conftest import LOCALITY_PROMPTS, fact_paraphrase, fact_prompt
from mendctl.editors.data import EditCase
from mendctl.editors.forward import PrefixCache, Projection, projecting, selected_logits, supported
from mendctl.editors.mend.capture import capture_edit_gradients
from mendctl.editors.mend.editor import MendConfig, MendEditor
from mendctl.editors.mend.trainer import TrainConfig, Trainer
from mendctl.editors.text import Batch, encode_pairs, encode_prompts, token_nll
from mendctl.editors.weights import select_weights

EPS32 = torch.finfo(torch.float32).eps  # float32 rounding: 1.19e-7 relative


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """The same logits or hidden states by another route (a skipped prefix, selected positions,
    replaced weights): the same float32 products summed in another order or on other tensor
    shapes, so each entry is off by a few eps32 × the size of the values summed, about the
    tensor's largest entry, whatever the CPU or BLAS (measured: identical on one CPU; 64 eps32
    × max |want| allowed, plus 1e-4 of each entry). A wrong mask, position or weight is off by O(1)."""
    bound = 1e-4 * want.abs() + 64 * EPS32 * float(want.abs().max())
    bad = (got - want).abs() > bound
    assert got.shape == want.shape and not bool(bad.any()), \
        (float((got - want).abs().max()), float(want.abs().max()), int(bad.sum()))


PROMPTS = ["the capital of s3 is", "water is cold and snow is", "what", "tell me about the city of"]
TARGETS = ["c7", "blue", "is the big tree", "london"]


def _batch(tok) -> Batch:
    return encode_pairs(tok, PROMPTS, TARGETS)


def _full_logits(model, batch, weights=None):
    kw = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if weights:
        return functional_call(model, weights, args=(), kwargs=kw).logits
    return model(**kw).logits


def _perturbed(model, specs, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {s.name: model.get_parameter(s.name).detach()
            + scale * torch.randn(s.shape, generator=g) for s in specs}


# -- selected_logits -------------------------------------------------------------------------------

@torch.no_grad()
def test_selected_logits_equals_full_logits(tiny_model, tiny_tokenizer):
    assert supported(tiny_model)
    batch = _batch(tiny_tokenizer)
    g = torch.Generator().manual_seed(1)
    select = (torch.rand(batch.input_ids.shape, generator=g) < 0.4) & batch.attention_mask.bool()
    select[0, 0] = select[-1, 3] = True
    full = _full_logits(tiny_model, batch)
    got = selected_logits(tiny_model, batch, select)
    assert got.shape == (int(select.sum()), full.shape[-1])
    assert_close(got, full[select])

    # with some weights replaced functionally (the model itself is untouched)
    specs = select_weights(tiny_model, "auto")
    w = _perturbed(tiny_model, specs)
    before = {n: p.clone() for n, p in tiny_model.named_parameters()}
    got_w = selected_logits(tiny_model, batch, select, w)
    edited = copy.deepcopy(tiny_model)
    for n, t in w.items():
        edited.get_parameter(n).copy_(t)
    want_w = _full_logits(edited, batch)[select]
    assert_close(got_w, want_w)
    assert_close(got_w, _full_logits(tiny_model, batch, w)[select])
    assert not torch.allclose(got_w, got, atol=1e-3)  # the replacement did change something
    for n, p in tiny_model.named_parameters():
        assert torch.equal(p, before[n])


# -- PrefixCache -----------------------------------------------------------------------------------

@torch.no_grad()
def test_prefix_cache_skipping_equals_full_forward(tiny_model, tiny_tokenizer):
    specs = select_weights(tiny_model, "auto")  # blocks 1..3: block 0 is skipped
    pc = PrefixCache(tiny_model, specs)
    assert pc.enabled and pc.start == 1
    batch = _batch(tiny_tokenizer)
    mask = batch.attention_mask.bool()
    hidden, as_tuple = pc.hidden(batch)
    full = _full_logits(tiny_model, batch)
    blocks_before = list(pc.blocks)
    with pc.skipping(hidden, as_tuple):
        assert pc.blocks[0] is not blocks_before[0]
        skipped = _full_logits(tiny_model, batch)
        sel = selected_logits(tiny_model, batch, mask)
    assert list(pc.blocks) == blocks_before  # the real blocks are back
    assert_close(skipped[mask], full[mask])
    assert_close(sel, full[mask])

    # the stub really replaces the lower block: a wrong hidden state gives other logits
    with pc.skipping(torch.zeros_like(hidden), as_tuple):
        wrong = _full_logits(tiny_model, batch)
    assert not torch.allclose(wrong[mask], full[mask], atol=1e-3)

    # with edited weights above the cache, still equal to the full edited forward
    w = _perturbed(tiny_model, specs)
    with pc.skipping(hidden, as_tuple):
        sel_w = selected_logits(tiny_model, batch, mask, w)
    assert_close(sel_w, _full_logits(tiny_model, batch, w)[mask])


def test_prefix_cache_disabled_when_first_block_is_edited(tiny_llama):
    specs = select_weights(tiny_llama, "re:model\\.layers\\.[0-3]\\.mlp\\.down_proj\\.weight")
    assert not PrefixCache(tiny_llama, specs).enabled


@torch.no_grad()
def test_prefix_cache_memo_matches_fresh_computation(tiny_model, tiny_tokenizer):
    specs = select_weights(tiny_model, "re:.*\\.[23]\\.mlp\\..*weight")
    fresh = PrefixCache(tiny_model, specs)
    memo = PrefixCache(tiny_model, specs)
    memo.enable_memo()
    assert memo.start == 2
    a = encode_prompts(tiny_tokenizer, PROMPTS[:3])
    h_a, _ = memo.hidden(a)
    assert len(memo.memo) == 3
    # the same sequences in another order, padded to another width, plus a new one
    b = encode_prompts(tiny_tokenizer, ["the color of the sky is blue near the river", PROMPTS[2],
                                        PROMPTS[0], PROMPTS[2]])
    assert b.input_ids.shape[1] != a.input_ids.shape[1]
    h_b, as_tuple = memo.hidden(b)
    assert len(memo.memo) == 4
    want, want_tuple = fresh.hidden(b)
    assert as_tuple == want_tuple
    mask = b.attention_mask.bool()
    assert_close(h_b[mask], want[mask])
    assert torch.all(h_b[~mask] == 0)
    # rows read back from the memo equal the first (differently padded) computation
    torch.testing.assert_close(h_b[2, : int(mask[2].sum())], h_a[0, : int(mask[2].sum())],
                               rtol=0, atol=0)
    # and logits through the memoised hidden state equal the full forward
    full = _full_logits(tiny_model, b)
    with memo.skipping(h_b, as_tuple):
        got = selected_logits(tiny_model, b, mask)
    assert_close(got, full[mask])


# -- the trainer's fast path vs a naive reference ----------------------------------------------------

def _cases(n=3):
    # one paraphrase and one locality prompt each, so the trainer's random choices are forced
    return [EditCase(fact_prompt(f"s{i}"), f"c{i % 5}", paraphrases=[fact_paraphrase(f"s{i}")],
                     locality=[LOCALITY_PROMPTS[i % len(LOCALITY_PROMPTS)]]) for i in range(n)]


def _nontrivial_editor(specs, seed=0):
    torch.manual_seed(seed)
    ed = MendEditor(specs, MendConfig(rank=4, init_alpha=0.05))
    with torch.no_grad():
        for net in ed.nets.values():
            net.U1.normal_(0, 0.3)
            net.U2.normal_(0, 0.3)
            net.b1.normal_(0, 0.1)
            net.o2.normal_(0, 0.1)
        ed.alpha.copy_(torch.linspace(0.02, 0.1, len(specs)))
    return ed


def _naive_losses(editor, model, tok, cases, cfg, base_model=None):
    """L = c_e · L_e + c_loc · L_loc with full forward passes and no shortcuts: each group of
    cfg.edit_batch cases (all of them with 0) is captured and edited on its own. The locality
    continuations are the greedy ones of `base_model` (default: `model`)."""
    group = cfg.edit_batch or len(cases)
    nll, per_seq = [], []
    for g in range(0, len(cases), group):
        part = cases[g: g + group]
        a, b = _naive_group(editor, model, tok, part, cfg, base_model or model)
        nll.append(a)
        per_seq += b
    l_edit = torch.cat(nll).mean()
    l_loc = torch.stack(per_seq).mean()
    return cfg.c_edit * l_edit + cfg.c_loc * l_loc, l_edit, l_loc


def _naive_group(editor, model, tok, cases, cfg, base_model):
    prompts, targets = [c.input for c in cases], [c.target for c in cases]
    edit = encode_pairs(tok, prompts, targets)
    pairs, _ = capture_edit_gradients(model, editor.specs, edit)  # no prefix cache
    factors = editor.factors(pairs)
    w_new = {}
    for s in editor.specs:
        pu, pd, a = factors[s.name]
        dw = -a * torch.einsum("ni,no->oi", pu, pd)  # (out, in)
        w_new[s.name] = model.get_parameter(s.name).detach() + (dw.T if s.transposed else dw)
    eq = encode_pairs(tok, prompts + [c.paraphrases[0] for c in cases], targets + targets)
    nll = token_nll(_full_logits(model, eq, w_new), eq.labels)
    # locality where it is measured: each prompt extended by the base model's greedy
    # continuation (one unpadded sequence at a time), KL at the prompt's last position and
    # the continuation, averaged per sequence, then over sequences
    per_seq = []
    for c in cases:
        ids = tok(c.locality[0]).input_ids
        x = torch.tensor([ids])
        with torch.no_grad():
            for _ in range(cfg.loc_new_tokens):
                x = torch.cat([x, base_model(input_ids=x).logits[0, -1].argmax().view(1, 1)], dim=1)
        one = Batch(x, torch.ones_like(x), torch.full_like(x, -100))
        pos = slice(len(ids) - 1, x.shape[1] - 1)
        with torch.no_grad():
            lp_base = torch.log_softmax(_full_logits(model, one)[0, pos].float(), -1)
        lp_new = torch.log_softmax(_full_logits(model, one, w_new)[0, pos].float(), -1)
        kl = torch.nn.functional.kl_div(lp_new, lp_base, log_target=True, reduction="none").sum(-1)
        per_seq.append(kl.mean())
    return nll, per_seq


def _grads(editor, loss):
    editor.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in editor.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("edit_batch", [1, 2, 0])
def test_trainer_fast_path_equals_naive_reference(tiny_model, tiny_tokenizer, edit_batch):
    # single edits (the default), groups of two, and the whole step as one batched edit
    specs = select_weights(tiny_model, "auto")
    editor = _nontrivial_editor(specs)
    n = 3 if edit_batch != 2 else 4
    cfg = TrainConfig(steps=1, edits_per_step=n, c_edit=0.1, c_loc=1.0, norm_warmup=2,
                      loc_per_edit=1, edit_batch=edit_batch)
    trainer = Trainer(editor, tiny_model, tiny_tokenizer, _cases(6), [], cfg, progress=False)
    assert trainer.prefix.enabled  # the fast path is what is under test
    trainer.bf16 = False  # its exact savings: float32 (bf16 mixed precision: bench/train_speed.py)
    trainer.warm_up_normaliser()  # non-trivial normalisation statistics
    editor.eval()  # freeze them, so both computations see the same normaliser
    cases = _cases(n)

    loss, stats = trainer.losses(cases)
    g_fast = _grads(editor, loss)
    ref, l_edit, l_loc = _naive_losses(editor, tiny_model, tiny_tokenizer, cases, cfg)
    g_ref = _grads(editor, ref)

    assert l_edit.item() > 0.1 and l_loc.item() > 1e-4  # both terms matter
    assert stats["l_edit"] == pytest.approx(l_edit.item(), rel=1e-4)
    assert stats["l_loc"] == pytest.approx(l_loc.item(), rel=1e-3, abs=1e-7)
    assert stats["loss"] == pytest.approx(ref.item(), rel=1e-4)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-7)
    assert set(g_fast) == set(g_ref) and "alpha" in g_fast
    for n in g_ref:
        # other float32 sums through the whole editor and model: off relative to each gradient's
        # largest entry (measured ≤ 1e-5 of it; 1e-4 allowed, plus 2e-3 of each entry)
        bound = 2e-3 * g_ref[n].abs() + 1e-4 * float(g_ref[n].abs().max())
        assert bool(((g_fast[n] - g_ref[n]).abs() <= bound).all()), \
            (n, float((g_fast[n] - g_ref[n]).abs().max()), float(g_ref[n].abs().max()))


def test_chain_training_edits_the_chain_state(tiny_model, tiny_tokenizer):
    """With a chain in progress, the step's edit is captured at the chain's weights and its
    locality is the KL to them: the same loss and gradients as the naive computation on a
    model whose weights are that state (continuations still the base model's)."""
    specs = select_weights(tiny_model, "auto")
    editor = _nontrivial_editor(specs)
    cfg = TrainConfig(steps=1, edits_per_step=3, c_edit=0.1, c_loc=1.0, norm_warmup=2,
                      loc_per_edit=1, chain_length=4)
    trainer = Trainer(editor, tiny_model, tiny_tokenizer, _cases(6), [], cfg, progress=False)
    trainer.bf16 = False  # float32, as the reference
    trainer.warm_up_normaliser()
    editor.eval()
    gen = torch.Generator().manual_seed(1)
    state = {s.name: trainer.base[s.name] + 0.05 * torch.randn(trainer.base[s.name].shape, generator=gen)
             for s in specs}
    trainer._chain_w = state  # no chain facts yet: no retention rows
    cases = _cases(3)
    loss, stats = trainer.losses(cases)
    g_fast = _grads(editor, loss)

    moved = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for n, w in state.items():
            moved.get_parameter(n).copy_(w)
    ref, l_edit, l_loc = _naive_losses(editor, moved, tiny_tokenizer, cases, cfg, base_model=tiny_model)
    assert stats["l_edit"] == pytest.approx(l_edit.item(), rel=1e-4)
    assert stats["l_loc"] == pytest.approx(l_loc.item(), rel=1e-3, abs=1e-7)
    g_ref = _grads(editor, ref)
    assert set(g_fast) == set(g_ref)
    for n in g_ref:
        # float rounding (the weights are further from the ones the model was made with):
        # measured ≤ 2e-4 of each gradient's largest entry
        err = float((g_fast[n] - g_ref[n]).abs().max() / g_ref[n].abs().max())
        assert err < 2e-3, (n, err)

    # the chain goes on with the first edit alone, made at the chain's state
    delta = editor.edit(moved, tiny_tokenizer, [cases[0].input], [cases[0].target])
    eps = torch.finfo(torch.float32).eps
    for name, ld in delta.layers.items():
        want = ld.to_dense()
        got = trainer._chain_next[name] - state[name]
        # Tolerance from the arithmetic, per element: `(state + Δ') − state` is rounded twice
        # in float32 (the sum, then the difference), each off by up to eps32 × the operands'
        # magnitude (|state| + |Δ|, here up to ~10), whatever the CPU or BLAS; and Δ' (the
        # trainer's, made in its batch) is Δ (this edit alone) summed in another order, off by
        # a few eps32 of the largest entry of Δ (measured ≤ 5e-7 ≈ 4 eps32 of max |Δ|; 64
        # eps32 allowed). A wrong chain state or a lost step is off by O(max |Δ|).
        bound = 4 * eps * (state[name].abs() + want.abs()) + 64 * eps * want.abs().max()
        excess = float(((got - want).abs() - bound).max())
        assert excess <= 0, (name, float((got - want).abs().max()), float(want.abs().max()))


def test_chain_training_grows_scores_earlier_facts_and_restarts(tiny_model, tiny_tokenizer):
    specs = select_weights(tiny_model, "auto")
    editor = _nontrivial_editor(specs)
    cfg = TrainConfig(steps=1, edits_per_step=2, norm_warmup=2, loc_per_edit=1, chain_length=3)
    trainer = Trainer(editor, tiny_model, tiny_tokenizer, _cases(6), [], cfg, progress=False)
    trainer.warm_up_normaliser()
    cases = _cases(2)
    _, first = trainer.losses(cases)
    trainer._advance_chain(cases[0])  # chain: base + edit of case 0
    assert trainer._chain_facts == [(cases[0].input, cases[0].target)]
    assert trainer._chain_w is trainer._chain_next
    assert any(not torch.equal(trainer._chain_w[s.name], trainer.base[s.name]) for s in specs)
    _, second = trainer.losses(cases)
    # each edit is also scored on the chain's earlier fact: one more locality row per edit
    assert second["loc_n"] > first["loc_n"]
    trainer._advance_chain(cases[1])  # chain_length 3: two earlier edits, then a new chain
    assert trainer._chain_w is None and trainer._chain_facts == []


def test_bf16_projection_is_float32_up_to_bf16_rounding(tiny_model, tiny_tokenizer):
    """Training's output projection in bf16 (`Projection`, where the hardware has it): each
    logit Σ_i x_i w_i is computed from x_i and w_i rounded to bf16 (8 significant bits, unit
    roundoff 2⁻⁸ each, so at most 2⁻⁷ per product, to first order) and summed in float32:
    off from the float32 logit by at most 2⁻⁷ Σ_i |x_i w_i| plus float32 sums (n eps32 of the
    same). The gradient reaching the hidden states is bounded the same way. The model is frozen,
    as in training (its head's weight is then cast once and kept)."""
    tiny_model = copy.deepcopy(tiny_model).requires_grad_(False)
    batch = encode_prompts(tiny_tokenizer, [fact_prompt(0), fact_prompt(1)])
    select = batch.attention_mask.bool()
    head = tiny_model.get_output_embeddings()
    grabbed = {}
    hook = head.register_forward_pre_hook(lambda m, a: grabbed.setdefault("x", a[0].detach()))
    try:
        want = selected_logits(tiny_model, batch, select)
    finally:
        hook.remove()
    x, w = grabbed["x"], head.weight.detach()
    projection = Projection(torch.bfloat16)
    with projecting(projection):
        got = selected_logits(tiny_model, batch, select)
    assert got.dtype == torch.float32 and got.shape == want.shape
    eps = torch.finfo(torch.float32).eps
    scale = x.abs() @ w.abs().T
    bound = (2 ** -7 + 2 * x.shape[-1] * eps) * scale
    assert bool(((got - want).abs() <= bound).all()), float(((got - want).abs() / scale).max())
    assert float((got - want).abs().max()) > 0  # bf16 did run (the bound is not vacuous)
    # the gradient to the hidden states: g Wᵀ from bf16 g and W, within the same bound
    h = x.clone().requires_grad_(True)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(0))
    (projection(head, h) * g).sum().backward()
    ref = g @ w
    gbound = (2 ** -7 + 2 * w.shape[0] * eps) * (g.abs() @ w.abs())
    assert bool(((h.grad - ref).abs() <= gbound).all())
    assert torch.equal(projection(head, x), got)  # (the kept copy: the same logits again)
