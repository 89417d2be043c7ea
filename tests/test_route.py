"""Routed edits (mendctl/editors/route.py) on tiny random models: a closed gate leaves the model
exactly as it is, an open gate adds exactly the delta, gates open on the edit's subject and
stay closed elsewhere, and leaving the block restores the model."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import SUBJECTS, fact_paraphrase, fact_prompt
from mendctl.editors.mend.editor import MendConfig, MendEditor
from mendctl.editors.metrics import edit_success, target_scores
from mendctl.editors.route import (Gate, GateSpace, RoutedEdit, edit_gate, gate_keys, gate_space, gates, open_at_end, opens,
                                   routed, word_gates)
from mendctl.editors import route
from mendctl.editors.text import encode_pairs, encode_prompts
from mendctl.editors.weights import applied, select_weights

LAST_MLP_OUT = {"llama": "model.layers.3.mlp.down_proj.weight", "gpt2": "transformer.h.3.mlp.c_proj.weight"}
BANK = [fact_prompt(s) for s in SUBJECTS[8:]] + [fact_paraphrase(s) for s in SUBJECTS[8:]]

EPS32 = torch.finfo(torch.float32).eps  # float32 rounding: 1.19e-7 relative


def _logits(model, tok, prompts):
    b = encode_prompts(tok, prompts)
    with torch.no_grad():
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.attention_mask


def _edit(model, tok, weights, prompt="the capital of s3 is", target="c7"):
    specs = select_weights(model, weights)
    editor = MendEditor(specs, MendConfig(rank=4, norm=False, init_alpha=1.0))
    return editor.edit(model, tok, [prompt], [target], max_steps=1)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_open_gate_adds_the_delta_and_closed_gate_changes_nothing(make_model, tiny_tokenizer, kind):
    """With only the last block's MLP output edited, position t's logits depend on that layer
    at t alone: a gate open everywhere but the first token gives the weight-applied logits
    there (and the base's at the first token), a gate that never opens gives the base's
    bit for bit."""
    model = make_model(kind)
    delta = _edit(model, tiny_tokenizer, [LAST_MLP_OUT[kind]])
    space = gate_space(model, tiny_tokenizer, BANK, layer=1)
    edit = RoutedEdit(delta, Gate(gate_keys(model, tiny_tokenizer, space, "the capital of s3 is")))
    prompts = ["the capital of s3 is", "water is cold and snow is"]
    base, mask = _logits(model, tiny_tokenizer, prompts)
    with applied(model, delta):
        weights, _ = _logits(model, tiny_tokenizer, prompts)
    with routed(model, [edit], space, tau=-2.0):  # every cosine is > -2: open from token 1 on
        opened, _ = _logits(model, tiny_tokenizer, prompts)
    with routed(model, [edit], space, tau=2.0):  # no cosine is > 2: never open
        closed, _ = _logits(model, tiny_tokenizer, prompts)
    real = mask.bool()
    real[:, 0] = False
    # the delta does something: more than 1e-4 of the logits' size
    assert float((base[real] - weights[real]).abs().max()) > 1e-4 * float(weights[real].abs().max())
    # the open gate adds Δ·x beside W·x where `applied` computes (W + Δ)·x: other float32 sums,
    # a few eps32 × the logits' size (measured 2 eps32 × max |logit|; 256 allowed, ~1e-4 here;
    # a missing or wrong delta is off by more than 1e-4 × max |logit| (checked above)
    err, scale = float((opened[real] - weights[real]).abs().max()), float(weights[real].abs().max())
    assert err <= 256 * EPS32 * scale, (err, scale)
    torch.testing.assert_close(opened[:, 0], base[:, 0])
    assert torch.equal(closed, base)
    after, _ = _logits(model, tiny_tokenizer, prompts)
    assert torch.equal(after, base)  # no hook survives the block


def test_gate_opens_on_the_subject_and_stays_open(tiny_llama, tiny_tokenizer):
    """Gate keys are the edit prompt's tokens unlike the bank (here: the subject, which no bank
    prompt has); the gate opens where the subject appears, in other wording too, and stays open
    for every later token; prompts about other subjects leave it closed. (A sequence's first
    token never opens a gate: see route.hidden_at.)"""
    space = gate_space(tiny_llama, tiny_tokenizer, BANK, layer=1)
    keys = gate_keys(tiny_llama, tiny_tokenizer, space, fact_prompt("s3"), distinct=0.8)
    assert 1 <= len(keys) < 4  # not the template's words: those are all in the bank
    from mendctl.editors.route import hidden_at
    prompts = [fact_prompt("s3"), "what is the capital of s3", fact_prompt("s5"),
               "water is cold and snow is"]
    states = hidden_at(tiny_llama, tiny_tokenizer, prompts, 1)
    for p, h in zip(prompts, states):
        # hidden_at drops the first token; put a dummy one back so positions line up
        full = torch.cat([torch.zeros(1, h.shape[1]), h])[None]
        g = gates(space, full, [keys], tau=0.6)[0, :, 0]  # a random model mixes context more than a trained one
        words = p.split()
        if "s3" in words:
            first = words.index("s3")  # the word-level tokenizer: token i is word i
            assert not g[:first].any() and g[first:].all(), p
        else:
            assert not g.any(), p


def test_routed_edit_lands_and_leaves_other_prompts_exactly_alone(tiny_llama, tiny_tokenizer):
    """An edit of all three auto weights, routed: its target rises on its own prompt, and a
    prompt about another subject gets the base model's logits exactly."""
    delta = _edit(tiny_llama, tiny_tokenizer, ["auto"])
    space = gate_space(tiny_llama, tiny_tokenizer, BANK, layer=1)
    edit = RoutedEdit(delta, edit_gate(tiny_llama, tiny_tokenizer, space, fact_prompt("s3")))
    other = [fact_prompt("s5"), "the river near rome is"]
    base_other, _ = _logits(tiny_llama, tiny_tokenizer, other)
    before = target_scores(tiny_llama, tiny_tokenizer, [fact_prompt("s3")], ["c7"])[1][0]
    with routed(tiny_llama, [edit], space, tokenizer=tiny_tokenizer):
        after = target_scores(tiny_llama, tiny_tokenizer, [fact_prompt("s3")], ["c7"])[1][0]
        routed_other, _ = _logits(tiny_llama, tiny_tokenizer, other)
    assert after > before
    assert torch.equal(routed_other, base_other)


