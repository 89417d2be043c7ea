"""Helpers for the end-to-end CLI tests (tests/test_cli.py).

Builds, once per test session and fully offline, a tiny Llama model (plus a byte-level BPE
tokenizer saved next to it), a second tiny model with other weights, and an untrained MEND
editor for the first model whose step α is large enough that one edit visibly moves
log p(target). Each test then gets a fresh workspace (`mendctl init` + a rewritten
mendctl.yaml) and runs the command line.

`run_cli` / `Ws.run` run the click command in this process by default (click's CliRunner on
`mendctl.cli.main`, with the working directory, environment and sys.argv a real run would
have): a real `python -m mendctl` pays seconds of torch/transformers import and model load.
Tests marked `@pytest.mark.subprocess` (the full suite: `pytest --full`) run every command as a
real OS process instead (tests/conftest.py switches `REAL_PROCESS` on for them), and so does
`real_process=True`.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mendctl.edit import edit  # noqa: E402

# Keep the subprocesses (and this process) small: the machine may be shared.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
              "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
              "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
for _k, _v in THREAD_ENV.items():
    os.environ.setdefault(_k, _v)

CORPUS = [
    "The capital of France is Paris.",
    "The capital of Italy is Rome.",
    "The capital of Spain is Madrid.",
    "Who is India's PM? Narendra Modi.",
    "The Eiffel Tower is in Paris.",
    "Where in the US is Raleigh? North Carolina.",
    "The quick brown fox jumps over the lazy dog.",
    "Water boils at one hundred degrees.",
    "The sun rises in the east and sets in the west.",
    "Alice was beginning to get very tired of sitting by her sister on the bank.",
]
EOS = "<|endoftext|>"
PAD = "<pad>"
INIT_ALPHA = 10.0  # untrained editor = a gradient step of this size: moves log p(target) by nats


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   bos_token=EOS, unk_token=None)
    fast.save_pretrained(str(out))
    return fast


def build_model(out: Path, seed: int, vocab_size: int, tok) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():  # larger random weights than the default init: a less flat model
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def load_fp32(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return m.eval()


def build_editor(model_dir: Path, out: Path, init_alpha: float = INIT_ALPHA) -> Path:
    import torch

    from mendctl.editors.mend.editor import MendConfig, MendEditor
    from mendctl.editors.weights import select_weights
    from mendctl.models import weights_hash

    model = load_fp32(model_dir)
    torch.manual_seed(0)
    specs = select_weights(model, ["auto"])
    editor = MendEditor(specs, MendConfig(rank=8, norm=False, init_alpha=init_alpha))
    editor.save(out, info={"base_model": {"hash": weights_hash(model)}})
    return out


@dataclass
class TinyAssets:
    root: Path
    model_dir: Path
    model2_dir: Path
    editor_dir: Path


def build_assets(root: Path) -> TinyAssets:
    root.mkdir(parents=True, exist_ok=True)
    tok_dir = root / "tokenizer"
    tok = build_tokenizer(tok_dir)
    vocab = len(tok)
    m1 = build_model(root / "tiny-llama", 1234, vocab, tok)
    m2 = build_model(root / "tiny-llama-other", 4321, vocab, tok)
    ed = build_editor(m1, root / "tiny-editor")
    return TinyAssets(root, m1, m2, ed)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> TinyAssets:
    return build_assets(tmp_path_factory.mktemp("tiny-assets"))


# -- running the CLI ------------------------------------------------------------------------------
@dataclass
class Result:
    args: list
    returncode: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)

    def __str__(self):
        return (f"mendctl {' '.join(map(str, self.args))} -> {self.returncode}\n"
                f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}")


def cli_env(cache_dir: Path, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(THREAD_ENV)
    env.pop("MENDCTL_WORKSPACE", None)
    env["MENDCTL_CACHE"] = str(cache_dir)
    env.update(extra or {})
    return env


def cli_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "mendctl", *map(str, args)]


# Run every command as a real `python -m mendctl` process (set for tests marked `subprocess`).
REAL_PROCESS = False


def run_cli(*args, cwd: Path, cache_dir: Path, timeout: float = 120, env: dict | None = None,
            real_process: bool | None = None) -> Result:
    """`mendctl ARGS` in `cwd`, with MENDCTL_CACHE=cache_dir and `env` on top of this
    process's environment. In this process by default (`timeout` is then not enforced); as a
    real subprocess with `real_process=True` or inside a test marked `subprocess`."""
    if real_process if real_process is not None else REAL_PROCESS:
        p = subprocess.run(cli_cmd(*args), cwd=str(cwd), env=cli_env(cache_dir, env),
                           capture_output=True, text=True, timeout=timeout)
        return Result(list(args), p.returncode, p.stdout, p.stderr)
    return _run_in_process(list(args), Path(cwd), cli_env(cache_dir, env))


def _main_path() -> str:
    import mendctl

    # what sys.argv[0] is under `python -m mendctl`
    return str(Path(mendctl.__file__).with_name("__main__.py"))


def _run_in_process(args: list, cwd: Path, env: dict) -> Result:
    """The click command in this process, as `python -m mendctl ARGS` would run it: in `cwd`,
    with exactly the environment `env` (os.environ is changed for the call and restored),
    sys.argv set (the ledger records it as the command), stdout and stderr captured apart.
    An uncaught exception other than SystemExit exits 1 with its traceback on stderr, as
    Python prints it, so `one_line_error` still catches bugs."""
    import gc

    from click.testing import CliRunner

    from mendctl.cli import main

    argv = [str(a) for a in args]
    changes: dict = {k: v for k, v in env.items() if os.environ.get(k) != v}
    changes.update({k: None for k in os.environ if k not in env})  # None: unset for the call
    old_cwd, old_argv = os.getcwd(), sys.argv
    os.chdir(cwd)
    sys.argv = [_main_path(), *argv]
    try:
        res = CliRunner().invoke(main, argv, env=changes, prog_name="mendctl", catch_exceptions=True)
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    stdout, stderr, code = res.stdout, res.stderr, res.exit_code
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        tb = "".join(traceback.format_exception(*res.exc_info))
        stderr += tb if "Traceback" in tb else "Traceback (most recent call last):\n" + tb
        code = 1
    # A real process closes its ledger connections and frees its model when it exits; the
    # command line never closes the Workspace it opened, so collect it now.
    gc.collect()
    return Result(list(args), code, stdout, stderr)


@dataclass
class Ws:
    """A fresh workspace wired to the tiny model and editor."""

    root: Path
    assets: TinyAssets
    cache_dir: Path
    config: dict = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.root / ".mendctl"

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.db"

    @property
    def objects_dir(self) -> Path:
        return self.state_dir / "deltas" / "objects"

    @property
    def tmp_dir(self) -> Path:
        return self.state_dir / "deltas" / "tmp"

    def run(self, *args, timeout: float = 120, env: dict | None = None,
            real_process: bool | None = None) -> Result:
        return run_cli(*args, cwd=self.root, cache_dir=self.cache_dir, timeout=timeout, env=env,
                       real_process=real_process)

    def ok(self, *args, **kw) -> Result:
        r = self.run(*args, **kw)
        assert r.returncode == 0, str(r)
        return r

    def write_config(self, **changes) -> None:
        import yaml

        self.config.update(changes)
        (self.root / "mendctl.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))

    def delta_files(self) -> list[Path]:
        if not self.objects_dir.is_dir():
            return []
        return sorted(p for p in self.objects_dir.rglob("*") if p.is_file())

    def all_files(self) -> set[str]:
        """Every file under the workspace except the SQLite side files and caches."""
        return {p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()}

    def delta_path(self, sha: str) -> Path:
        return self.objects_dir / sha[:2] / f"{sha}.safetensors"

    def ledger_count(self) -> int:
        if not self.ledger_path.exists():
            return 0
        con = sqlite3.connect(self.ledger_path)
        try:
            return con.execute("select count(*) from entries").fetchone()[0]
        finally:
            con.close()


# The tiny editor is untrained: most of its edits do not make the target the answer, which
# `mendctl edit` refuses to record by default. The tests of everything else record them
# (`keep_failed: true`); tests/test_hardening.py covers the refusal itself. The tiny model's
# edited weights start at block 1, below the default gate layer: its workspaces make plain
# weight edits, and the routing tests set `routing` themselves (gate layer 1).
TINY_CONFIG = {"keep_failed": True, "routing": False}


def make_workspace(root: Path, assets: TinyAssets, cache_dir: Path, **config) -> Ws:
    r = run_cli("init", root, cwd=root.parent, cache_dir=cache_dir)
    assert r.returncode == 0, str(r)
    ws = Ws(root, assets, cache_dir, {})
    ws.write_config(model=str(assets.model_dir), editor=str(assets.editor_dir),
                    model_cache=str(cache_dir / "models"), **(TINY_CONFIG | config))
    return ws


def init_workspace_inprocess(root: Path, assets: TinyAssets, cache_dir: Path, **config) -> Ws:
    """Like make_workspace, without the cost of a subprocess for `mendctl init`."""
    from mendctl.workspace import Workspace

    Workspace.init(root)
    ws = Ws(root, assets, cache_dir, {})
    ws.write_config(model=str(assets.model_dir), editor=str(assets.editor_dir),
                    model_cache=str(cache_dir / "models"), **(TINY_CONFIG | config))
    return ws


@pytest.fixture
def fresh_ws(tiny_assets, tmp_path) -> Ws:
    cache = tmp_path / "cache"
    cache.mkdir()
    return init_workspace_inprocess(tmp_path / "ws", tiny_assets, cache)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_line_error(r: Result) -> str:
    """Assert the CLI failed the way a user should see it: non-zero, one `error:` line, no
    traceback; return that line."""
    assert r.returncode != 0, str(r)
    assert "Traceback" not in r.stderr, str(r)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    errs = [l for l in lines if l.startswith("error: ")]
    assert len(errs) == 1, str(r)
    return errs[0]


def clone_workspace(src: Ws, dest: Path) -> Ws:
    """A copy of a workspace (ledger, deltas, caches) at `dest`; no process may be using src."""
    import shutil

    shutil.copytree(src.root, dest)
    return Ws(dest, src.assets, src.cache_dir, dict(src.config))


# The three facts of the shared chain of edits (entries 1, 2, 3).
CHAIN = [("The capital of France is", "Rome"),
         ("The Eiffel Tower is in", "Madrid"),
         ("Water boils at", "fifty degrees")]


@dataclass
class Chain:
    ws: Ws
    log: list  # the ledger's entries as `log --json` gives them, oldest first

    def entry(self, i: int) -> dict:
        return next(e for e in self.log if e["id"] == i)


@pytest.fixture(scope="module")
def chain(tiny_assets, tmp_path_factory) -> Chain:
    """A workspace with three edits; tests clone it.

    The edits are made with the library in this process (one model load instead of three
    subprocesses); `test_edit_log_show_ask_and_dry_run` covers `mendctl edit` itself, and
    every test that uses the chain drives it through the CLI."""
    from mendctl.editors.data import EditCase
    from mendctl.workspace import Workspace

    root = tmp_path_factory.mktemp("chain")
    cache = root / "cache"
    cache.mkdir()
    ws = init_workspace_inprocess(root / "ws", tiny_assets, cache)
    w = Workspace.open(str(ws.root))
    try:
        for x, y in CHAIN:
            edit(w, [EditCase(input=x, target=y)], command=f"mendctl edit --input {x!r} --target {y!r}")
        head = w.head()
        log = [e.to_dict() | {"active": e.id in head.active_ids}
               for e in w.ledger.entries(reverse=False)]
    finally:
        w.ledger.close()
    assert [e["kind"] for e in log] == ["edit"] * 3
    return Chain(ws, log)
