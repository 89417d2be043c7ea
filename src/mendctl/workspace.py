"""The workspace: one directory with mendctl.yaml and .mendctl/ (ledger, delta store, caches).

`Workspace` is the library entry point the CLI calls. It opens the config, the ledger (migrated
to head) and the delta store, loads the model lazily, resolves each edit's policy (policy.py),
and answers `ask`; the operations are modules that take a workspace (edit.py, revert.py,
replay.py, export.py, verify.py, squash.py, audit.py, evaluate.py). It owns the
rule that a state is `base + Σ active deltas` in ledger order (via `editors.delta.apply_deltas`)
plus its routed edits (routing.py), checks each state's hash against the ledger, and keeps a
small cache of edited tensors keyed by state hash so loading the head is as fast as loading
the base.

Write operations hold the workspace lock and record through `recorder` (recorder.py): a crash
leaves the whole edit or nothing (at most an orphan file, which `verify` reports and `gc`
removes).
"""
from __future__ import annotations

import copy
import getpass
import os
import re
import shlex
import socket
import sys
from functools import cached_property
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import config as config_mod
from . import routing
from .config import CONFIG_FILE, STATE_DIR, Config
from .editors.data import generic_text_samples, visible
from .editors.delta import Delta, apply_deltas, state_hash
from .editors.ft import FTEditor
from .editors.mend.editor import EditorMismatch, MendEditor
from .editors.metrics import generate
from .editors.weights import read_weights, select_weights, write_weights
from .errors import EditorError, InputError, LedgerError, WorkspaceError
from .health import chain_health
from .ledger import Entry, Ledger, sqlite_url
from .locking import WorkspaceLock
from .models import ALIASES, LoadedModel, load_model
from .policy import EDITORS, EditPolicy, resolve
from .preserve import workspace_basis
from .recorder import Recorder
from .store import DeltaStore

ENV_WORKSPACE = "MENDCTL_WORKSPACE"
DELTA_KINDS = ("edit", "replay", "squash")
STATE_CACHE_KEEP = 4
#: How long a ledger write waits for SQLite's lock when `lock_timeout` is null (wait for the
#: workspace lock's holder): the ledger's own transactions last milliseconds.
LEDGER_BUSY_TIMEOUT = 60.0


def shipped_editor_dir(model_spec: str) -> Path | None:
    """The editor trained for an embedded model, shipped inside the package."""
    if model_spec not in ALIASES:
        return None
    d = resources.files("mendctl.editors") / "checkpoints" / model_spec
    return Path(str(d)) if (Path(str(d)) / "editor.json").is_file() else None


def check_text(value: str, what: str) -> str:
    if not isinstance(value, str) or not visible(value):
        raise InputError(f"the {what} is empty or only invisible characters (spaces, zero-width "
                         f"or direction marks); give some text, e.g. --input \"Who is India's "
                         f"PM?\" --target \"Narendra Modi\"")
    return value