def test_edits_at_or_before_the_gate_layer_are_refused(tiny_llama, tiny_tokenizer):
    """The gate reads hidden state 2 (after blocks 0 and 1): an edit of block 1 would move it."""
    delta = _edit(tiny_llama, tiny_tokenizer, ["model.layers.1.mlp.down_proj.weight"])
    space = gate_space(tiny_llama, tiny_tokenizer, BANK, layer=2)
    with pytest.raises(ValueError, match="after the gate"):
        with routed(tiny_llama, [RoutedEdit(delta, Gate(torch.ones(1, 32) / 32 ** .5))], space):
            pass


def test_dense_deltas_are_refused(tiny_llama, tiny_tokenizer):
    from mendctl.editors.delta import Delta, LayerDelta
    space = gate_space(tiny_llama, tiny_tokenizer, BANK, layer=1)
    name = "model.layers.3.mlp.down_proj.weight"
    w = tiny_llama.get_parameter(name)
    dense = Delta({name: LayerDelta(name, tuple(w.shape), dense=torch.zeros_like(w))}, {})
    with pytest.raises(ValueError, match="low-rank"):
        with routed(tiny_llama, [RoutedEdit(dense, Gate(torch.ones(1, w.shape[1]) / w.shape[1] ** .5))], space):
            pass


def test_edit_takes_its_steps_in_the_given_context(tiny_llama, tiny_tokenizer):
    """MendEditor.edit(apply=...): every step after the first is computed inside apply(steps so
    far), which is how a routed edit keeps stepping until it holds behind its own gate."""
    from contextlib import contextmanager

    from mendctl.editors.mend.editor import MendConfig, MendEditor
    specs = select_weights(tiny_llama, ["auto"])
    editor = MendEditor(specs, MendConfig(rank=4, norm=False, init_alpha=1e-3))  # too small to land
    seen = []

    @contextmanager
    def spy(delta):
        seen.append(sum(layer.rank for layer in delta.layers.values()))
        with applied(tiny_llama, delta):
            yield

    delta = editor.edit(tiny_llama, tiny_tokenizer, [fact_prompt("s3")], ["c7"], max_steps=4, apply=spy)
    assert int(delta.meta["edit_steps"]) == 4 and len(seen) == 3
    assert seen == sorted(seen) and seen[0] > 0  # each call sees the steps stacked so far


def test_gate_words_are_the_distinct_words_and_open_where_they_are_completed(tiny_llama, tiny_tokenizer):
    """The edit's gate words hold its distinctive tokens (the subject, not the template); the
    word gate opens at the token completing the word, wherever it stands (the first token
    too: from the next position on), only as a whole word, and never on other text."""
    space = gate_space(tiny_llama, tiny_tokenizer, BANK, layer=1)
    gate = edit_gate(tiny_llama, tiny_tokenizer, space, fact_prompt("s3"))
    assert gate.words == ("s3",)
    # a prompt that starts with its subject: no bank prompt starts with s4, the word is kept
    assert "s4" in edit_gate(tiny_llama, tiny_tokenizer, space, "s4 has its capital city in").words
    rows = ["s3 has its capital city in", "the capital of s3 is", "the capital of s5 is",
            "the river near rome is"]
    got = [word_gates(tiny_tokenizer, torch.tensor([tiny_tokenizer(r).input_ids]), [gate.words])[0, :, 0].tolist()
           for r in rows]
    assert got[0] == [False] + [True] * 5  # the space after s3 comes with token 1
    assert got[1] == [False, False, False, False, True]  # ... with " is", token 4
    assert not any(got[2]) and not any(got[3])
    assert opens(tiny_llama, tiny_tokenizer, space, gate, rows) == [True, True, False, False]
    # whole words only: the word "s2" is not in "s23"
    ids = torch.tensor([tiny_tokenizer("the capital of s23 is").input_ids])
    assert not word_gates(tiny_tokenizer, ids, [("s2",)]).any()
    assert word_gates(tiny_tokenizer, ids, [("s23",)])[0, -1, 0]
    # all of an edit's words: a name of two words opens only once both have been seen
    both = torch.tensor([tiny_tokenizer("s3 and s5 is").input_ids])
    assert word_gates(tiny_tokenizer, both, [("s3", "s5")])[0, :, 0].tolist() == [False, False, False, True]
    assert not word_gates(tiny_tokenizer, torch.tensor([tiny_tokenizer(rows[1]).input_ids]), [("s3", "s5")]).any()


