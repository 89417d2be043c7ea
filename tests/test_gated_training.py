"""Routed (gated) editor training and the one-pass scoring of several edits
(`forward.low_rank_rows`, `TrainConfig.gated`), on the tiny seeded models."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from conftest import LOCALITY_PROMPTS, fact_paraphrase, fact_prompt
from mendctl.editors.data import EditCase
from mendctl.editors.forward import PrefixCache, low_rank_rows
from mendctl.editors.mend.editor import MendConfig, MendEditor
from mendctl.editors.mend.trainer import TrainConfig, Trainer, edited_weights
from mendctl.editors.text import encode_pairs
from mendctl.editors.weights import select_weights

EPS32 = torch.finfo(torch.float32).eps


def _factors(specs, n_tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {s.name: (torch.randn(n_tokens, s.in_features, generator=g),
                     torch.randn(n_tokens, s.out_features, generator=g),
                     torch.tensor(0.05)) for s in specs}


def _logits(model, batch, weights=None):
    kw = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if weights:
        return functional_call(model, weights, args=(), kwargs=kw).logits
    return model(**kw).logits


def test_low_rank_rows_equals_each_rows_own_edited_weights(tiny_model, tiny_tokenizer):
    """Rows of edits 0 and 1 and an unedited row (-1) in one pass give what each row gives on
    its own edit's dense weights; a mask that closes a row's first positions leaves those
    positions at the base model's logits (causal: nothing before the gate sees the edit)."""
    specs = select_weights(tiny_model, "auto")
    token_edit = torch.tensor([0, 0, 0, 1, 1])
    factors = _factors(specs, len(token_edit))
    base = {s.name: tiny_model.get_parameter(s.name).detach() for s in specs}
    batch = encode_pairs(tiny_tokenizer, [fact_prompt("s1"), fact_prompt("s2"), fact_prompt("s3"),
                                          fact_prompt("s4")], ["c1", "c2", "c3", "c4"])
    row_edit = torch.tensor([0, 1, -1, 0])
    width = batch.input_ids.shape[1]
    mask = torch.ones(4, width)
    mask[3, :3] = 0  # row 3's gate opens at its fourth token
    with torch.no_grad(), low_rank_rows(tiny_model, specs, factors, token_edit, row_edit, mask):
        got = _logits(tiny_model, batch)
    with torch.no_grad():
        ref = {e: _logits(tiny_model, batch, edited_weights(specs, base, factors, token_edit == e))
               for e in (0, 1)}
        plain = _logits(tiny_model, batch)
    want = torch.stack([ref[0][0], ref[1][1], plain[2]])
    # float32 sums in another order (the low-rank term added to W x instead of folded into W):
    # off by a few eps32 of the logits' magnitude through 4 blocks; 1e3 eps32 allowed
    tol = 1e3 * EPS32 * float(plain.abs().max())
    assert float((got[:3] - want).abs().max()) <= tol
    # row 3: before its gate the base model's logits; from it on the edit acts (on states
    # whose earlier positions were not edited, so not the fully edited row's logits either)
    assert float((got[3, :3] - plain[3, :3]).abs().max()) <= tol
    assert float((got[3, 3:] - plain[3, 3:]).abs().max()) > 100 * tol
    # the edits do change the rows they act on: the checks above are not vacuous
    assert float((ref[0][0] - plain[0]).abs().max()) > 100 * tol


def _subject_cases(n=4):
    cases = []
    for i in range(n):
        s = f"s{i}"
        cases.append(EditCase(
            fact_prompt(s), f"c{i % 5}", paraphrases=[fact_paraphrase(s)],
            # one prompt that names the subject, one that does not
            locality=[f"{s} lives near the river", LOCALITY_PROMPTS[i % len(LOCALITY_PROMPTS)]],
            meta={"subject": s}))
    return cases


