"""Shared fixtures for the editor tests: tiny seeded models and an offline word-level tokenizer.

Everything is built in-process in milliseconds: no network, no files. The Llama model stores
its weights as nn.Linear (out, in); the GPT-2 model as Conv1D (in, out). Both have 4 blocks,
so `select_weights(model, "auto")` picks the MLP weights of blocks 1-3 and the prefix cache
has one block to skip.
"""
from __future__ import annotations

import pytest
import torch

# Words of the synthetic facts used by the tests: "the capital of s3 is" -> "c7".
SUBJECTS = [f"s{i}" for i in range(24)]
OBJECTS = [f"c{i}" for i in range(12)]
WORDS = (
    "the capital of is has its in a an and city country river sky color water "
    "blue green red cold hot big small what where who which lives runs near far "
    "paris rome berlin madrid london france italy germany spain england "
    "one two three four five six seven eight nine ten grass snow fire tree "
    "question answer tell me about please"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[EOS]"]
VOCAB = SPECIALS + sorted(set(WORDS)) + SUBJECTS + OBJECTS


def fact_prompt(subject: str) -> str:
    return f"the capital of {subject} is"


def fact_paraphrase(subject: str) -> str:
    return f"{subject} has its capital city in"


LOCALITY_PROMPTS = [
    "the color of the sky is",
    "water is cold and snow is",
    "the river near rome is",
    "grass is green and fire is",
    "what is the big tree near",
    "tell me about the city of london",
]


# -- the quick suite and the full suite ---------------------------------------------------------
# `pytest -q` (the quick suite) skips the tests marked `slow` (the real embedded model) and
# `subprocess` (real `python -m mendctl` processes: each pays the torch/transformers import and
# a model load); `pytest -q --full` (what CI runs) runs every test.
FULL_ONLY = ("slow", "subprocess")


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="run the full suite: also the tests marked slow or subprocess")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="full suite only: run pytest --full")
    for item in items:
        if any(item.get_closest_marker(m) is not None for m in FULL_ONLY):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _real_cli_processes(request):
    """In a test marked `subprocess`, tests/e2e_helpers.py runs every mendctl command as a real
    `python -m mendctl` process (elsewhere: in this process)."""
    if request.node.get_closest_marker("subprocess") is None:
        yield
        return
    import e2e_helpers

    old, e2e_helpers.REAL_PROCESS = e2e_helpers.REAL_PROCESS, True
    try:
        yield
    finally:
        e2e_helpers.REAL_PROCESS = old


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """A long job shares this machine: keep every test on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.decoders import WordPiece
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.decoder = WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[EOS]")
    assert fast.pad_token_id == 0 and len(fast) == len(VOCAB)
    return fast


def _llama(n_layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, pad_token_id=0, bos_token_id=None,
                      eos_token_id=2, tie_word_embeddings=False, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def _gpt2(n_layers: int = 4, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(VOCAB), n_embd=32, n_layer=n_layers, n_head=4, n_positions=64,
                     bos_token_id=2, eos_token_id=2, pad_token_id=0, initializer_range=0.2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def tiny_llama():
    """4-block Llama (nn.Linear weights), hidden 32, MLP 64, seeded; fresh per test."""
    return _llama()


@pytest.fixture
def tiny_gpt2():
    """4-block GPT-2 (Conv1D weights, stored (in, out)), hidden 32, seeded; fresh per test."""
    return _gpt2()


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request):
    """Both orientations: the test runs once on Llama (Linear) and once on GPT-2 (Conv1D)."""
    return _llama() if request.param == "llama" else _gpt2()


@pytest.fixture
def make_model():
    """Factory for extra tiny models: make_model("llama" | "gpt2", n_layers=..., seed=...)."""
    def make(kind: str, n_layers: int = 4, seed: int = 0):
        return _llama(n_layers, seed) if kind == "llama" else _gpt2(n_layers, seed)
    return make