def test_word_gate_routes_the_edit_to_text_the_states_miss(tiny_llama, tiny_tokenizer):
    """With the state gate shut (τ above any cosine), the word gate alone applies the delta to
    prompts naming the subject, and only to them; without a tokenizer it is off."""
    delta = _edit(tiny_llama, tiny_tokenizer, ["auto"])
    space = gate_space(tiny_llama, tiny_tokenizer, BANK, layer=1)
    edit = RoutedEdit(delta, edit_gate(tiny_llama, tiny_tokenizer, space, fact_prompt("s3")))
    prompts = ["s3 has its capital city in", "the capital of s5 is"]
    base, _ = _logits(tiny_llama, tiny_tokenizer, prompts)
    with routed(tiny_llama, [edit], space, tau=2.0, tokenizer=tiny_tokenizer):
        worded, _ = _logits(tiny_llama, tiny_tokenizer, prompts)
    with routed(tiny_llama, [edit], space, tau=2.0):
        no_words, _ = _logits(tiny_llama, tiny_tokenizer, prompts)
    assert not torch.allclose(worded[0, 1:], base[0, 1:], atol=1e-4)
    assert torch.equal(worded[1], base[1]) and torch.equal(no_words, base)


def test_an_edited_layer_run_without_the_gate_layer_is_refused(tiny_llama, tiny_tokenizer):
    """Gates belong to one forward pass: an edited module called on its own (no gate layer
    ran, as under a prefix cache) raises instead of reusing another pass's gates."""
    delta = _edit(tiny_llama, tiny_tokenizer, ["auto"])
    space = gate_space(tiny_llama, tiny_tokenizer, BANK, layer=1)
    edit = RoutedEdit(delta, edit_gate(tiny_llama, tiny_tokenizer, space, fact_prompt("s3")))
    with routed(tiny_llama, [edit], space, tokenizer=tiny_tokenizer):
        _logits(tiny_llama, tiny_tokenizer, [fact_prompt("s3")])  # a full pass works
        with pytest.raises(RuntimeError, match="full forward"):
            tiny_llama.model.layers[3].mlp(torch.zeros(1, 2, 32))


def test_gates_apply_in_the_editors_own_forward(tiny_llama, tiny_tokenizer):
    """The editor's capture runs the base model without the LM head (forward.selected_logits):
    word gates must count there too, not only in a full call of the causal LM."""
    from mendctl.editors.forward import selected_logits
    from mendctl.editors.text import encode_pairs
    delta = _edit(tiny_llama, tiny_tokenizer, ["auto"])
    space = gate_space(tiny_llama, tiny_tokenizer, BANK, layer=1)
    edit = RoutedEdit(delta, edit_gate(tiny_llama, tiny_tokenizer, space, fact_prompt("s3")))
    batch = encode_pairs(tiny_tokenizer, ["s3 has its capital city in"], ["c7"])
    select = batch.attention_mask.bool()
    with torch.no_grad():
        base = selected_logits(tiny_llama, batch, select)
        with routed(tiny_llama, [edit], space, tau=2.0, tokenizer=tiny_tokenizer):  # words only
            worded = selected_logits(tiny_llama, batch, select)
            full, _ = _logits(tiny_llama, tiny_tokenizer, ["s3 has its capital city in c7"])
    assert torch.equal(worded[0], base[0])  # the first token never opens a gate
    assert not torch.allclose(worded[1:], base[1:], atol=1e-4)
    # the routed forward of the selected positions against the full one: the same float32
    # products, maybe summed in another order, a few eps32 × max |logit| (measured: identical;
    # 64 eps32 allowed)
    err, scale = float((worded - full[0]).abs().max()), float(full[0].abs().max())
    assert err <= 64 * EPS32 * scale, (err, scale)


def test_open_at_end_is_the_gate_of_every_pair(tiny_llama, tiny_tokenizer):
    """open_at_end(gates, prompts)[i, j] is gate j at prompt i's last token, as the hooks see it."""
    space = gate_space(tiny_llama, tiny_tokenizer, BANK, layer=1)
    gs = [edit_gate(tiny_llama, tiny_tokenizer, space, fact_prompt(s)) for s in ("s3", "s5")]
    prompts = [fact_prompt("s3"), "what is the capital of s5", "the river near rome is"]
    got = open_at_end(tiny_llama, tiny_tokenizer, space, gs, prompts, tau=0.6)
    assert got.tolist() == [[True, False], [False, True], [False, False]]
    assert [opens(tiny_llama, tiny_tokenizer, space, g, prompts, tau=0.6) for g in gs] == got.T.tolist()


