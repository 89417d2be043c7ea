"""Answers shown to users are never blank (`generate(say_something=True)`), and the field's
token-level accuracy beside exact-match success (`target_scores(token_accuracy=True)`)."""
from __future__ import annotations

import pytest
import torch

from conftest import fact_prompt
from mendctl.editors.metrics import fluency_answers, generate, target_scores


@pytest.fixture
def eos_first(tiny_llama, tiny_tokenizer):
    """The tiny model with the end of text made its favourite next token everywhere."""
    eos = tiny_tokenizer.eos_token_id

    def boost(module, args, output):
        output = output.clone()
        output[..., eos] += 1e4
        return output

    h = tiny_llama.lm_head.register_forward_hook(boost)
    yield tiny_llama
    h.remove()


@pytest.mark.parametrize("unpadded", [False, True])
def test_answers_shown_are_never_blank(eos_first, tiny_tokenizer, unpadded):
    prompts = [fact_prompt("s1"), fact_prompt("s2")]
    plain = generate(eos_first, tiny_tokenizer, prompts, max_new_tokens=4, unpadded=unpadded)
    assert plain == ["", ""]  # the model says nothing at all
    shown = generate(eos_first, tiny_tokenizer, prompts, max_new_tokens=4, unpadded=unpadded,
                     say_something=True)
    # the first word the model has after the end of text; then the end of text is allowed
    for a in shown:
        assert a.strip() and len(a.split()) == 1


def test_token_accuracy_is_the_share_of_target_tokens_at_the_argmax(tiny_llama, tiny_tokenizer):
    prompt = fact_prompt("s3")
    # the model's own greedy continuation of 3 words: every token is the argmax
    own = generate(tiny_llama, tiny_tokenizer, [prompt], max_new_tokens=3)[0].strip()
    assert len(own.split()) == 3
    ok, _, acc = target_scores(tiny_llama, tiny_tokenizer, [prompt], [own], token_accuracy=True)
    assert ok == [True] and acc == [1.0]
    # change the last word to one that is not the argmax there: 2 of 3 tokens still are
    words = own.split()
    with torch.no_grad():
        logits = tiny_llama(**tiny_tokenizer(prompt + " " + " ".join(words[:2]),
                                             return_tensors="pt")).logits[0, -1]
    worst = tiny_tokenizer.convert_ids_to_tokens(int(logits[3:].argmin()) + 3)
    ok, _, acc = target_scores(tiny_llama, tiny_tokenizer, [prompt], [" ".join(words[:2] + [worst])],
                               token_accuracy=True)
    assert ok == [False] and acc[0] == pytest.approx(2 / 3)
    assert len(target_scores(tiny_llama, tiny_tokenizer, [prompt], [own])) == 2  # unchanged default


def test_fluency_is_scored_on_an_answer_that_says_something(eos_first, tiny_tokenizer):
    # a model that would end at once: the fluency measures still get words to score, for
    # the unedited model as for the edited one (else a question's base fluency reads 0)
    prompts = [fact_prompt("s1"), fact_prompt("s2")]
    assert all(a.strip() for a in fluency_answers(eos_first, tiny_tokenizer, prompts))