def test_gated_training_routes_on_the_subject(tiny_llama, tiny_tokenizer):
    specs = select_weights(tiny_llama, "auto")
    editor = MendEditor(specs, MendConfig(rank=4, init_alpha=0.05))
    cfg = TrainConfig(steps=1, edits_per_step=2, norm_warmup=2, loc_per_edit=2, gated=True,
                      val_cases=4)
    generic = ["the sky is blue and the grass is green near the river"]
    trainer = Trainer(editor, tiny_llama, tiny_tokenizer, _subject_cases(), _subject_cases(),
                      cfg, progress=False, generic_texts=generic, generic_loc=0.5)
    case = trainer.train_cases[0]
    # "the capital of s0 is": the gate opens on the subject's token, the fourth
    assert trainer._gate_start(case.input, "s0") == 3
    assert trainer._gate_start(LOCALITY_PROMPTS[0], "s0") >= 1 << 30  # never opens
    assert trainer._loc_pool(case) == ["s0 lives near the river"]
    # a case without a subject is a weight edit: every locality prompt, gate open everywhere
    plain = EditCase(fact_prompt("s5"), "c1", locality=list(LOCALITY_PROMPTS[:2]))
    assert trainer._loc_pool(plain) == LOCALITY_PROMPTS[:2]
    assert trainer._gate_start(plain.input, trainer._subject(plain)) == 0
    for _ in range(4):  # every locality input names the subject: a prompt or a passage after it
        drawn = trainer._loc_prompts(case)
        assert drawn and all("s0" in text for _, text in drawn)
        assert all(text == "s0: " + generic[0] for g, text in drawn if g)

    trainer.prepare_locality()
    trainer.warm_up_normaliser()
    trainer.prepare_prefixes()
    assert trainer.prefix.enabled and trainer.prefix.memo  # the passages are remembered too
    loss, stats = trainer.losses(trainer.train_cases[:2])
    assert torch.isfinite(loss) and stats["loc_n"] > 0
    loss.backward()
    assert editor.alpha.grad is not None and float(editor.alpha.grad.abs().sum()) > 0
    v = trainer.validate()
    for k in ("edit_success", "paraphrase_success", "locality"):
        assert 0.0 <= v[k] <= 1.0


def test_gated_locality_term_is_zero_where_the_gate_never_opens(tiny_llama, tiny_tokenizer):
    """A locality prompt that does not name the subject sees no routed edit: with it as the
    only locality input the KL is zero (up to the float rounding of another batch shape)."""
    specs = select_weights(tiny_llama, "auto")
    editor = MendEditor(specs, MendConfig(rank=4, init_alpha=0.5))
    cfg = TrainConfig(steps=1, edits_per_step=1, norm_warmup=1, loc_per_edit=1, gated=True)
    case = EditCase(fact_prompt("s0"), "c1", paraphrases=[fact_paraphrase("s0")],
                    locality=[LOCALITY_PROMPTS[0]], meta={"subject": "s0"})
    trainer = Trainer(editor, tiny_llama, tiny_tokenizer, [case], [], cfg, progress=False)
    trainer._loc_pool = lambda c: list(c.locality)  # force the prompt that never opens the gate
    trainer.warm_up_normaliser()
    _, stats = trainer.losses([case])
    assert stats["loc_n"] > 0 and stats["loc"] == 1.0
    assert abs(stats["l_loc"]) <= 1e-5
    trainer.cfg.gated = False  # the same edit as a weight edit does move that prompt
    _, plain = trainer.losses([case])
    assert plain["l_loc"] > 1e-4


def test_gated_training_refuses_chains(tiny_llama, tiny_tokenizer):
    specs = select_weights(tiny_llama, "auto")
    with pytest.raises(ValueError, match="chain_length"):
        Trainer(MendEditor(specs), tiny_llama, tiny_tokenizer, _subject_cases(), [],
                TrainConfig(gated=True, chain_length=4), progress=False)


def test_remember_needs_a_fixed_model(tiny_llama):
    cache = PrefixCache(tiny_llama, select_weights(tiny_llama, "auto"))
    with pytest.raises(RuntimeError, match="enable_memo"):
        cache.remember([[3, 4, 5]], pad=0)
    cache.enable_memo()
    assert cache.remember([[3, 4, 5], [3, 4, 5], [6, 7]], pad=0) == 2
    assert cache.remember([[3, 4, 5]], pad=0) == 0  # already known


def test_locality_reference_rows_is_the_reference_of_those_prompts(tiny_llama, tiny_tokenizer):
    """`LocalityRef.rows` (the routed health check re-scores only some audit prompts): the
    subset's agreement is the full reference's for those prompts, computed on the same rows."""
    from mendctl.editors.metrics import locality_reference, top1_agreement

    prompts = [fact_prompt(f"s{i}") for i in range(5)] + list(LOCALITY_PROMPTS[:3])
    ref = locality_reference(tiny_llama, tiny_tokenizer, prompts)
    sub = ref.rows([1, 4, 6])
    assert sub.batch.input_ids.shape[0] == 3 and sorted(set(sub.owner.tolist())) == [0, 1, 2]
    assert torch.equal(sub.base_top1, ref.base_top1[torch.isin(ref.owner, torch.tensor([1, 4, 6]))])
    # the base model agrees with itself everywhere, and the subset has its own positions
    assert top1_agreement(tiny_llama, sub) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        ref.rows([4, 1])
