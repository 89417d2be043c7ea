"""Routed edits stop acting once their answer is written (editors.route: `until` gates).

An edit whose gate stays open on its own output writes its target again and again ("PSGGGG");
a gate with `until` closes from the token that completes the target, and, while generating
(`answering`), from the first answer token off the target's path; and an answer that takes
the edit writes the whole target.
"""
from __future__ import annotations

import torch

from mendctl.editors.route import close_after, off_target, token_texts


class CharTokenizer:
    """One character per token: token id = code point (decode joins them)."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def _ids(text: str) -> torch.Tensor:
    return torch.tensor([[ord(c) for c in text]])


def _open_from(n: int, t: int) -> torch.Tensor:
    opened = torch.zeros(1, n, 1, dtype=torch.bool)
    opened[0, t:, 0] = True
    return opened


def test_gate_closes_on_the_token_that_completes_the_target():
    text = "Messi plays for PSG and PSG again"
    texts = token_texts(CharTokenizer(), _ids(text))
    assert texts[0][0] == text and texts[0][1] == list(range(1, len(text) + 1))
    opened = _open_from(len(text), 1)
    out = close_after(opened, texts, ["PSG"])
    end = text.index("PSG") + len("PSG") - 1  # the token holding the target's last character
    assert out[0, :end, 0].tolist() == opened[0, :end, 0].tolist()  # open up to it: scoring
    assert not out[0, end:, 0].any()  # closed from it on: no second "PSG" pushed
    # a gate without a target (entries made before `stop`) is left as it was
    assert torch.equal(close_after(opened, texts, [None]), opened)


def test_target_before_the_gate_opens_does_not_close_it():
    text = "PSG fans ask where Messi plays: PSG"
    texts = token_texts(CharTokenizer(), _ids(text))
    opened = _open_from(len(text), text.index("Messi"))
    out = close_after(opened, texts, [" PSG "])  # surrounding space is not part of the target
    last = len(text) - 1
    assert out[0, text.index("Messi"):last, 0].all() and not out[0, last, 0]


def test_generated_answer_off_the_target_path_closes_the_gate():
    prompt = "Messi plays for"
    tok = CharTokenizer()
    for answer, open_until in ((" PSG!", len(" PS")),  # on the path, closed once complete
                               (" the club", len(" ")),  # "t" is not "P": closed at once
                               (" PX", len(" P"))):  # leaves the path at its 2nd letter
        text = prompt + answer
        texts = token_texts(tok, _ids(text))
        opened = _open_from(len(text), 1)
        out = off_target(opened, texts, ["PSG"], [len(prompt)])
        gen = out[0, len(prompt):, 0].tolist()
        assert out[0, 1:len(prompt), 0].all()  # the prompt (its last token predicts the answer)
        assert gen == [True] * open_until + [False] * (len(answer) - open_until), (answer, gen)


def test_word_index_finds_what_whole_word_patterns_find():
    """The indexed gate words (one pass over a text) open exactly where a search for each
    word as a whole word, its next character seen, would (the rule before the index)."""
    import random
    import re

    from mendctl.editors.route import WordIndex

    rng = random.Random(0)
    vocab = ["Oran", "Orange", "San", "Juan", "de", "Díaz", "PM", "India", "s", "é"]
    for _ in range(300):
        text = "".join(rng.choice(vocab) + rng.choice([" ", "'", ", ", "-", ""])
                       for _ in range(rng.randint(1, 6)))
        words = [tuple(rng.sample(vocab, rng.randint(1, 2))) for _ in range(5)]
        want = {}
        for i, ws in enumerate(words):
            found = [m.end() for m in (re.search(rf"(?<!\w){re.escape(w)}(?=\W)", text) for w in ws) if m]
            if len(found) == len(ws):
                want[i] = max(found)
        assert WordIndex(words).opened(text) == want, (text, words)


def test_finish_token_keeps_an_answer_that_takes_the_edit_on_its_target():
    """Where the answer has begun the target and the best token leaves it, or the answer's
    first word would be a later piece of the target: the best of the k best tokens that stays
    on it. Elsewhere (the best token already on the path, or an answer that does not take the
    edit), None: the model's own token."""
    from mendctl.editors.route import finish_token, stray_piece

    tok, cache = CharTokenizer(), {}
    scores = torch.full((128,), -10.0)
    scores[ord("s")], scores[ord("o")], scores[ord("x")] = 3.0, 1.0, 2.0
    # "Matte" + "s" leaves "Matteo Salvini"; "o" is the best token that stays on it
    assert finish_token(tok, cache, ord("e"), " Matte", "Matteo Salvini", scores) == ord("o")
    # none on the path among the k best: nothing is imposed
    assert finish_token(tok, cache, ord("e"), " Matte", "Matteo Salvini", scores, k=2) is None
    # the best token on the path already, completing the target or going on along it
    scores[ord(" ")] = 5.0
    assert finish_token(tok, cache, ord("i"), " Matteo Salvini", "Matteo Salvini", scores) is None
    assert finish_token(tok, cache, ord("o"), " Matteo", "Matteo Salvini", scores) is None
    # nothing written yet: the model's own answer, unless it starts inside the target's names
    first = torch.full((128,), -10.0)
    first[ord("x")], first[ord("M")] = 3.0, 1.0  # ("x": not in the target)
    assert finish_token(tok, cache, ord(":"), " ", "Matteo Salvini", first) is None
    assert stray_piece(" K", "New York Knicks", True) and stray_piece(" Su", "Lisa Su", True)
    assert stray_piece("elt", "Boston Celtics", False)  # glued on, inside one of its words
    assert not stray_piece(" New", "New York Knicks", True)  # its start: on the path
    assert not stray_piece(" the", "Bank of the West", True)  # a lowercase word: ordinary
    assert not stray_piece(" a", "Manfred Weber", True)  # a word, not the inside of "Manfred"
    assert not stray_piece("a", "Manfred Weber", False)  # one letter: anything's
    assert not stray_piece(" Rome", "New York Knicks", True)
    assert not stray_piece(" ", "Lisa Su", True) and not stray_piece(" eb", "Manfred Weber", True)
    # the first answer token a stray piece: the best token that starts the target instead
    first[ord("K")] = 4.0
    assert finish_token(tok, cache, ord(":"), " ", "Matteo Salvini", first) is None  # (no "K")
    assert finish_token(tok, cache, ord(":"), " ", "Kim Matteo", first) is None  # its start
    assert finish_token(tok, cache, ord(":"), " ", "Matteo Kim", first) == ord("M")
    first[ord("a")] = 5.0  # "a" starting a word: not a piece of "Matteo Kim"'s names
    assert finish_token(tok, cache, ord(":"), " ", "Matteo Kim", first) is None