def test_margin_opens_the_best_matching_subjects_only():
    """With a margin, a token opens the gates scoring within it of the best there: the edit
    of the subject named, not one of a similar-looking name that also passed τ; edits of the
    same subject (equal keys) and a gate word (score 1) open together."""
    dim = 8
    space = GateSpace(1, torch.zeros(dim), torch.ones(dim), torch.empty(0), frozenset(), frozenset())
    a = torch.zeros(1, dim)
    a[0, 0] = 1.0
    near = torch.zeros(1, dim)
    near[0, 0], near[0, 1] = 0.8, 0.6  # cosine 0.8 to `a`
    hidden = torch.zeros(1, 3, dim)
    hidden[0, 0, 2] = 1.0  # the first token never opens a gate
    hidden[0, 1] = a[0]  # names the subject of the first two edits
    hidden[0, 2, 3] = 1.0  # unrelated: the gates stay open (cumulative)
    keys = [a, a.clone(), near]
    plain = gates(space, hidden, keys, tau=0.7)[0]
    assert plain[:, 0].tolist() == plain[:, 1].tolist() == plain[:, 2].tolist() == [False, True, True]
    kept = gates(space, hidden, keys, tau=0.7, margin=0.1)[0]
    assert kept.tolist() == [[False, False, False], [True, True, False], [True, True, False]]
    words = torch.zeros(1, 3, 3, dtype=torch.bool)
    words[0, 2, 2] = True  # the third edit's words appear at the last token: it opens there too
    assert gates(space, hidden, keys, tau=0.7, words=words, margin=0.1)[0, 2].tolist() == [True, True, True]


def test_a_gate_of_every_key_opens_once_each_key_has_been_seen():
    """`Gate.every`: by states, the gate opens at the first token by which every one of its
    keys has been matched (each by some token, in any order), and stays open; a gate of one
    key, or without the rule, opens on the first match; a gate without keys opens by its
    words alone. (The rule is how `all_keys` gates keep a name that shares a first name with
    an edited one shut.)"""
    from mendctl.editors.route import KeyTable

    dim = 8
    space = GateSpace(1, torch.zeros(dim), torch.ones(dim), torch.empty(0), frozenset(), frozenset())
    e = torch.eye(dim)
    hidden = torch.zeros(1, 5, dim)
    hidden[0, 0, 7] = 1.0  # the first token never opens a gate
    hidden[0, 1] = e[1]  # the first name of two-key subjects
    hidden[0, 2] = e[5]  # unrelated
    hidden[0, 3] = e[2]  # the second key
    hidden[0, 4] = e[6]  # unrelated again
    keys = [e[[1, 2]], e[[1, 2]], e[[1, 3]], e[[2]], torch.zeros(0, dim)]
    table = KeyTable.of(keys, [True, False, True, True, True])
    words = torch.zeros(1, 5, 5, dtype=torch.bool)
    words[0, 4:, 4] = True  # the keyless gate's words, at the last token
    got = gates(space, hidden, table, tau=0.7, words=words)[0]
    assert got[:, 0].tolist() == [False, False, False, True, True]  # both keys seen by token 3
    assert got[:, 1].tolist() == [False, True, True, True, True]  # one key is enough
    assert got[:, 2].tolist() == [False] * 5  # its second key never comes
    assert got[:, 3].tolist() == [False, False, False, True, True]
    assert got[:, 4].tolist() == [False, False, False, False, True]
    # without any `every` gate the result is the plain rule's, bit for bit
    assert torch.equal(gates(space, hidden, KeyTable.of(keys), tau=0.7, words=words),
                       gates(space, hidden, keys, tau=0.7, words=words))


def test_of_a_subjects_gates_the_one_whose_relation_the_text_words_stays_open():
    """`select`: gates that read the same names and carry relation keys form a group; at each
    token only the open one whose relation best matches the text so far stays open (on a tie
    the later); a gate of other names, or one without relation keys, is left alone; without
    `select` (what `open_matrix` asks) all of them stay open."""
    from mendctl.editors.route import KeyTable, relation_match

    dim = 8
    space = GateSpace(1, torch.zeros(dim), torch.ones(dim), torch.empty(0), frozenset(), frozenset())
    e = torch.eye(dim)
    subject = e[[0]]
    gs = [Gate(subject, ("France",), relation=e[[1]]),  # "capital of"
          Gate(subject, ("France",), relation=e[[2]]),  # "currency of"
          Gate(subject, ("France",)),  # made without `select`: always open with its subject
          Gate(e[[3]], ("Peru",), relation=e[[1]])]  # another subject
    table = KeyTable.of_gates(gs)
    assert table.groups == ((0, 1),)

    def text(*dims):
        h = torch.zeros(1, len(dims) + 1, dim)
        h[0, 0, 7] = 1.0  # (the first token never opens a gate)
        for t, d in enumerate(dims, start=1):
            h[0, t, d] = 1.0
        return h

    got = gates(space, text(0, 1, 5), table, tau=0.7)[0]  # "France … capital …"
    # at the name both relations score 0: the later; from "capital" on, the first
    assert got.tolist() == [[False] * 4, [False, True, True, False], [True, False, True, False],
                            [True, False, True, False]]
    got = gates(space, text(0, 2), table, tau=0.7)[0]  # "France … currency"
    assert got[2].tolist() == [False, True, True, False]
    got = gates(space, text(3, 1), table, tau=0.7)[0]  # "Peru … capital": a group of one
    assert got[2].tolist() == [False, False, False, True]
    both = gates(space, text(0, 1), table, tau=0.7, select=False)[0]
    assert both[2].tolist() == [True, True, True, False]
    # the match: the relation's wording held (each relation token's best cosine so far) and
    # the share of the text that is that wording, as an F-measure; the first token left out
    z = space.unit(text(1, 5))
    assert torch.allclose(relation_match(z, e[[1]])[0], torch.tensor([0.0, 1.0, 2 * 0.5 / 1.5]))
    assert torch.equal(relation_match(z, torch.zeros(0, dim)), torch.zeros(1, 3))
    # weighted (idf): half of the relation held, by weight 3 of 4; 1 of 1 + 3 of the text's weight
    z = space.unit(text(1, 5, 6))
    got = relation_match(z, e[[1, 2]], torch.tensor([3.0, 1.0]), torch.tensor([[9.0, 1.0, 3.0, 0.0]]))
    held, share = 0.75, 1 / 4
    assert torch.allclose(got[0, 2], torch.tensor(2 * held * share / (held + share)))
    assert torch.allclose(got[0, 3], got[0, 2])  # (a token of weight 0 changes nothing)