def context_length(model) -> int | None:
    """How many tokens the model reads at most (its position embeddings), if it says."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        n = getattr(cfg, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


class Workspace:
    def __init__(self, root: Path, config: Config):
        self.root = Path(root).resolve()
        self.config = config
        self.state_dir = self.root / STATE_DIR
        self._lm: LoadedModel | None = None
        self._base: dict[str, torch.Tensor] | None = None
        self._base_hash: str | None = None
        self._loaded_state: str | None = None
        self._editors: dict[str, object] = {}
        self._preserved: dict[float, dict] = {}
        self._health: dict[str, dict] = {}

    # -- finding and creating ---------------------------------------------------------------
    @staticmethod
    def locate(explicit: str | None = None, cwd: str | Path | None = None) -> Path:
        """--workspace, then $MENDCTL_WORKSPACE, then the nearest mendctl.yaml upwards."""
        for given, source in ((explicit, "--workspace"), (os.environ.get(ENV_WORKSPACE), ENV_WORKSPACE)):
            if given:
                p = Path(given).expanduser()
                if p.is_file() and p.name == CONFIG_FILE:
                    p = p.parent
                if not (p / CONFIG_FILE).is_file():
                    raise WorkspaceError(f"{source} points to {p}, which has no {CONFIG_FILE}; "
                                         f"create one with `mendctl init {p}`")
                return p.resolve()
        here = Path(cwd or Path.cwd()).resolve()
        for d in (here, *here.parents):
            if (d / CONFIG_FILE).is_file():
                return d
        raise WorkspaceError(f"no mendctl workspace here: no {CONFIG_FILE} in {here} or above. "
                             f"Create one with `mendctl init` (or pass --workspace DIR)")

    @classmethod
    def open(cls, explicit: str | None = None) -> "Workspace":
        root = cls.locate(explicit)
        return cls(root, config_mod.load(root / CONFIG_FILE))

    @staticmethod
    def init(directory: str | Path = ".", force: bool = False, model: str | None = None,
             routing_: bool | dict | None = None) -> Path:
        d = Path(directory).expanduser().resolve()
        cfg = d / CONFIG_FILE
        if cfg.exists() and not force:
            raise WorkspaceError(f"{cfg} already exists; use --force to overwrite the config "
                                 f"(the ledger and deltas in {STATE_DIR}/ are kept)")
        if model is not None and not model.strip():
            raise InputError("--model is empty")
        # None: the template's default (the embedded model; routed edits)
        given = {k: v for k, v in (("model", model or None), ("routing", routing_)) if v is not None}
        text = config_mod.template(**given)
        config_mod.parse(__import__("yaml").safe_load(text), str(cfg))  # the template is valid
        d.mkdir(parents=True, exist_ok=True)
        (d / STATE_DIR).mkdir(exist_ok=True)
        tmp = cfg.with_suffix(".yaml.tmp")
        tmp.write_text(text)
        tmp.replace(cfg)
        return d

    # -- parts --------------------------------------------------------------------------------
    @property
    def ledger_url(self) -> str:
        return self.config.ledger or sqlite_url(self.state_dir / "ledger.db")

    @cached_property
    def ledger(self) -> Ledger:
        led = Ledger(self.ledger_url, busy_timeout=LEDGER_BUSY_TIMEOUT if self.config.lock_timeout is None
                     else self.config.lock_timeout,
                     chain=self.config.chain)
        db = led.db_path()
        if db is not None and not db.exists():
            # a new workspace, or a ledger that went missing (deleted, or a typo in `ledger:`):
            # never start an empty ledger beside deltas it would no longer know
            files = self.store.list_objects()
            if files:
                raise LedgerError(
                    f"the ledger {db} does not exist, but the delta store {self.store.root} holds "
                    f"{len(files)} delta file(s) recorded in a ledger: restore that ledger file "
                    f"(or fix `ledger:` in {self.root / CONFIG_FILE}); nothing was created")
            if not self.state_dir.is_dir():
                self.state_dir.mkdir()
        return led.open()

    @cached_property
    def store(self) -> DeltaStore:
        return DeltaStore(self.root / self.config.store)

    @cached_property
    def recorder(self) -> Recorder:
        """Where every operation records its deltas and ledger rows (all or nothing)."""
        return Recorder(self.ledger, self.store)

    def lock(self) -> WorkspaceLock:
        """The workspace's write lock (every command that changes the workspace takes it
        first). Refuses a workspace that cannot be written, before any work is done."""
        for d in (self.state_dir, self.store.root):
            probe = d if d.is_dir() else d.parent
            if probe.is_dir() and not os.access(probe, os.W_OK):
                raise WorkspaceError(
                    f"the workspace is read-only here ({probe} cannot be written): reading "
                    f"commands work (log, show, ask, verify), this one writes; run it where the "
                    f"workspace is writable")
        if self.ledger.read_only:
            raise self.ledger.read_only_error()
        if not self.state_dir.is_dir():
            self.state_dir.mkdir()
        return WorkspaceLock(self.state_dir / "lock", timeout=self.config.lock_timeout,
                             on_wait=_say_waiting)

    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            cfg = self.config
            offload = cfg.offload_folder and str(self.root / cfg.offload_folder)
            self._lm = load_model(cfg.model, cfg.model_cache, cfg.device, cfg.dtype,
                                  device_map=cfg.device_map, max_memory=cfg.max_memory,
                                  offload_folder=offload, edit_weights=cfg.edit_weights)
            try:
                self.specs = select_weights(self._lm.model, cfg.edit_weights)
            except ValueError as e:
                raise WorkspaceError(f"{self.root / CONFIG_FILE}: `edit_weights`: {e}") from e
            self._base = read_weights(self._lm.model, self.specs)
            self._base_hash = state_hash(self._base)  # the base state's hash, computed once
            self._loaded_state = None
            self._check_base_model()
        return self._lm

    @property
    def base_weights(self) -> dict[str, torch.Tensor]:
        """The edited weights as the base model has them (read once, when the model loads)."""
        _ = self.lm
        return self._base

    @property
    def base_state_hash(self) -> str:
        _ = self.lm
        return self._base_hash

    @property
    def loaded_state(self) -> str | None:
        """The hash of the state the model holds now (None: unknown, reload before use)."""
        return self._loaded_state

    def forget_loaded_state(self) -> None:
        """Say the model may hold a state no entry records (after moving it through others),
        so the next `use_state` loads its state again instead of trusting the cache."""
        self._loaded_state = None

    def _check_base_model(self) -> None:
        recorded = self.ledger.get_meta("base_model_hash")
        if recorded and recorded != self._lm.base_hash:
            rid = self.ledger.get_meta("base_model_id", "?")
            raise WorkspaceError(
                f"this workspace's ledger was made with base model {rid} ({recorded[:12]}), but "
                f"mendctl.yaml now loads {self._lm.model_id} ({self._lm.base_hash[:12]}). Put "
                f"`model: {rid}` back, or replay the edits onto the new model into a new "
                f"workspace: `mendctl replay --onto-model {self._lm.spec} --out DIR`")

    def record_base_model(self, session) -> None:
        if self.ledger.get_meta("base_model_hash", session=session) is None:
            self.ledger.set_meta("base_model_hash", self.lm.base_hash, session=session)
            self.ledger.set_meta("base_model_id", self.lm.model_id, session=session)

    @property
    def fmt(self) -> str:
        return self.config.prompt_format

    def editor_dir(self) -> Path:
        if self.config.editor == "default":
            d = shipped_editor_dir(self.config.model)
            if d is None:
                raise EditorError(f"no editor ships for model {self.config.model!r}; train one "
                                  f"(`mendctl train --out DIR`) and set `editor: DIR` in mendctl.yaml")
            return d
        p = Path(self.config.editor).expanduser()
        return p if p.is_absolute() else self.root / p

    def editor(self, name: str = "mend", step_factor: float | None = None):
        """The editor `name`; a MEND editor's α is scaled by `step_factor` (default: the
        config's), and it keeps the factor in `.step_factor` for the ledger."""
        if name not in EDITORS:
            raise InputError(f"unknown editor {name!r}; choose one of {', '.join(EDITORS)}")
        if name == "mend":
            factor = float(self.config.step_factor if step_factor is None else step_factor)
            key = f"mend@{factor!r}"
            if key not in self._editors:
                ed = copy.deepcopy(self._load_editor("mend"))
                if factor != 1.0:
                    ed.rescale(factor)
                ed.step_factor = factor
                self._editors[key] = ed
            return self._editors[key]
        return self._load_editor(name)

    def _load_editor(self, name: str):
        if name in self._editors:
            return self._editors[name]
        lm = self.lm
        if name in ("mend", "identity"):
            d = self.editor_dir()
            try:
                ed = MendEditor.load(d, self.specs, lm.base_hash)
            except EditorMismatch as e:
                raise EditorError(str(e)) from e
            fmt = ed.info.get("prompt_format") or ed.info.get("training", {}).get("prompt_format")
            if fmt and fmt != self.fmt:
                print(f"warning: editor {d} was trained with prompt_format {fmt}, the workspace "
                      f"uses {self.fmt}", file=sys.stderr)
            # the editor runs where configured, else beside the edited weights (u and δ are
            # captured there); its deltas come back to the CPU in fp32 either way
            ed.to(self.config.editor_device or lm.model.get_parameter(self.specs[0].name).device)
            # the hash of the bytes loaded, not what editor.json claims (a mismatch is refused)
            ed.sha256 = ed.weights_sha256
            ed.checkpoint = str(d)
            if name == "identity":
                sha = ed.weights_sha256
                ed = ed.to_identity()
                ed.sha256, ed.checkpoint = "identity:" + sha, str(d)
        else:
            ed = FTEditor(self.specs, kl_weight=1.0 if name == "ft_kl" else 0.0,
                          generic_texts=generic_text_samples())
            ed.sha256, ed.checkpoint = None, None
        self._editors[name] = ed
        return ed

    def policy(self, editor: str = "mend", n_facts: int = 1, max_steps: int | None = None,
               keep_failed: bool | None = None) -> EditPolicy:
        """How an edit of `n_facts` facts by `editor` is made here (policy.resolve: this
        workspace's mendctl.yaml, the given overrides, the editor checkpoint's operating point)."""
        if editor not in EDITORS:
            raise InputError(f"unknown editor {editor!r}; choose one of {', '.join(EDITORS)}")
        info = self._load_editor(editor).info if editor in ("mend", "identity") else None
        return resolve(self.config, info, editor, n_facts, max_steps, keep_failed)

    def editor_for(self, policy: EditPolicy):
        """The editor a policy edits with (MEND at the policy's step size)."""
        return self.editor(policy.editor, step_factor=policy.step_factor)

    def preserved(self, ed, cut: float | None) -> dict | None:
        """The preserved-key basis a MEND edit is kept off (the policy's `preserve_keys`, which
        is None for routed edits and FT; preserve.py), or None when off. Computing it loads
        the base state."""
        if cut is None:
            return None
        if cut not in self._preserved:
            self._preserved[cut] = workspace_basis(self, cut)
        return self._preserved[cut]

    # -- routed entries -------------------------------------------------------------------
    @cached_property
    def router(self) -> routing.Router:
        return routing.Router(self)

    def split(self, active_ids) -> tuple[list[int], list[Entry]]:
        """A state's plain entries (added to the weights) and routed ones (applied by hooks)."""
        plain, routed_ = [], []
        for i in active_ids:
            e = self.ledger.get(i)
            if routing.of(e):
                routed_.append(e)
            else:
                plain.append(i)
        return plain, routed_

    def routed_ids(self, active_ids) -> list[int]:
        """Which of `active_ids` are routed edits."""
        return [e.id for e in self.split(active_ids)[1]]

    def state_key(self, w, plain_ids, routed_edits) -> str:
        """The hash of the state with plain weights `w` (base + plain_ids) routing
        `routed_edits`: for a state without routed edits, the weights' hash."""
        wh = state_hash(w) if plain_ids else self._base_hash
        return self.router.state_hash(wh, routed_edits) if routed_edits else wh

    def state_keys(self, w, plain_ids, routed_edits, last: int) -> list[str]:
        """`state_key` of the states routing the first k of `routed_edits`, for the `last`
        largest k: the states a batch of routed entries passes through."""
        wh = state_hash(w) if plain_ids else self._base_hash
        return self.router.state_hashes(wh, routed_edits, last)

    # -- states ---------------------------------------------------------------------------
    def load_delta(self, entry_id: int, cache: dict | None = None) -> Delta:
        """Entry `entry_id`'s delta from the store (memoised in `cache` when given)."""
        if cache is not None and entry_id in cache:
            return cache[entry_id]
        e = self.ledger.get(entry_id)
        if not e.delta_sha256:
            raise LedgerError(f"entry {entry_id} is active but has no delta; run `mendctl verify`")
        d = self.store.load(e.delta_sha256)
        if cache is not None:
            cache[entry_id] = d
        return d

    def chain_weights(self, active: list[int], prev_active: list[int] | None = None,
                      prev_w: dict[str, torch.Tensor] | None = None,
                      cache: dict | None = None) -> tuple[dict[str, torch.Tensor], bool]:
        """(The plain weights of base + Σ deltas(`active`), whether anything was added.) Walking
        a chain, each state usually extends the one before by a delta: given that state's
        active ids and weights, only the new delta is added (the same sum in the same order,
        so the same bits)."""
        if prev_active is not None and list(active) == list(prev_active):
            return prev_w, False
        if prev_active is not None and active and list(active[:-1]) == list(prev_active):
            return apply_deltas(prev_w, [self.load_delta(active[-1], cache)]), True
        return apply_deltas(self.base_weights, [self.load_delta(i, cache) for i in active]), True

    def _state_cache(self, h: str) -> Path:
        return self.state_dir / "states" / f"{h}.safetensors"

    def weights_for(self, active_ids: list[int], expect_hash: str | None = None,
                    use_cache: bool = True) -> dict[str, torch.Tensor]:
        """Edited tensors of the state base + Σ deltas(active_ids), checked against the hash
        (routed entries are applied by hooks, not in these tensors: see `use_state`)."""
        _ = self.lm
        # routed entries are not in the weights; the hash covers them (routing.py)
        plain, routed_ = self.split(active_ids)
        key = (lambda w: self.state_key(w, plain, self.router.edits(routed_))) if routed_ \
            else (lambda w: state_hash(w) if plain else self._base_hash)
        if not plain:
            w = {n: t.clone() for n, t in self._base.items()}
        else:
            if use_cache and expect_hash and self._state_cache(expect_hash).is_file():
                try:
                    w = load_file(str(self._state_cache(expect_hash)))
                    if key(w) == expect_hash:
                        return w  # checked: a cache hit costs one read and one hash
                except Exception:  # a damaged cache file is just recomputed
                    pass
            w = apply_deltas(self._base, [self.load_delta(i) for i in plain])
        if expect_hash:
            got = key(w)
            if got != expect_hash:
                raise LedgerError(f"rebuilt state {got[:12]} differs from the recorded "
                                  f"{expect_hash[:12]}; run `mendctl replay --verify` and `mendctl verify`")
        return w

    def remember_state(self, w: dict[str, torch.Tensor], h: str) -> None:
        """Cache the state's tensors (best effort: a read-only workspace just loads slower)."""
        try:
            self._write_state_cache(w, h)
        except OSError:
            pass

    def _write_state_cache(self, w: dict[str, torch.Tensor], h: str) -> None:
        d = self.state_dir / "states"
        d.mkdir(parents=True, exist_ok=True)
        path = self._state_cache(h)
        if not path.exists():
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({n: t.contiguous() for n, t in w.items()}, str(tmp))
            tmp.replace(path)
        for stale in d.glob("*.tmp*"):  # left by a process killed while writing
            m = re.search(r"\.tmp(\d+)$", stale.name)
            # (another live process may be writing its own right now: `ask` takes no lock)
            if m is None or not _alive(int(m.group(1))):
                stale.unlink(missing_ok=True)
        files = sorted(d.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in files[STATE_CACHE_KEEP:]:
            old.unlink(missing_ok=True)

    def use_state(self, entry: Entry | None) -> dict[str, torch.Tensor]:
        """Put the model in the state after `entry` (None: the base model)."""
        _ = self.lm
        h = entry.state_hash if entry else self._base_hash
        if self._loaded_state == h:
            return self._current
        ids = list(entry.active_ids) if entry else []
        w = self.weights_for(ids, h)
        self.set_weights(w, h)
        plain, routed_ = self.split(ids)
        if routed_:
            self.router.install(self.router.edits(routed_))
        if plain:  # (routed entries alone leave the base's weights: nothing to cache)
            self.remember_state(w, h)
        return w

    def set_weights(self, w: dict[str, torch.Tensor], h: str) -> None:
        """Load plain weights `w` as state `h`, with no routed edit installed."""
        self.router.remove()
        write_weights(self.lm.model, w)
        self._loaded_state, self._current = h, w

    def generate_answers(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy answers in the loaded state, as shown to users (never blank: see
        metrics.generate); with routed edits installed, prompts of equal token length together
        and never padded (a padded first token would move the gates)."""
        lm = self.lm
        return generate(lm.model, lm.tokenizer, prompts, self.fmt, max_new_tokens,
                        unpadded=self.router.active, say_something=True)

    def head(self) -> Entry | None:
        return self.ledger.head()

    def entry_at(self, at: int | None) -> Entry | None:
        return self.head() if at is None else self.ledger.get(at)

    # -- ask ------------------------------------------------------------------------------------
    def ask(self, prompts: list[str], at: int | None = None, max_new_tokens: int = 16) -> dict:
        for p in prompts:
            check_text(p, "input")
        _ = self.lm  # a bad model fails here, before the ledger is created
        self.check_sizes([("input", p) for p in prompts], [], new_tokens=max_new_tokens)
        entry = self.entry_at(at)
        self.use_state(entry)
        answers = self.generate_answers(prompts, max_new_tokens)
        return {"state": entry.id if entry else None,
                "state_hash": self._loaded_state, "model": self.lm.model_id,
                "answers": [{"input": p, "answer": a} for p, a in zip(prompts, answers)]}

    def check_sizes(self, prompts: list[tuple[str, str]], targets: list[str],
                    new_tokens: int = 0) -> None:
        """Refuse, before any work, prompts and targets longer than the limits: a target of
        `max_target_tokens`, a prompt of `max_input_tokens` and never more than the model
        reads with the target (or `new_tokens` generated) after it. Long text costs memory
        and time that grow with its length (one 20,000-character input took 9 GB)."""
        tok = self.lm.tokenizer
        n_tokens = lambda t: len(tok(t, add_special_tokens=False).input_ids)  # noqa: E731
        where = self.root / CONFIG_FILE
        longest = 0
        for t in targets:
            n = n_tokens(t)
            longest = max(longest, n)
            if n > self.config.max_target_tokens:
                raise InputError(f"the target {clip_text(t)} is {n} tokens long; an edit's target may "
                                 f"have at most {self.config.max_target_tokens} tokens "
                                 f"(`max_target_tokens` in {where}): give the new answer itself")
        ctx = context_length(self.lm.model)
        if ctx is not None and new_tokens >= ctx:
            raise InputError(f"--max-new-tokens {new_tokens} is more than the model reads "
                             f"({ctx} tokens, prompt included); ask for fewer")
        limit = self.config.max_input_tokens
        room = max(longest, new_tokens)
        if ctx is not None and ctx - room < limit:
            limit = ctx - room
        for what, p in prompts:
            n = n_tokens(p)
            if n > limit:
                raise InputError(
                    f"the {what} {clip_text(p)} is {n} tokens long; the limit is {limit} tokens "
                    f"(`max_input_tokens` in {where}" + (f", and the model reads at most {ctx} "
                                                         f"tokens with the answer" if ctx else "")
                    + "): shorten it")

    # -- edit -----------------------------------------------------------------------------------

    def health_of(self, w: dict[str, torch.Tensor], ref, state: str,
                      after: tuple[str, list[int]] | None = None) -> dict:
        """`chain_health` of the loaded state `state`, remembered by its hash: in a sequence of
        edits the state before an edit is the one after the previous, measured already.
        `after` = (the state before, the prompts the new routed edit opens on): only those
        are scored again, when the state before was measured."""
        if state not in self._health:
            prev = self._health.get(after[0]) if after else None
            h, agree = chain_health(self, w, ref, previous=prev[1] if prev else None,
                                    changed=after[1] if prev else None)
            self._health = {state: (h, agree)}  # (the latest state only)
        return self._health[state][0]

    def pairs_of(self, entry_id: int) -> list[tuple[str, str]]:
        e = self.ledger.get(entry_id)
        return list(zip(e.inputs or [], e.targets or []))

    def provenance(self, command: str | None) -> dict:
        try:
            user = getpass.getuser()
        except Exception:  # no passwd entry in some containers
            user = os.environ.get("USER", "?")
        return {"user": user, "host": socket.gethostname(),
                "command": command or " ".join(shlex.quote(a) for a in sys.argv)}


def _alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (this one's own included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def _say_waiting(holder: dict | None) -> None:
    """Tell the user a command is waiting for the workspace lock, and for whom."""
    who = "another mendctl process" if holder is None else (
        f"process {holder.get('pid')} on {holder.get('host')} (`{holder.get('command')}`, since "
        f"{holder.get('since')})")
    print(f"waiting for the workspace lock, held by {who}; this command goes on when that one "
          f"ends (Ctrl-C stops waiting)", file=sys.stderr, flush=True)


def clip_text(text: str, n: int = 40) -> str:
    """A long text as messages show it: its start, quoted."""
    return repr(text if len(text) <= n else text[:n] + "…")