def test_target_answers_are_open_target_gates_where_an_answer_token_is_predicted():
    from mendctl.editors.route import target_answers

    tok = CharTokenizer()
    prompt = "Messi plays for"
    rows = [prompt + " P", prompt + "  ", prompt, "Messi"]  # the last: a start past its end
    texts = [token_texts(tok, _ids(r))[0] for r in rows]
    opened = torch.ones(4, 1, 2, dtype=torch.bool)  # (each row's last token: both gates open)
    got = target_answers(opened, texts, ["PSG", None], [len(prompt)] * 4)
    # a gate without a target (entries made before `stop`) never finishes one
    assert got == [(0, 0, " P"), (1, 0, "  "), (2, 0, "")]


def test_a_routed_answer_that_begins_its_target_finishes_it(tiny_llama, tiny_tokenizer):
    """Generation with a routed edit whose answer has begun the target: the target's next
    token is written where the model would leave it, with a KV cache or without, and the base
    model takes over once the target is complete; without `answering` (teacher forcing, or
    another caller's loop) nothing is imposed."""
    from mendctl.editors.delta import Delta, LayerDelta
    from mendctl.editors.metrics import greedy_ids
    from mendctl.editors.route import Gate, RoutedEdit, answering, gate_space, routed

    model, tok = tiny_llama, tiny_tokenizer
    prompt = "tell me about the city of london and"
    ids = tok(prompt).input_ids
    base = greedy_ids(model, [ids], 4)[0]
    with torch.no_grad():  # the base's scores after its first answer token
        scores = model(input_ids=torch.tensor([ids + base[:1]])).logits[0, -1]
    ranked = [t for t in scores.topk(10).indices.tolist() if t != base[1]
              and tok.decode([t]).isalnum()]
    second = ranked[2]  # in the 32 best, not the model's own next token
    target = f"{tok.decode([base[0]])} {tok.decode([second])}"
    name = "model.layers.3.mlp.down_proj.weight"
    w = model.get_parameter(name)
    zero = Delta({name: LayerDelta(name, tuple(w.shape), u=torch.zeros(1, w.shape[1]),
                                   d=torch.zeros(1, w.shape[0]), alpha=1.0)})
    gate = Gate(torch.zeros(0, 32), ("london",), until=target)  # opens after "london"
    space = gate_space(model, tok, ["the capital of s1 is", "water is cold and snow is"], layer=1)
    with routed(model, [RoutedEdit(zero, gate)], space, tokenizer=tok):
        cached = greedy_ids(model, [ids], 4)[0]  # (answering: greedy_ids says where)
        seq = list(ids)
        with answering([len(ids)]), torch.no_grad():  # every step a whole forward
            for _ in range(4):
                seq.append(int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
        with torch.no_grad():  # no answer start given: the model's own scores
            plain = model(input_ids=torch.tensor([ids + base[:1]])).logits[0, -1]
    assert cached[:2] == [base[0], second] and seq[len(ids):] == cached
    assert torch.equal(plain, scores)
    # the target complete, its gate closed: the base model's next token after it
    with torch.no_grad():
        after = int(model(input_ids=torch.tensor([ids + cached[:2]])).logits[0, -1].argmax())
    assert cached[2] == after
