"""Routed edits in a workspace (`routing` in mendctl.yaml; the mechanism is editors/route.py).

A routed entry's delta is not added to the weights: it acts, through forward hooks, only on
inputs that mention the edit's subject (its gate). This module owns what the workspace needs
for that:
- the settings an entry was made with (`routing` in its notes: gate layer, key cut, τ, margin,
  gate words, step), so a later change of mendctl.yaml never changes an existing state;
- the workspace's gate space (the bank of ordinary prompts' states at the gate layer), computed
  once from the bundled train split and cached in .mendctl/gates, its standardisation also
  recorded in the ledger by the first routed edit (what states are loaded with);
- each routed entry's gate, recomputed from its prompt (deterministic: the gate layer lies
  below every edited weight, so no edit moves it), with a digest recorded at edit time;
- the hash of a state with routed entries: the plain weights' hash, each routed entry's delta
  and gate, and the gate space's standardisation, so `replay --verify` checks all that routing
  applies;
- installing the hooks for a state (`Router.install`), kept until the state changes.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from .config import ROUTING_DEFAULTS as DEFAULTS  # noqa: F401  (re-exported)
from .editors.data.build import load_split
from .editors.delta import Delta, state_hash
from .editors.route import (Gate, GateSpace, RoutedEdit, edit_gate, gate_space, route_all,
                            routed, same_names, subject_in, token_frequencies)
from .editors.text import render_prompt
from .editors.weights import _BLOCK
from .errors import ConfigError
from .models import default_cache_dir

#: the gate-space bank: the first train-split prompts and paraphrases (never edited by a test)
BANK_PROMPTS, BANK_PARAPHRASES = 600, 300


def of(entry) -> dict | None:
    """The routing settings `entry` was made with (None: a plain weight edit)."""
    return entry.record.routing if entry is not None else None


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def gate_digest(gate: Gate) -> str:
    """sha256 over a gate's keys, words, closing text, rules (`fold`, `every`), aliases and
    relation keys (`select`): what an entry records and a state's hash covers (gates made before each
    of these hash as they always did)."""
    parts = [_digest(gate.keys), list(gate.words)] + ([gate.until] if gate.until else []) \
        + (["fold"] if gate.fold else []) \
        + (["every"] if gate.every else []) \
        + ([{"aliases": [list(a) for a in gate.aliases]}] if gate.aliases else []) \
        + ([{"relation": _digest(gate.relation)}
            | ({"weight": _digest(gate.relation_weight)} if gate.relation_weight is not None else {})]
           if gate.relation is not None else [])
    # (gates made before a rule hash as they did)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def encode_keys(keys: torch.Tensor) -> str:
    """A gate's keys as recorded with its entry: float32, little-endian, base64."""
    return base64.b64encode(keys.detach().to("cpu", torch.float32).contiguous().numpy()
                            .astype("<f4").tobytes()).decode("ascii")


def decode_keys(data: str, dim: int) -> torch.Tensor:
    """The keys `encode_keys` recorded, as a (keys, dim) tensor."""
    raw = np.frombuffer(base64.b64decode(data), dtype="<f4").copy()
    return torch.from_numpy(raw).reshape(-1, dim)


def recorded_gate(s: dict, gate: Gate) -> dict:
    """What a routed entry records of its gate besides its settings `s`: its words, number of
    keys, digest and the keys themselves, and its relation keys and aliases where it has them
    (`Router.gate` reads them back: a later release of the aliases' source changes no gate)."""
    out = {**s, "gate_words": list(gate.words), "gate_keys": len(gate.keys),
           "gate_sha256": gate_digest(gate), "gate_key_data": encode_keys(gate.keys)}
    if gate.aliases:
        out["gate_aliases"] = [list(a) for a in gate.aliases]
    if gate.relation is not None:
        out["gate_relation_data"] = encode_keys(gate.relation)
        if gate.relation_weight is not None:
            out["gate_relation_weight_data"] = encode_keys(gate.relation_weight)
    return out