def test_idf_is_bertscores_over_the_bank(tiny_tokenizer):
    """`GateSpace.idf`: log((prompts + 1) / (prompts holding the token + 1)) from the bank's
    token frequencies (`token_frequencies`: per prompt, after its first token); a token the
    bank never holds gets the largest; without frequencies, 1."""
    from mendctl.editors.route import token_frequencies

    texts = ["the capital of s3 is", "the capital of s5 is", "the river of s3"]
    df, docs = token_frequencies(tiny_tokenizer, texts)
    ids = [tiny_tokenizer(t).input_ids[1:] for t in texts]
    for i in {i for row in ids for i in row}:
        assert int(df[i]) == sum(i in row for row in ids)
    space = GateSpace(1, torch.zeros(2), torch.ones(2), torch.empty(0), frozenset(), frozenset(), df, docs)
    probe = torch.tensor([ids[0][0], len(df) + 5])
    want = torch.tensor([math.log(4 / (int(df[ids[0][0]]) + 1)), math.log(4)])
    assert torch.allclose(space.idf(probe), want)
    bare = GateSpace(1, torch.zeros(2), torch.ones(2), torch.empty(0), frozenset(), frozenset())
    assert torch.equal(bare.idf(probe), torch.ones(2))


def test_open_rows_says_where_a_gate_opens_anywhere(tiny_llama, tiny_tokenizer):
    """`open_rows` (what the routed health check uses to re-score only the prompts a new edit
    can touch) agrees with `routed` itself: a row it calls closed is unchanged bit for bit."""
    from mendctl.editors.route import open_rows
    from mendctl.editors.text import encode_prompts

    space = gate_space(tiny_llama, tiny_tokenizer, BANK, layer=1)
    gate = edit_gate(tiny_llama, tiny_tokenizer, space, fact_prompt("s3"))
    prompts = [fact_prompt("s3"), "water is cold and snow is", "tell me about s3 please",
               fact_prompt("s5")]
    b = encode_prompts(tiny_tokenizer, prompts)
    rows = open_rows(tiny_llama, tiny_tokenizer, space, [gate], b.input_ids, b.attention_mask)
    assert rows[0] and rows[2] and not rows[1] and not rows[3]
    delta = _edit(tiny_llama, tiny_tokenizer, "auto")
    base, _ = _logits(tiny_llama, tiny_tokenizer, prompts)
    with routed(tiny_llama, [RoutedEdit(delta, gate)], space, tokenizer=tiny_tokenizer):
        edited, _ = _logits(tiny_llama, tiny_tokenizer, prompts)
    for i, o in enumerate(rows):
        if not o:
            assert torch.equal(edited[i], base[i])
    assert not torch.equal(edited[0], base[0])


def _routed_pair(tiny_llama, tiny_tokenizer, subjects, targets, init_alpha):
    """An editor, and per fact its gate, for edits of `subjects` → `targets` behind gates."""
    specs = select_weights(tiny_llama, ["auto"])
    editor = MendEditor(specs, MendConfig(rank=4, norm=False, init_alpha=init_alpha))
    space = gate_space(tiny_llama, tiny_tokenizer, BANK, layer=1)
    gates_ = [edit_gate(tiny_llama, tiny_tokenizer, space, fact_prompt(s)) for s in subjects]
    return editor, space, gates_


def _gated_apply(tiny_llama, tiny_tokenizer, gate, space):
    """`edit_apart`'s `apply` for one fact behind `gate`."""
    def apply(items):
        return routed(tiny_llama, [RoutedEdit(d, gate) for _, d in items], space,
                      tokenizer=tiny_tokenizer)
    return apply


def _ruining_step(editor, n: int) -> list:
    """Make the editor's `n`-th delta (1-based) go far the wrong way (its δ × −50); returns
    the list of every delta it makes."""
    real, made = editor.delta_from_factors, []

    def ruined(factors, meta):
        d = real(factors, meta)
        made.append(d)
        if len(made) == n:
            for layer in d.layers.values():
                layer.d.mul_(-50.0)
        return d

    editor.delta_from_factors = ruined
    return made


