"""Routed edits stop acting once their answer is written (editors.route: `until` gates).

An edit whose gate stays open on its own output writes its target again and again ("PSGGGG");
a gate with `until` closes from the token that completes the target, and, while generating
(`answering`), from the first answer token off the target's path.
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
