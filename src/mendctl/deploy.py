"""Routed states outside mendctl: the file an `export --format hf` of a routed state writes beside
the checkpoint, and `load_edited`, which loads such a directory as a regular transformers model
with the routed edits installed.

A routed edit is not a change of weights (editors/route.py): its low-rank ΔW acts, through
forward hooks, only on inputs that name its subject. So an export of a routed state is the
plain weights (base + the state's weight edits) as an ordinary Hugging Face checkpoint, plus
`mendctl-routes.safetensors`: each routed edit's delta (its factors exactly as the store holds
them), its gate (keys, words, the target that closes it, the relation's keys) and settings,
and the gate layer's standardisation. Tensors and JSON metadata only: no pickle, no code in
the directory, nothing for `trust_remote_code`.

    from mendctl import load_edited
    model, tokenizer = load_edited("edited-model")
    ids = tokenizer("Who is India's PM?", return_tensors="pt").input_ids
    model.generate(ids, max_new_tokens=16, do_sample=False)   # what `mendctl ask` answers

Routing reads whole sequences, so the model generates without a KV cache (set on its
generation config) and batches must be right-padded or unpadded.
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .editors.delta import Delta
from .editors.route import Gate, GateSpace, RoutedEdit, mark_answer_starts, route_all
from .errors import ModelError

ROUTES_FILE = "mendctl-routes.safetensors"
#: version 2 adds gates whose words match in any case (`fold`), version 3 gates opened by all
#: their keys (`every`), version 4 gates chosen among a subject's by their relation keys
#: (`relation`), version 5 gates that other names of their subject open too (`aliases`); a
#: file without them is written as the version before, which mendctl before them reads the same
FORMAT, FORMAT_VERSION = "mendctl.routes", 5


def write_routes(path: str | Path, edits: list[tuple[RoutedEdit, dict]],
                 spaces: dict[int, GateSpace], entries: list[int]) -> Path:
    """Write the routed edits `edits` (with their settings, in order; `entries` their ledger
    ids) and the gate spaces they use to one safetensors file."""
    tensors, records = {}, []
    for k, ((r, s), entry) in enumerate(zip(edits, entries)):
        t, meta = r.delta.to_tensors()
        tensors.update({f"edit{k}/{name}": v for name, v in t.items()})
        tensors[f"edit{k}/gate.keys"] = r.gate.keys.detach().float().cpu().contiguous()
        if r.gate.relation is not None:
            tensors[f"edit{k}/gate.relation"] = r.gate.relation.detach().float().cpu().contiguous()
            if r.gate.relation_weight is not None:
                tensors[f"edit{k}/gate.relation_weight"] = \
                    r.gate.relation_weight.detach().float().cpu().contiguous()
        records.append({"entry": entry, "delta_meta": meta, "words": list(r.gate.words),
                        "until": r.gate.until, "layer": s["layer"], "tau": s["tau"],
                        "margin": s.get("margin")} | ({"fold": True} if r.gate.fold else {})
                       | ({"every": True} if r.gate.every else {})
                       | ({"aliases": [list(a) for a in r.gate.aliases]} if r.gate.aliases else {}))
    selecting = any(r.gate.relation is not None for r, _ in edits)
    docs = {}
    for layer, space in spaces.items():
        tensors[f"space{layer}/mean"] = space.mean.float().contiguous()
        tensors[f"space{layer}/std"] = space.std.float().contiguous()
        if selecting and space.df is not None:  # (the choice among a subject's gates weighs
            tensors[f"space{layer}/df"] = space.df.contiguous()  # tokens by their idf)
            docs[str(layer)] = space.docs
    path = Path(path)
    version = 5 if any(r.gate.aliases for r, _ in edits) else \
        4 if selecting else \
        3 if any(r.gate.every for r, _ in edits) else \
        2 if any(r.gate.fold for r, _ in edits) else 1
    save_file(tensors, str(path), metadata={"format": FORMAT, "format_version": str(version),
                                            "edits": json.dumps(records)}
              | ({"docs": json.dumps(docs)} if docs else {}))
    return path


def read_routes(path: str | Path) -> list[tuple[RoutedEdit, dict]]:
    """The routed edits of a routes file, each with its settings and its gate space."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT or int(meta.get("format_version", "0")) > FORMAT_VERSION:
            raise ModelError(f"{path} is not a routes file this mendctl reads; export the state "
                             f"again with this mendctl")
        t = {k: f.get_tensor(k) for k in f.keys()}
    spaces = {}
    docs = json.loads(meta.get("docs", "{}"))
    out = []
    for k, rec in enumerate(json.loads(meta["edits"])):
        prefix = f"edit{k}/"
        delta = Delta.from_tensors({n[len(prefix):]: v for n, v in t.items()
                                    if n.startswith(prefix)
                                    and n[len(prefix):] not in
                                    ("gate.keys", "gate.relation", "gate.relation_weight")},
                                   rec["delta_meta"])
        layer = rec["layer"]
        if layer not in spaces:
            mean, std = t[f"space{layer}/mean"], t[f"space{layer}/std"]
            spaces[layer] = GateSpace(layer, mean, std, torch.empty(0, mean.numel()),
                                      frozenset(), frozenset(), t.get(f"space{layer}/df"),
                                      int(docs.get(str(layer), 0)))
        gate = Gate(t[prefix + "gate.keys"], tuple(rec["words"]), rec["until"], rec.get("fold", False),
                    rec.get("every", False), t.get(prefix + "gate.relation"),
                    t.get(prefix + "gate.relation_weight"),
                    tuple(tuple(a) for a in rec.get("aliases", ())))
        out.append((RoutedEdit(delta, gate), {"layer": layer, "tau": rec["tau"],
                                              "margin": rec["margin"], "space": spaces[layer]}))
    return out