def test_edit_apart_of_one_fact_is_the_edit_step_for_step(tiny_llama, tiny_tokenizer):
    """`edit_apart` with one fact takes exactly the steps `edit` takes (same forwards, same
    rows): the routed single edit and the routed batch are one code path without a seam."""
    editor, space, (gate,) = _routed_pair(tiny_llama, tiny_tokenizer, ["s3"], ["c7"], 0.05)
    one = editor.edit(tiny_llama, tiny_tokenizer, [fact_prompt("s3")], ["c7"], max_steps=4,
                      apply=lambda d: routed(tiny_llama, [RoutedEdit(d, gate)], space,
                                             tokenizer=tiny_tokenizer))
    (apart,) = editor.edit_apart(
        tiny_llama, tiny_tokenizer, [fact_prompt("s3")], ["c7"], max_steps=4,
        apply=lambda items: routed(tiny_llama, [RoutedEdit(d, gate) for _, d in items], space,
                                   tokenizer=tiny_tokenizer))
    assert int(apart.meta["edit_steps"]) == int(one.meta["edit_steps"]) > 1
    assert apart.meta["edit_loss_before"] == one.meta["edit_loss_before"]
    for name, layer in one.layers.items():
        assert torch.equal(apart.layers[name].u, layer.u) and torch.equal(apart.layers[name].d, layer.d)


def test_edit_apart_gives_each_fact_the_delta_it_gets_alone(tiny_llama, tiny_tokenizer):
    """Facts edited together, each behind its own gate: each fact's ΔW is the one it gets when
    edited alone, up to float32 rounding of the padded batch (the reductions run over other
    shapes: a few hundred ulps of the largest entry at most), and it holds as it does alone."""
    subjects, targets = ["s3", "s5", "s9"], ["c7", "c2", "c4"]
    editor, space, gates_ = _routed_pair(tiny_llama, tiny_tokenizer, subjects, targets, 1.0)
    prompts = [fact_prompt(s) for s in subjects]

    def apply(items):
        return routed(tiny_llama, [RoutedEdit(d, gates_[i]) for i, d in items], space,
                      tokenizer=tiny_tokenizer)

    together = editor.edit_apart(tiny_llama, tiny_tokenizer, prompts, targets, max_steps=1, apply=apply)
    assert len(together) == 3
    for i, (p, t) in enumerate(zip(prompts, targets)):
        alone = editor.edit(tiny_llama, tiny_tokenizer, [p], [t], max_steps=1)
        for name, layer in alone.layers.items():
            want, got = layer.to_dense(), together[i].layers[name].to_dense()
            assert want.abs().max() > 0
            assert (got - want).abs().max() <= 512 * EPS32 * want.abs().max()
    # with all three installed, a fact whose prompt opens no other fact's gate scores as alone
    crossed = open_at_end(tiny_llama, tiny_tokenizer, space, gates_, prompts)
    with apply(list(enumerate(together))):
        lp_together = target_scores(tiny_llama, tiny_tokenizer, prompts, targets)[1]
    clean = [i for i in range(3) if crossed[i].sum() == 1 and crossed[i, i]]
    assert clean, crossed
    for i in clean:
        with routed(tiny_llama, [RoutedEdit(together[i], gates_[i])], space, tokenizer=tiny_tokenizer):
            lp = target_scores(tiny_llama, tiny_tokenizer, [prompts[i]], [targets[i]])[1][0]
        assert abs(lp - lp_together[i]) <= 1e-4 * max(1.0, abs(lp))


def test_rank_cut_keeps_the_directions_above_the_cut(tiny_llama, tiny_tokenizer):
    """`edit_apart(rank_cut=c)`: every stored ΔW has only singular values above c × its
    largest (float64 SVD of float32 factors: a relative slack of a few float32 ulps), and no
    more factor rows than the uncut edit; the steps see the cut delta, so it still steps until
    it holds or runs out of steps."""
    editor, space, (gate,) = _routed_pair(tiny_llama, tiny_tokenizer, ["s3"], ["c7"], 0.2)

    apply = _gated_apply(tiny_llama, tiny_tokenizer, gate, space)

    args = (tiny_llama, tiny_tokenizer, [fact_prompt("s3")], ["c7"])
    (full,) = editor.edit_apart(*args, max_steps=3, apply=apply)
    (cut,) = editor.edit_apart(*args, max_steps=3, apply=apply, rank_cut=0.3)
    assert any(layer.rank < full.layers[name].rank for name, layer in cut.layers.items())
    for name, layer in cut.layers.items():
        assert layer.rank <= full.layers[name].rank
        sv = torch.linalg.svdvals(layer.to_dense().double())
        kept = sv[: layer.rank]
        assert bool((kept >= 0.3 * sv[0] * (1 - 64 * EPS32)).all()), (name, kept / sv[0])


def test_confidence_steps_on_until_the_target_is_probable(tiny_llama, tiny_tokenizer):
    """`edit_apart(confidence=p)`: a fact holds only once every target token is the argmax
    with probability ≥ p, so it takes at least the steps the argmax alone takes, and when it
    stops before its step budget the target has that probability behind its gate."""
    editor, space, (gate,) = _routed_pair(tiny_llama, tiny_tokenizer, ["s3"], ["c7"], 0.05)

    apply = _gated_apply(tiny_llama, tiny_tokenizer, gate, space)

    args = (tiny_llama, tiny_tokenizer, [fact_prompt("s3")], ["c7"])
    (argmax,) = editor.edit_apart(*args, max_steps=30, apply=apply)
    (sure,) = editor.edit_apart(*args, max_steps=30, apply=apply, confidence=0.7)
    steps, steps_sure = int(argmax.meta["edit_steps"]), int(sure.meta["edit_steps"])
    assert steps_sure > steps
    with apply([(0, argmax)]):
        es, lp = target_scores(tiny_llama, tiny_tokenizer, [fact_prompt("s3")], ["c7"])[:2]
    assert es == [1.0] and lp[0] < math.log(0.7)  # it stopped at the argmax, below p
    assert steps_sure < 30
    with apply([(0, sure)]):
        es, lp = target_scores(tiny_llama, tiny_tokenizer, [fact_prompt("s3")], ["c7"])[:2]
    assert es == [1.0] and lp[0] >= math.log(0.7) - 1e-5  # one token: its log p