def _copy_atomic(src: Path, dest: Path) -> None:
    """Copy `src` to `dest` under a per-process name, then rename (best effort: a cache)."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(f".tmp{os.getpid()}")
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
    except OSError:
        pass


class Router:
    """One workspace's gate spaces, gates and installed hooks."""

    def __init__(self, ws):
        self.ws = ws
        self._spaces: dict[int, GateSpace] = {}
        self._space_digests: dict[int, str] = {}
        self._gates: dict[tuple, Gate] = {}
        # routed deltas (immutable, content-addressed) and their digests, loaded once per
        # process: every state load, edit, audit state and verify step needs all of them
        self._deltas: dict[int, Delta] = {}
        self._delta_digests: dict[int, tuple[Delta, str]] = {}
        self._installed: ExitStack | None = None
        self._bank_digest: str | None = None

    # -- gate space ---------------------------------------------------------------------------
    def _bank(self) -> list[str]:
        """The ordinary prompts a gate space is computed from: openings of the bundled train
        split's inputs and paraphrases (many relations, questions and statements alike)."""
        train = load_split("train")
        return [c.input for c in train[:BANK_PROMPTS]] + \
            [c.paraphrases[0] for c in train[:BANK_PARAPHRASES] if c.paraphrases]

    def _space_path(self, layer: int) -> Path:
        lm = self.ws.lm
        d = self.ws.state_dir / "gates"
        stem = f"space-{lm.base_hash[:16]}-{self.ws.fmt}-L{layer}-{BANK_PROMPTS}-{BANK_PARAPHRASES}"
        legacy = d / f"{stem}.safetensors"
        if legacy.is_file():
            # made before the file name held the bank's digest (when the bundled data was
            # geography only): the workspace's routed states were made with it and keep it
            return legacy
        # the bank's digest in the name: a new bundled dataset makes a new space, and a shared
        # copy made from another bank is never taken for this one
        if self._bank_digest is None:
            self._bank_digest = hashlib.sha256("\n".join(self._bank()).encode()).hexdigest()[:12]
        return d / f"{stem}-{self._bank_digest}.safetensors"

    def space(self, layer: int) -> GateSpace:
        """The gate space at `layer`, from the cache file or computed (~20 s on a CPU for the
        default model: one forward over 900 prompts) and cached."""
        if layer in self._spaces:
            return self._spaces[layer]
        path = self._space_path(layer)
        # the same file may exist in the user's cache, made by another workspace on this model
        # (the name holds the base model's hash, the prompt format, layer and bank): copied in,
        # it spares a new workspace the computation. The workspace keeps its own copy, which
        # its routed states' hashes rely on wherever the workspace is moved.
        shared = self._shared_path(path)
        if not path.is_file() and shared.is_file():
            _copy_atomic(shared, path)
        space = None
        if path.is_file():
            try:
                space = GateSpace.load(path)
            except Exception:  # damaged: computed again
                space = None
        if space is not None and space.df is None:
            # a space cached before token frequencies: counted from its bank once (no model
            # needed; counts, the same on every machine) and kept in the file, its other
            # tensors unchanged
            lm = self.ws.lm
            df, docs = token_frequencies(lm.tokenizer, [render_prompt(lm.tokenizer, p, self.ws.fmt)
                                                        for p in self._bank()])
            space = dataclasses.replace(space, df=df, docs=docs)
            self._save(space, path)
        if space is None:
            lm = self.ws.lm
            # any loaded state will do: no edited weight lies at or below the gate layer
            self._check_layer(layer)
            space = gate_space(lm.model, lm.tokenizer, self._bank(), layer, self.ws.fmt)
            self._save(space, path)
            _copy_atomic(path, shared)
        recorded = self.ws.ledger.get_meta(self._space_key(layer))
        if recorded is not None:
            # the standardisation the workspace's routed states were made with (and hashed
            # over), as its ledger holds it: computed again elsewhere (another machine sharing
            # a PostgreSQL ledger, a workspace whose .mendctl/gates was lost) it would differ in
            # the last bits. The bank only chooses new gates' keys: it may be this machine's.
            both = decode_keys(recorded, space.mean.numel())
            if not (torch.equal(both[0], space.mean) and torch.equal(both[1], space.std)):
                space = dataclasses.replace(space, mean=both[0].clone(), std=both[1].clone())
        self._spaces[layer] = space
        return space

    @staticmethod
    def _save(space: GateSpace, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # written under a per-process name and renamed: another process (an `ask` needs no
        # lock) may be writing the same cache
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        space.save(tmp)
        tmp.replace(path)

    def _space_key(self, layer: int) -> str:
        return "gate_space/" + self._space_path(layer).name

    def record_space(self, session, layer: int) -> None:
        """Record the gate space's standardisation at `layer` in the ledger (once: the first
        routed edit's transaction), so the workspace's routed states load wherever its ledger
        is read, whatever the gate-space file there (`space`)."""
        key = self._space_key(layer)
        if self.ws.ledger.get_meta(key, session=session) is None:
            s = self.space(layer)
            self.ws.ledger.set_meta(key, encode_keys(torch.stack([s.mean, s.std])), session=session)

    def _shared_path(self, path: Path) -> Path:
        cache = self.ws.config.model_cache
        return (Path(cache).expanduser() if cache else default_cache_dir()) / "gates" / path.name

    def space_digest(self, layer: int) -> str:
        """sha256 of the standardisation routing applies at `layer` (the bank itself only
        chooses gate keys, which gate digests cover)."""
        if layer not in self._space_digests:
            s = self.space(layer)
            self._space_digests[layer] = hashlib.sha256((_digest(s.mean) + _digest(s.std)).encode()).hexdigest()
        return self._space_digests[layer]

    def _check_layer(self, layer: int) -> None:
        low = [s.name for s in self.ws.specs
               if (m := _BLOCK.search(s.name)) is None or int(m.group(1)) < layer]
        if low:
            raise ConfigError(f"routing: the gate layer {layer} must lie below every edited "
                              f"weight, but {low[0]} is not after it; set routing's `layer` "
                              f"lower or `edit_weights` to later blocks")

    # -- gates --------------------------------------------------------------------------------
    def gate(self, prompt: str, s: dict, target: str | None = None) -> Gate:
        """The gate of an edit of `prompt` → `target` made with settings `s` (cached per
        process). With `stop` in the settings (entries made before it have none) the gate
        closes once the target has been written (editors.route). An entry that recorded its
        gate (`gate_key_data`) gets that gate back, bit for bit, wherever it is loaded."""
        until = target if s.get("stop") else None
        # entries made before `keys`: the distinct tokens; a subject gate needs its words (a
        # name the bank knows has no state key), so without words it keys on distinct tokens
        keys = s.get("keys", "distinct") if s["words"] else "distinct"
        recorded = s.get("gate_key_data")
        select = bool(s.get("select")) and keys == "subject"
        key = (prompt, s["layer"], s["distinct"], s["words"], until, keys, recorded,
               bool(s.get("all_keys")), s.get("gate_sha256"), s.get("subject"), select,
               s.get("min_keys", 0), bool(s.get("aliases")))
        if key not in self._gates:
            lm = self.ws.lm
            self._check_layer(s["layer"])
            # (entries made before `all_keys` open on one key)
            g = edit_gate(lm.model, lm.tokenizer, self.space(s["layer"]), prompt, self.ws.fmt,
                          distinct=s["distinct"], keys=keys, every=bool(s.get("all_keys")),
                          subject=s.get("subject"), select=select,
                          # (entries made before `min_keys` keep every state key; a gate
                          # without words must keep its keys)
                          min_keys=s.get("min_keys", 0) if s["words"] else 0,
                          # (entries made before `aliases` open by their own words only)
                          aliases=bool(s.get("aliases")) and recorded is None)
            relation, weight, aliases = g.relation, g.relation_weight, g.aliases
            if recorded is not None:  # ("" for a gate of words alone)
                # the keys are states of the model: computed again on another machine (other
                # threads, BLAS or device) they differ in the last bits, and so would the
                # state's hash. Which words a gate reads may hang on those bits too.
                dim = g.keys.shape[-1]
                if "gate_relation_data" in s:
                    relation = decode_keys(s["gate_relation_data"], dim)
                    weight = (decode_keys(s["gate_relation_weight_data"], 1).flatten()
                              if "gate_relation_weight_data" in s else None)  # (unweighted)
                aliases = tuple(tuple(a) for a in s.get("gate_aliases") or ())
                g = Gate(decode_keys(recorded, dim), tuple(s.get("gate_words") or ()), None,
                         g.fold, g.every)
            g = Gate(g.keys, g.words if s["words"] else (), until, g.fold, g.every, relation, weight,
                     aliases if s["words"] else ())
            if s.get("all_keys") and s.get("gate_sha256") and gate_digest(g) != s["gate_sha256"]:
                # entries made while `all_keys` also gave distinct-token gates the every-key
                # rule (2026-12-07, seventh session) recorded that gate: they keep it
                old = dataclasses.replace(g, every=not g.every)
                if gate_digest(old) == s["gate_sha256"]:
                    g = old
            self._gates[key] = g
        return self._gates[key]

    def edits(self, entries) -> list[tuple[RoutedEdit, dict]]:
        """Each routed entry's delta and gate, with its settings, in order."""
        out = []
        for e in entries:
            s = of(e)
            gate = self.gate(e.inputs[0], s, e.targets[0])
            out.append((RoutedEdit(self.ws.load_delta(e.id, self._deltas), gate), s))
        return out

    @staticmethod
    def settings_for(case, s: dict) -> dict:
        """The routing settings of an edit of `case`: `s`, plus the subject the request names
        where its gate keys on it (subject gates, and the prompt writes that subject; see
        `editors.route.edit_gate`). The entry records them, so its gate is made the same way
        again."""
        subject = case.meta.get("subject")
        if (s.get("keys") == "subject" and s["words"] and isinstance(subject, str)
                and subject_in(case.input, subject)):
            return {**s, "subject": subject.strip()}
        return s

    def steppers(self, cases, s: dict, model, tokenizer, gates: list[Gate] | None = None):
        """(gates, apply) for new routed edits of `cases` made together: their gates (or the
        `gates` given), and the context in which their steps so far act while they take the
        next one (MendEditor.edit_apart's `apply`): each behind its own gate, as they will be
        used."""
        gates = gates if gates is not None else [self.gate(c.input, self.settings_for(c, s), c.target)
                                                 for c in cases]
        space = self.space(s["layer"])
        return gates, lambda items: routed(model, [RoutedEdit(d, gates[i]) for i, d in items],
                                           space, s["tau"], tokenizer)

    @staticmethod
    def same_subject(edits: list[tuple[RoutedEdit, dict]], gate: Gate, layer: int) -> list[int]:
        """The indexes of `edits` whose gates read the same subject as `gate`: subject gates
        (`keys: subject`) with the same names as its words, made with the same gate layer."""
        if not gate.words:
            return []
        return [k for k, (r, s) in enumerate(edits)
                if s.get("keys") == "subject" and s["layer"] == layer
                and tuple(r.gate.words) == tuple(gate.words)]

    @staticmethod
    def chosen_among(edits: list[tuple[RoutedEdit, dict]], gate: Gate, s: dict) -> list[int]:
        """The indexes of `edits` among which a new edit with `gate` and settings `s` will be
        the one chosen (`editors.route.select_open`): gates with relation keys that read the
        same names (in any case), routed with the same gate layer, τ and margin."""
        if gate.relation is None or not gate.words:
            return []
        return [k for k, (r, t) in enumerate(edits)
                if r.gate.relation is not None and same_names(r.gate, gate)
                and (t["layer"], t["tau"], t.get("margin")) == (s["layer"], s["tau"], s.get("margin"))]

    def _delta_digest(self, delta: Delta) -> str:
        if id(delta) not in self._delta_digests:  # (the entry keeps the delta, and so its id)
            self._delta_digests[id(delta)] = (delta, state_hash(delta.to_tensors()[0]))
        return self._delta_digests[id(delta)][1]

    # -- states -------------------------------------------------------------------------------
    def state_hash(self, weights_hash: str, edits: list[tuple[RoutedEdit, dict]]) -> str:
        """The hash of a state whose plain weights hash to `weights_hash` and that routes
        `edits` in order: the weights' hash itself when it routes none."""
        return self.state_hashes(weights_hash, edits, len(edits))[-1]

    def state_hashes(self, weights_hash: str, edits: list[tuple[RoutedEdit, dict]],
                     last: int) -> list[str]:
        """`state_hash` of the states routing the first k of `edits`, for each of the `last`
        largest k (in order): the states a batch of routed entries passes through, hashed in
        one walk."""
        if not edits:
            return [weights_hash]
        out = []
        h = hashlib.sha256(b"mendctl routed state\0" + weights_hash.encode())
        for k, (r, s) in enumerate(edits, start=1):
            h.update(json.dumps({"delta": self._delta_digest(r.delta), "gate": gate_digest(r.gate),
                                 "layer": s["layer"], "tau": s["tau"], "margin": s.get("margin"),
                                 "space": self.space_digest(s["layer"])}, sort_keys=True).encode())
            if k > len(edits) - last:
                out.append(h.hexdigest())
        return out

    def install(self, edits: list[tuple[RoutedEdit, dict]]) -> None:
        """Route `edits` on the workspace's model until `remove` (one routing per gate layer,
        τ and margin: edits made with other settings keep theirs)."""
        self.remove()
        if not edits:
            return
        lm = self.ws.lm
        self._installed = route_all(lm.model, edits, self.space, lm.tokenizer)

    def remove(self) -> None:
        if self._installed is not None:
            self._installed.close()
            self._installed = None

    @property
    def active(self) -> bool:
        """Are routed edits installed on the model now?"""
        return self._installed is not None