def install_routes(model, tokenizer, edits: list[tuple[RoutedEdit, dict]]) -> ExitStack:
    """Install `edits` on `model` (one routing per gate layer, τ and margin) until the returned
    stack is closed, and tell routing where generated answers start: in a generation without a
    KV cache every step runs the whole sequence, one token longer than the step before, so a
    forward that extends the previous one by a token continues its answer; any other starts
    anew (its every token is prompt)."""
    spaces = {s["layer"]: s["space"] for _, s in edits}
    seen: dict[str, torch.Tensor | list[int] | None] = {"ids": None, "starts": None}

    def track(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        prev = seen["ids"]
        if not (prev is not None and ids.shape[0] == prev.shape[0] and ids.shape[1] == prev.shape[1] + 1
                and torch.equal(ids[:, :-1].cpu(), prev)):
            seen["starts"] = [ids.shape[1]] * ids.shape[0]
        seen["ids"] = ids.detach().cpu()
        mark_answer_starts(seen["starts"])

    stack = ExitStack()
    try:
        stack.callback(model.register_forward_pre_hook(track, with_kwargs=True).remove)
        stack.enter_context(route_all(model, edits, spaces.__getitem__, tokenizer))
    except BaseException:
        stack.close()
        raise
    return stack


def load_edited(directory: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of an exported state: a transformers model loaded from `directory`
    (never running code from it) with the state's routed edits installed, if it has any. The
    hooks live as long as the model (`model.mendctl_routes.close()` removes them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype,
                                                     trust_remote_code=False).to(device).eval()
    except Exception as e:  # transformers raises many types for a bad directory
        raise ModelError(f"cannot load {directory}: {type(e).__name__}: {e}; is it a directory "
                         f"written by `mendctl export --format hf`?") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    routes = directory / ROUTES_FILE
    if routes.is_file():
        model.mendctl_routes = install_routes(model, tok, read_routes(routes))
        model.generation_config.use_cache = False  # routing reads whole sequences
    return model, tok