def test_confidence_keeps_the_last_argmax_delta_when_a_step_overshoots(tiny_llama, tiny_tokenizer):
    """A fact whose steps run out before it is confident, and whose last step overshot (its
    target no longer the argmax), keeps the delta under which its target was last the argmax:
    a confident edit never loses a fact that the argmax stop would have kept."""
    editor, space, (gate,) = _routed_pair(tiny_llama, tiny_tokenizer, ["s3"], ["c7"], 0.5)

    apply = _gated_apply(tiny_llama, tiny_tokenizer, gate, space)

    args = (tiny_llama, tiny_tokenizer, [fact_prompt("s3")], ["c7"])
    (one,) = editor.edit_apart(*args, max_steps=1, apply=apply)
    with apply([(0, one)]):  # one step makes the argmax, short of 0.99
        assert target_scores(tiny_llama, tiny_tokenizer, [fact_prompt("s3")], ["c7"])[0] == [True]
    made = _ruining_step(editor, 2)  # the second step goes far the wrong way
    (kept,) = editor.edit_apart(*args, max_steps=2, apply=apply, confidence=0.99)
    assert len(made) == 2 and kept.meta["edit_steps"] == "1"
    for name, layer in one.layers.items():
        assert torch.equal(kept.layers[name].to_dense(), layer.to_dense())
    with apply([(0, kept)]):
        assert target_scores(tiny_llama, tiny_tokenizer, [fact_prompt("s3")], ["c7"])[0] == [True]


def test_contexts_add_each_wordings_first_step(tiny_llama, tiny_tokenizer):
    """`edit_apart(contexts=[c])`: the first step takes the fact's gradient on the prompt and on
    c + prompt, and the networks act on each token's row alone, so the step's ΔW is the sum of
    the steps each wording takes alone (float32 rounding of the larger padded batch: a few
    hundred ulps of the largest entry at most). (A step that makes the fact hold: one that
    does not would be made again without contexts.)"""
    editor, space, (gate,) = _routed_pair(tiny_llama, tiny_tokenizer, ["s3"], ["c7"], 0.5)
    apply = _gated_apply(tiny_llama, tiny_tokenizer, gate, space)
    prompt, ctx = fact_prompt("s3"), "where the red tree is blue . "
    (both,) = editor.edit_apart(tiny_llama, tiny_tokenizer, [prompt], ["c7"], max_steps=1,
                                apply=apply, contexts=[ctx])
    (alone,) = editor.edit_apart(tiny_llama, tiny_tokenizer, [prompt], ["c7"], max_steps=1, apply=apply)
    (in_ctx,) = editor.edit_apart(tiny_llama, tiny_tokenizer, [ctx + prompt], ["c7"], max_steps=1,
                                  apply=apply)
    assert "contexts" not in both.meta  # it held: kept as made
    assert both.meta["edit_loss_before"] == alone.meta["edit_loss_before"]  # the prompt's own
    for name, layer in alone.layers.items():
        want = layer.to_dense() + in_ctx.layers[name].to_dense()
        got = both.layers[name].to_dense()
        assert (in_ctx.layers[name].to_dense()).abs().max() > 0
        assert (got - want).abs().max() <= 512 * EPS32 * want.abs().max()


def test_contexts_act_in_the_first_step_only(tiny_llama, tiny_tokenizer):
    """Later steps take the prompt alone: with the steps after the first made by a hook that
    records the rows it is given, every later step has the prompt's rows only."""
    editor, space, (gate,) = _routed_pair(tiny_llama, tiny_tokenizer, ["s3"], ["c7"], 0.01)
    apply = _gated_apply(tiny_llama, tiny_tokenizer, gate, space)
    real, rows = editor._eval_factors, []

    def counting(pairs):
        rows.append(next(iter(pairs.values()))[0].shape[0])
        return real(pairs)

    editor._eval_factors = counting
    prompt, target = fact_prompt("s3"), "c7 c2 c4"
    editor.edit_apart(tiny_llama, tiny_tokenizer, [prompt], [target], max_steps=3, apply=apply,
                      contexts=["where the red tree is blue . "])
    ctx = "where the red tree is blue . "
    n_alone, n_both = (int(encode_pairs(tiny_tokenizer, ps, [target] * len(ps)).attention_mask.sum())
                       for ps in ([prompt], [prompt, ctx + prompt]))
    assert len(rows) >= 2, rows
    assert rows[0] == n_both and all(r == n_alone for r in rows[1:]), (rows, n_alone, n_both)


def test_a_fact_that_fails_under_contexts_is_made_again_without(tiny_llama, tiny_tokenizer):
    """A fact whose steps under contexts run out with its target not the argmax (and no step
    under which it was) is made again without them: its delta is then the one the prompt
    alone gives, bit for bit, and says so (`contexts: dropped`)."""
    editor, space, (gate,) = _routed_pair(tiny_llama, tiny_tokenizer, ["s3"], ["c7"], 0.5)
    apply = _gated_apply(tiny_llama, tiny_tokenizer, gate, space)
    args = (tiny_llama, tiny_tokenizer, [fact_prompt("s3")], ["c7"])
    (plain,) = editor.edit_apart(*args, max_steps=1, apply=apply)
    made = _ruining_step(editor, 1)  # the (only) step under contexts ruins the fact
    (d,) = editor.edit_apart(*args, max_steps=1, apply=apply, contexts=["where the red tree is blue . "])
    assert len(made) == 2 and d.meta["contexts"] == "dropped" and d.meta["edit_steps"] == "1"
    for name, layer in plain.layers.items():
        assert torch.equal(d.layers[name].to_dense(), layer.to_dense())
    with apply([(0, d)]):
        assert target_scores(tiny_llama, tiny_tokenizer, [fact_prompt("s3")], ["c7"])[0] == [True]


def _space_with_words(words: str) -> GateSpace:
    return GateSpace(3, torch.zeros(4), torch.ones(4), torch.zeros(0, 4), frozenset(),
                     frozenset(words.split()))


@pytest.mark.parametrize("prompt, names", [
    ("Who is the president of France?", ("France",)),   # not the relation's words
    ("Who is India's PM?", ("India",)),                  # a lone acronym beside a name goes
    ("Who is the CEO of Apple?", ("Apple",)),
    ("What is MQL's file extension?", ("MQL",)),         # alone, it is the subject
    ("APA Corporation is a member of the", ("APA", "Corporation")),  # part of a name
    ("Hamlet was written by", ("Hamlet",)),              # the first word, alone: the subject
    ("Geographers place Guatemala in", ("Guatemala",)),  # the first word beside a name goes
    ("Q: Who wrote Hamlet? A:", ("Hamlet",)),            # one letter is never a name
    ("The President of Sir Frank Burnet's country is", ("Sir", "Frank", "Burnet")),
    ("What happened in 1969?", ("1969",)),
    ("what is the capital of the country", ()),          # names nothing: the distinct gate
])
def test_subject_words_are_the_names_a_prompt_holds(prompt, names):
    """`subject_words`: the capitalised (or numbered) words no bank prompt uses as an ordinary
    lowercase word, without question words, single letters, and, beside another name, a lone
    acronym or a lone first word."""
    space = _space_with_words("the The of is was by who what a in president capital country "
                              "member file extension wrote place written happened")
    assert route.subject_words(prompt, space) == names


@pytest.mark.parametrize("prompt, subject, words", [
    ("Who discovered penicillin?", "penicillin", ("penicillin",)),
    ("Penicillin was discovered by", "penicillin", ("Penicillin",)),  # as the prompt writes it
    ("James Chadwick is a Nobel laureate in", "James Chadwick", ("James", "Chadwick")),
    ("Who discovered X-rays?", " X-rays ", ("X", "rays")),
    ("The goldsmith made a ring", "gold", ()),          # whole words, not a part of one
    ("Who is India's PM?", "Pakistan", ()),
    ("Who is India's PM?", "", ()),
])
def test_subject_in_is_the_subject_as_the_prompt_writes_it(prompt, subject, words):
    assert route.subject_in(prompt, subject) == words


def test_word_gates_of_a_folded_gate_match_in_any_case():
    """A gate whose name opened its prompt ("Silver's symbol is") matches its words in any
    case (`fold`: "the symbol of silver"); other gates match only as written, so an edit of
    "Apple" does not open on "an apple"."""
    index = route.WordIndex([("Silver",), ("Apple",)], [True, False])
    assert set(index.opened("the symbol of silver is")) == {0}
    assert set(index.opened("Silver and an apple are")) == {0}
    assert set(index.opened("SILVER and Apple are")) == {0, 1}
    assert route.WordIndex([("Silver",)]).opened("the symbol of silver is") == {}


def test_edit_apart_rejoin_steps_again_a_fact_another_took_the_answer_of(tiny_llama, tiny_tokenizer):
    """Two facts behind one gate whose prompts differ by a word ("India's PM" / "India's
    president" in miniature): the second fact's later step takes the first's answer, which
    stopped stepping once it held; with `rejoin` every fact is checked at every step and both
    hold at the end."""
    editor, space, (gate,) = _routed_pair(tiny_llama, tiny_tokenizer, ["s3"], ["c7"], 0.4)
    prompts, targets = [fact_prompt("s3"), fact_prompt("s3") + " indeed"], ["c7", "c2"]
    apply = _gated_apply(tiny_llama, tiny_tokenizer, gate, space)
    held = {}
    for rejoin in (False, True):
        deltas = editor.edit_apart(tiny_llama, tiny_tokenizer, prompts, targets, max_steps=12,
                                   apply=apply, rejoin=rejoin)
        with apply(list(enumerate(deltas))):
            held[rejoin] = edit_success(tiny_llama, tiny_tokenizer, prompts, targets)
    assert held[False] == [False, True]  # the first fact's answer was taken, unseen
    assert held[True] == [True, True]
