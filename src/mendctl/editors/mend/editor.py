"""The MEND editor: networks per weight shape, learned steps α_ℓ, the edit (Algorithm 2), and
the editor checkpoint (safetensors + JSON, no pickle).

`MendEditor.edit(model, tokenizer, prompts, targets)` captures (u, δ) for every edited weight,
maps them through g_ℓ, and returns a `Delta` holding the factors ũ, δ̃ and α_ℓ; ΔW_ℓ =
−α_ℓ Σ_i δ̃_i ũ_iᵀ is never built here. Several (prompt, target) pairs make one batched edit.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from ..delta import Delta, LayerDelta
from ..text import encode_pairs
from ..metrics import edit_success, locality_reference, locality_scores
from ..weights import WeightSpec, applied, input_device
from .capture import capture_edit_gradients, pair_owners
from .network import GradientTransform
from .protect import key_basis, project_off, union

FORMAT = "mendctl.editor"
FORMAT_VERSION = 1
WEIGHTS_FILE = "editor.safetensors"
CONFIG_FILE = "editor.json"
PROTECT_ENERGY = 0.9  # share of the protected keys' energy the retention guard spans


class EditorMismatch(ValueError):
    """The checkpoint was trained for other weights or another base model."""


@dataclass
class MendConfig:
    rank: int = 256
    norm: bool = True
    init_alpha: float = 1e-4

    def __post_init__(self):
        self.rank, self.init_alpha = int(self.rank), float(self.init_alpha)
        if self.rank < 1:
            raise ValueError("rank must be ≥ 1")
        if self.init_alpha <= 0:
            raise ValueError("init_alpha must be > 0")


class MendEditor(nn.Module):
    """g_ℓ for every edited weight (one network per unique shape) and one α per weight."""

    name = "mend"

    def __init__(self, specs: list[WeightSpec], config: MendConfig | None = None):
        super().__init__()
        self.config = config or MendConfig()
        self.specs = list(specs)
        groups: dict[str, list[WeightSpec]] = {}
        for s in self.specs:
            groups.setdefault(s.key, []).append(s)
        self.nets = nn.ModuleDict({
            key: GradientTransform(ss[0].in_features, ss[0].out_features, self.config.rank,
                                   len(ss), norm=self.config.norm)
            for key, ss in groups.items()})
        self._where = {s.name: (s.key, [x.name for x in groups[s.key]].index(s.name))
                       for s in self.specs}
        self.alpha = nn.Parameter(torch.full((len(self.specs),), self.config.init_alpha))
        self.info: dict = {}
        #: sha256 of the editor.safetensors bytes this editor was loaded from (None: built here)
        self.weights_sha256: str | None = None

    def net_for(self, name: str) -> nn.Module:
        """The network (with its normalisation statistics) that serves weight `name`."""
        return self.nets[self._where[name][0]]

    # -- the edit ---------------------------------------------------------------------------
    def factors(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """{name: (ũ, δ̃, α)} from {name: (u, δ)}; differentiable w.r.t. the editor."""
        out = {}
        for i, s in enumerate(self.specs):
            u, d = pairs[s.name]
            key, layer = self._where[s.name]
            net = self.nets[key]
            net.observe(u, d)
            pu, pd = net(u, d, layer)
            out[s.name] = (pu, pd, self.alpha[i])
        return out

    def delta_from_factors(self, factors: dict, meta: dict | None = None) -> Delta:
        layers = {}
        for s in self.specs:
            pu, pd, a = factors[s.name]
            layers[s.name] = LayerDelta(s.name, s.shape, u=pu.detach().float().contiguous(),
                                        d=pd.detach().float().contiguous(),
                                        alpha=a.detach().float().reshape(()).clone(),
                                        transposed=s.transposed)
        return Delta(layers, dict(meta or {}))

    @torch.no_grad()
    def _eval_factors(self, pairs):
        was = self.training
        self.eval()
        try:
            return self.factors(pairs)
        finally:
            self.train(was)

    def edit(self, model: nn.Module, tokenizer, prompts: list[str], targets: list[str],
             fmt: str = "raw", locality: list[str] | None = None, max_steps: int = 1,
             max_norm: float | None = None, protect: list[tuple[str, str]] | None = None,
             protect_energy: float = PROTECT_ENERGY, preserve: dict | None = None,
             apply=None) -> Delta:
        """Algorithm 2 for one (batched) edit; returns the factors as a Delta. (`locality` is
        part of the common editor interface; MEND does not need it at edit time.)

        `max_steps` > 1 repeats the edit on the model with the delta so far applied until every
        target token is the argmax (or the steps run out); the steps' factors are stacked, so
        the result is still one exact low-rank delta. One step is the paper's protocol.

        `max_norm` guards drift: a step whose total ‖ΔW‖_F (all weights together) exceeds it
        is scaled, every layer by the same factor, down to it (meta `norm_scale`: the smallest
        factor applied); further steps may still follow. Far into a chain of edits the
        model's gradients leave the range the editor was trained on and its ΔW grows by
        orders of magnitude, each such edit damaging the model further
        (docs/sequential.png); scaling keeps the step's direction and breaks that loop.

        `protect` is the retention guard: (prompt, target) pairs of earlier edits, whose keys
        on the model as it is now span a subspace every step's ũ is projected off
        (protect.py), so this edit leaves their outputs alone. Meta `protected_rank`: the
        largest subspace dimension over the weights.

        `preserve` ({weight name: orthonormal basis}, protect.preserved_basis) keeps every
        step's ũ off those directions too (the union with the protected keys' span).

        `apply(delta)` is the context in which the steps so far act on the model for the next
        step (default: added to the weights, `applied`); routed edits (editors/route.py) pass
        one that gates them as they will be gated in use, so the steps go on until the edit
        holds there."""
        t0 = time.perf_counter()
        apply = apply or (lambda d: applied(model, d))
        device = input_device(model)
        batch = encode_pairs(tokenizer, prompts, targets, fmt).to(device)
        basis = {}
        if protect:
            basis = key_basis(model, tokenizer, self.specs, [p for p, _ in protect],
                              [t for _, t in protect], fmt, energy=protect_energy)
        protected_rank = max((b.shape[1] for b in basis.values()), default=None)
        if preserve:
            basis = {s.name: union(basis.get(s.name), preserve.get(s.name)) for s in self.specs}
        delta, first_loss, steps = None, None, 0
        scales: list[float] = []  # the guard's factors, one per scaled step
        for steps in range(1, max_steps + 1):
            ctx = apply(delta) if delta is not None else nullcontext()
            with ctx:
                # from the second step on, the capture's forward also tells whether the steps
                # so far already make the edit hold (no separate success check)
                pairs, loss, *_ = capture_edit_gradients(model, self.specs, batch,
                                                         success=delta is not None)
            if pairs is None:
                steps -= 1
                break
            first_loss = loss if first_loss is None else first_loss
            pairs = {n: (u.to(self.alpha.device), d.to(self.alpha.device)) for n, (u, d) in pairs.items()}
            factors = self._eval_factors(pairs)
            if basis:
                factors = {n: (project_off(pu, basis.get(n)), pd, a) for n, (pu, pd, a) in factors.items()}
            step = self.delta_from_factors(factors, {"editor": self.name})
            if max_norm is not None:
                size = _total_norm(step)
                if size > max_norm:
                    scale = max_norm / size
                    for layer in step.layers.values():
                        layer.d.mul_(scale)  # ΔW = −α Σ δ̃ ũᵀ is linear in δ̃
                    scales.append(scale)
            delta = step if delta is None else _stack(delta, step)
        if steps > 1:  # the steps' rows mostly repeat one another's directions
            delta = delta.compacted()
        delta.meta["edit_loss_before"] = f"{first_loss:.6g}"
        delta.meta["edit_steps"] = str(steps)
        if scales:
            delta.meta["norm_scale"] = f"{min(scales):.6g}"
        if protected_rank is not None:
            delta.meta["protected_rank"] = str(protected_rank)
        delta.meta["compute_seconds"] = f"{time.perf_counter() - t0:.4f}"
        return delta

    def edit_apart(self, model: nn.Module, tokenizer, prompts: list[str], targets: list[str],
                   fmt: str = "raw", max_steps: int = 1, max_norm: float | None = None,
                   apply=None, rank_cut: float | None = None,
                   confidence: float | None = None,
                   contexts: list[str] | None = None, rejoin: bool = False) -> list[Delta]:
        """Many facts edited together, each into a delta of its own (routed edits: each fact
        goes behind its own gate, so each needs its own ΔW).

        Every step is one forward and backward over the facts that do not hold yet; a token's
        (u, δ) belong to its own fact (`pair_owners`), and the networks act on each row alone,
        so fact i's step is the one `edit` would take for it alone. Fact i stops as soon as it
        holds, as `edit` stops; the drift guard `max_norm` applies to each fact's step.
        `apply([(i, delta_i), ...])` is the context in which the facts' steps so far act on
        the model for the next step (routed edits: every delta behind its own gate, all
        together, as they will be used); by default their sum is added to the weights.
        With one fact this is `edit` without its guards for plain edits (protect, preserve),
        step for step.

        `rank_cut` truncates each fact's ΔW after every step to the directions whose singular
        values exceed that fraction of the largest (`Delta.compacted`), so the next step, and
        the check whether the fact holds, see the delta that will be stored.

        `confidence` raises the bar for holding: every target token is the argmax with at least
        that probability. A fact that only just became the argmax on its own wording seldom
        carries over to other wordings; a routed edit can afford the larger step, since its
        gate keeps it off other inputs (docs/results.md, confident routed edits). A fact whose
        steps run out before it is that sure, and whose last step overshot (its target no
        longer the argmax), keeps the delta of its last step under which the target was the
        argmax: a confident edit is never worse than one stopped at the argmax.

        `contexts` are prefixes under which the first step also takes each fact's gradient
        (the prompt behind each of them, besides the prompt alone: one row per wording, all
        the fact's rows summed into its ΔW), as ROME, MEMIT and WISE average over random
        prefixes: an edit learned from one wording keys on that wording's last position, and
        one learned under several contexts carries to many more rephrasings (docs/results.md,
        edits in context). Later steps take the prompt alone, which keeps the steps that
        finish the edit from overshooting. A fact whose steps run out with its target not the
        argmax (and no earlier step under which it was) is made again without contexts, so
        an edit never fails that would have held without them.

        `rejoin`: a fact that holds is still checked at every later step, and steps again if
        the other facts' steps took its answer; the steps end when all hold at once (or run
        out). Facts behind one gate need it: each fact's step moves the subject as a whole, so
        the step that makes "India's president" take can give "India's PM" its answer."""
        t0 = time.perf_counter()
        if apply is None:
            def apply(items):
                total = items[0][1]
                for _, d in items[1:]:
                    total = _stack(total, d)
                return applied(model, total)
        device = input_device(model)
        n = len(prompts)
        deltas: list[Delta | None] = [None] * n
        first: list[float | None] = [None] * n
        steps, scales = [0] * n, [[] for _ in range(n)]
        # per fact, with `confidence`: (the last delta under which its target was the argmax,
        # its steps, its guard scalings)
        held: list[tuple[Delta, int, int] | None] = [None] * n
        todo, back = list(range(n)), []
        for step in range(1, max_steps + 1):
            # the rows of this step: (fact, prefix); the first step also under the contexts
            variants = [""] + list(contexts or []) if step == 1 else [""]
            k = len(variants)
            rows = [(i, c) for i in todo for c in variants]
            batch = encode_pairs(tokenizer, [c + prompts[i] for i, c in rows],
                                 [targets[i] for i, _ in rows], fmt).to(device)
            made = [(i, d) for i, d in enumerate(deltas) if d is not None]
            with apply(made) if made else nullcontext():
                # from the second step on the forward also says which facts hold already
                pairs, losses, *hits = capture_edit_gradients(model, self.specs, batch,
                                                              success=step > 1, per_example=True,
                                                              confidence=confidence)
            ok, argmax = hits if hits else ([False] * len(rows), [False] * len(rows))
            for row, i in enumerate(todo):
                if argmax[row * k] and confidence is not None:
                    held[i] = (deltas[i], steps[i], len(scales[i]))
                first[i] = losses[row * k] if first[i] is None else first[i]
            if pairs is None:  # every fact holds
                break
            # the fact each (u, δ) row belongs to (a row per token of each of its wordings)
            owner = torch.div(pair_owners(batch.attention_mask), k,
                              rounding_mode="floor").to(self.alpha.device)
            # the networks act row by row: one call for the facts still stepping, none for
            # the rows of facts that hold already
            keep = torch.isin(owner, torch.tensor([r for r, _ in enumerate(todo) if not ok[r * k]],
                                                  device=owner.device))
            owner = owner[keep]
            pairs = {name: (u.to(self.alpha.device)[keep], d.to(self.alpha.device)[keep])
                     for name, (u, d) in pairs.items()}
            factors = self._eval_factors(pairs)
            still = []
            for row, i in enumerate(todo):
                if ok[row * k]:
                    continue
                mine = owner == row
                f = {name: (pu[mine], pd[mine], a) for name, (pu, pd, a) in factors.items()}
                d = self.delta_from_factors(f, {"editor": self.name})
                if max_norm is not None:
                    size = _total_norm(d)
                    if size > max_norm:
                        for layer in d.layers.values():
                            layer.d.mul_(max_norm / size)
                        scales[i].append(max_norm / size)
                deltas[i] = d if deltas[i] is None else _stack(deltas[i], d)
                if rank_cut is not None:
                    deltas[i] = deltas[i].compacted(rank_cut)
                steps[i] += 1
                still.append(i)
            # `rejoin`: every fact is checked again at each step, and one that another's
            # steps took its answer from steps again (facts behind one gate, made together)
            todo = list(range(n)) if rejoin and still else still
            if not todo:
                break
        else:  # the steps ran out: did the last step of a fact still stepping overshoot?
            back = [i for i in todo if held[i] is not None or contexts]
        redo = []
        if back:
            with apply([(i, d) for i, d in enumerate(deltas)]):
                hit = edit_success(model, tokenizer, [prompts[i] for i in back],
                                   [targets[i] for i in back], fmt)
            for i, h in zip(back, hit):
                if h:
                    continue
                if held[i] is not None:
                    deltas[i], steps[i], n_scales = held[i]
                    scales[i] = scales[i][:n_scales]
                elif contexts:
                    redo.append(i)
        if redo:  # made again without contexts, the other facts' deltas acting as they will
            others = [(i, d) for i, d in enumerate(deltas) if i not in redo]
            again = self.edit_apart(
                model, tokenizer, [prompts[i] for i in redo], [targets[i] for i in redo], fmt,
                max_steps, max_norm, lambda items: apply(others + [(redo[j], d) for j, d in items]),
                rank_cut, confidence)
            for i, d in zip(redo, again):
                deltas[i], steps[i] = d, int(d.meta["edit_steps"])
                scales[i] = [float(d.meta["norm_scale"])] if "norm_scale" in d.meta else []
                d.meta["contexts"] = "dropped"
        seconds = time.perf_counter() - t0
        out = []
        for i, d in enumerate(deltas):
            if d is None:  # (cannot happen: every fact takes a first step)
                raise RuntimeError(f"fact {i} took no step")
            if steps[i] > 1 and rank_cut is None:
                d = d.compacted()
            d.meta.update({"edit_loss_before": f"{first[i]:.6g}", "edit_steps": str(steps[i]),
                           # the batch's time, shared out evenly
                           "compute_seconds": f"{seconds / n:.4f}"})
            if rejoin:
                d.meta["rejoin"] = "true"
            if scales[i]:
                d.meta["norm_scale"] = f"{min(scales[i]):.6g}"
            out.append(d)
        return out

    @torch.no_grad()
    def calibrate(self, model: nn.Module, tokenizer, prompts: list[str], targets: list[str],
                  fmt: str = "raw") -> dict:
        """The size of this editor's single edits on `model` (the base model): total ‖ΔW‖_F of a
        one-step edit of each (prompt, target), summarised as median, 90th percentile and
        maximum. Stored in the checkpoint's JSON as `delta_norm_reference`; the drift guard
        measures an edit in chain against it (see `edit`'s `max_norm`)."""
        norms = sorted(_total_norm(self.edit(model, tokenizer, [p], [t], fmt))
                       for p, t in zip(prompts, targets))
        if not norms:
            raise ValueError("calibration needs at least one edit case")
        pick = lambda q: norms[min(len(norms) - 1, int(q * len(norms)))]  # noqa: E731
        ref = {"median": pick(0.5), "p90": pick(0.9), "max": norms[-1], "cases": len(norms)}
        self.info["delta_norm_reference"] = ref
        return ref

    @torch.no_grad()
    def sweep_scale(self, model: nn.Module, tokenizer, cases, scales: list[float],
                    fmt: str = "raw", progress=None, references: dict | None = None,
                    loc_prompts: int | None = 2, n_new: int = 2) -> list[dict]:
        """Single edits of `cases` (on `model`, the base) with every α multiplied by each of
        `scales`: mean edit success, paraphrase success and locality per scale.

        ΔW = −α Σ δ̃ ũᵀ is linear in α, so each case is edited once and its factors rescaled;
        the base model's locality references are computed once per case (and kept in
        `references`, if given, across calls). At scale 1 this is the trainer's validation;
        over a range, the editor's trade-off curve between making edits and leaving the rest
        alone. Locality is scored on each case's first `loc_prompts` locality prompts (None:
        all) at the answer position and `n_new` − 1 greedy tokens after it: the trainer's
        quick 2 and 2 by default; `mendctl eval` scores all prompts with `n_new` 4."""
        references = {} if references is None else references
        rows = {s: {"edit_success": [], "paraphrase_success": [], "locality": []} for s in scales}
        for c in (progress(cases) if progress else cases):
            delta = self.edit(model, tokenizer, [c.input], [c.target], fmt)
            loc = c.locality[:loc_prompts] if loc_prompts else c.locality
            key = (c.input, tuple(loc)) if (loc_prompts, n_new) == (2, 2) else (c.input, tuple(loc), n_new)
            if loc and key not in references:
                references[key] = locality_reference(model, tokenizer, loc, fmt, n_new=n_new)
            ref = references.get(key)
            for s in scales:
                scaled = Delta({n: LayerDelta(n, l.shape, u=l.u, d=l.d, alpha=l.alpha * s,
                                              transposed=l.transposed)
                                for n, l in delta.layers.items()}, dict(delta.meta))
                with applied(model, scaled):
                    r = rows[s]
                    r["edit_success"] += edit_success(model, tokenizer, [c.input], [c.target], fmt)
                    if c.paraphrases:
                        r["paraphrase_success"] += edit_success(
                            model, tokenizer, c.paraphrases, [c.target] * len(c.paraphrases), fmt)
                    if ref is not None:
                        r["locality"] += locality_scores(model, ref)[0]
        mean = lambda xs: float(sum(xs) / len(xs)) if xs else None  # noqa: E731
        return [{"scale": s, **{k: mean(v) for k, v in rows[s].items()}} for s in scales]

    @torch.no_grad()
    def sweep_steps(self, model: nn.Module, tokenizer, cases, scales: list[float], max_steps: int,
                    fmt: str = "raw", progress=None, references: dict | None = None,
                    max_norm: float | None = None, loc_prompts: int | None = 2,
                    n_new: int = 2) -> list[dict]:
        """Single edits of `cases` (on `model`, the base) in steps of α × each of `scales`,
        repeated until every target token is the argmax, up to `max_steps` (as `edit` does):
        for every scale and every step budget k ≤ max_steps, mean edit success, paraphrase
        success, locality, locality KL, the mean number of steps taken and the seconds per edit
        (its steps and a success check after each). One pass measures
        every (scale, k): an edit that holds after j steps stops there for every k ≥ j.

        A full step overshoots most facts (it must be large enough for the hardest ones) and
        every unit of step size costs locality; smaller steps that stop when the fact holds
        spend only what each fact needs. Locality is scored on each case's first `loc_prompts`
        locality prompts (None: all) and `n_new` greedy tokens, as `sweep_scale` does."""
        references = {} if references is None else references
        alpha = self.alpha.detach().clone()
        keys = ("edit_success", "paraphrase_success", "locality", "locality_kl", "steps", "seconds")
        rows = {(s, k): {key: [] for key in keys} for s in scales for k in range(1, max_steps + 1)}
        try:
            for c in (progress(cases) if progress else cases):
                loc = c.locality[:loc_prompts] if loc_prompts else c.locality
                key = (c.input, tuple(loc), n_new)
                if loc and key not in references:
                    references[key] = locality_reference(model, tokenizer, loc, fmt, n_new=n_new)
                ref = references.get(key)
                for s in scales:
                    self.alpha.copy_(alpha * s)
                    delta, m, seconds = None, None, 0.0
                    for k in range(1, max_steps + 1):
                        if m is None or not m["edit_success"]:
                            t0 = time.perf_counter()
                            with applied(model, delta) if delta is not None else nullcontext():
                                step = self.edit(model, tokenizer, [c.input], [c.target], fmt,
                                                 max_norm=max_norm)
                            delta = step if delta is None else _stack(delta, step)
                            with applied(model, delta):
                                ok = float(edit_success(model, tokenizer, [c.input], [c.target], fmt)[0])
                                seconds += time.perf_counter() - t0  # what `edit` spends
                                m = {"edit_success": ok, "steps": float(k), "seconds": seconds}
                                if c.paraphrases:
                                    ok = edit_success(model, tokenizer, c.paraphrases,
                                                      [c.target] * len(c.paraphrases), fmt)
                                    m["paraphrase_success"] = sum(ok) / len(ok)
                                if ref is not None:
                                    ag, kl = locality_scores(model, ref)
                                    m["locality"], m["locality_kl"] = sum(ag) / len(ag), sum(kl) / len(kl)
                        for name, v in m.items():
                            rows[(s, k)][name].append(v)
        finally:
            self.alpha.copy_(alpha)
        mean = lambda xs: float(sum(xs) / len(xs)) if xs else None  # noqa: E731
        return [{"scale": s, "max_steps": k, **{key: mean(v) for key, v in rows[(s, k)].items()}}
                for s in scales for k in range(1, max_steps + 1)]

    @torch.no_grad()
    def sweep_chain(self, model: nn.Module, tokenizer, cases, chain_length: int, fmt: str = "raw",
                    progress=None, references: dict | None = None,
                    max_norm: float | None = None, max_steps: int = 1,
                    protect: bool = False, protect_energy: float = PROTECT_ENERGY,
                    preserve: dict | None = None) -> dict:
        """Sequential single edits: `cases` in chains of `chain_length`, each edit made on the
        state the chain's earlier edits left (every chain starts from `model`, the base), then
        every edit of the chain re-scored on the chain's last state. Returns the means of
        `edit_success` (retention on the last state), `paraphrase_success`, `locality` (each
        edit's locality prompts against the base model, on the last state) and
        `immediate_edit_success` (right after each edit). The trainer's validation when it
        trains on chains: what a user who chains edits sees, not what one edit of the base
        model does. Each edit takes up to `max_steps` steps; `protect` turns on the retention
        guard (each edit protects the chain's earlier edits, as `mendctl edit` does)."""
        references = {} if references is None else references
        rows = {"edit_success": [], "paraphrase_success": [], "locality": [],
                "immediate_edit_success": []}
        chains = [cases[i:i + chain_length] for i in range(0, len(cases), max(chain_length, 1))]
        for chain in (progress(chains) if progress else chains):
            for c in chain:  # the base model's references, before any edit is applied
                key = (c.input, tuple(c.locality[:2]))
                if c.locality and key not in references:
                    references[key] = locality_reference(model, tokenizer, c.locality[:2], fmt, n_new=2)
            delta, done = None, []
            for c in chain:
                with applied(model, delta) if delta is not None else nullcontext():
                    step = self.edit(model, tokenizer, [c.input], [c.target], fmt, max_norm=max_norm,
                                     max_steps=max_steps, protect=done if protect else None,
                                     protect_energy=protect_energy, preserve=preserve)
                done.append((c.input, c.target))
                delta = step if delta is None else _stack(delta, step)
                with applied(model, delta):
                    rows["immediate_edit_success"] += edit_success(model, tokenizer, [c.input],
                                                                   [c.target], fmt)
            with applied(model, delta):
                for c in chain:
                    rows["edit_success"] += edit_success(model, tokenizer, [c.input], [c.target], fmt)
                    if c.paraphrases:
                        rows["paraphrase_success"] += edit_success(
                            model, tokenizer, c.paraphrases, [c.target] * len(c.paraphrases), fmt)
                    ref = references.get((c.input, tuple(c.locality[:2])))
                    if ref is not None:
                        rows["locality"] += locality_scores(model, ref)[0]
        mean = lambda xs: float(sum(xs) / len(xs)) if xs else None  # noqa: E731
        return {k: mean(v) for k, v in rows.items()}

    @torch.no_grad()
    def rescale(self, factor: float) -> None:
        """Multiply every learned step α_ℓ by `factor` (an operating point on the trade-off
        curve, see `sweep_scale`); the networks and normalisers are unchanged."""
        if not factor > 0:
            raise ValueError("the α factor must be positive")
        self.alpha.mul_(factor)

    # -- checkpoint --------------------------------------------------------------------------
    def save(self, directory: str | Path, info: dict | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = directory / (WEIGHTS_FILE + ".tmp")
        save_file(state, str(tmp), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        tmp.replace(directory / WEIGHTS_FILE)
        doc = dict(info or self.info)
        # the computed keys come last so stale values from `info` can never win
        doc.update({"format": FORMAT, "format_version": FORMAT_VERSION, "editor": self.name,
                    "config": asdict(self.config), "weights": [s.to_dict() for s in self.specs],
                    "weights_sha256": file_sha256(directory / WEIGHTS_FILE)})
        (directory / CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, specs: list[WeightSpec],
             base_model_hash: str | None = None) -> "MendEditor":
        """Load a checkpoint for these weights; refuse (EditorMismatch) any other model."""
        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise EditorMismatch(f"{directory} is not an editor checkpoint (needs {CONFIG_FILE} "
                                 f"and {WEIGHTS_FILE}); train one with `mendctl train`")
        try:
            doc = json.loads(cfg_path.read_text())
            if not isinstance(doc, dict):
                raise ValueError("the top level is not a JSON object")
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError included
            raise EditorMismatch(f"{cfg_path} cannot be read as JSON ({e}); restore the "
                                 f"checkpoint, or train one with `mendctl train`") from None
        try:
            version = int(doc.get("format_version", 0))
        except (TypeError, ValueError):
            version = FORMAT_VERSION + 1
        if doc.get("format") != FORMAT or version > FORMAT_VERSION:
            raise EditorMismatch(f"{cfg_path}: not an editor of a format this mendctl reads")
        want = [s.to_dict() for s in specs]
        if not isinstance(doc.get("weights"), list) or not isinstance(doc.get("config"), dict):
            raise EditorMismatch(f"{cfg_path} lacks its `weights` list or `config` mapping; "
                                 f"restore the checkpoint, or train one with `mendctl train`")
        if doc["weights"] != want:
            have = ", ".join(f"{w['name']} {tuple(w['shape'])}" for w in doc["weights"][:3])
            raise EditorMismatch(
                f"editor {directory} was trained for other weights ({have}, ...) than the "
                f"workspace edits; train an editor for this model with `mendctl train`")
        trained_for = doc.get("base_model", {}).get("hash")
        if base_model_hash and trained_for and trained_for != base_model_hash:
            raise EditorMismatch(
                f"editor {directory} was trained on base model {trained_for[:12]}, not on this "
                f"workspace's model {base_model_hash[:12]}; train one with `mendctl train`")
        known = {f for f in MendConfig.__dataclass_fields__}
        unknown = sorted(set(doc["config"]) - known)
        if unknown:
            raise EditorMismatch(f"{cfg_path}: unknown editor setting(s) {', '.join(unknown)} "
                                 f"(known: {', '.join(sorted(known))}); the checkpoint is from "
                                 f"another mendctl version, or the file was edited by hand")
        # the bytes read once: what is hashed is what is loaded (the ledger records this hash)
        data = w_path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        claimed = doc.get("weights_sha256")
        if claimed and claimed != sha:
            raise EditorMismatch(f"{w_path} does not match the weights_sha256 its {CONFIG_FILE} "
                                 f"records ({sha[:12]} ≠ {str(claimed)[:12]}): the file was changed "
                                 f"or damaged; restore the checkpoint, or train one with "
                                 f"`mendctl train`")
        try:
            editor = cls(specs, MendConfig(**doc["config"]))
            editor.load_state_dict(load_safetensors(data))
        except (TypeError, ValueError, RuntimeError) as e:  # bad values, shapes, or file
            raise EditorMismatch(f"editor {directory} cannot be loaded ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else e}); restore the "
                                 f"checkpoint, or train one with `mendctl train`") from None
        editor.weights_sha256 = sha
        editor.info = doc
        editor.eval()
        return editor

    def to_identity(self) -> "MendEditor":
        """The untrained (identity-initialised) editor with this editor's normalisation
        statistics and the initial α: the paper's 'untrained MEND' comparison row."""
        fresh = MendEditor(self.specs, self.config)
        state = fresh.state_dict()
        for k, v in self.state_dict().items():
            if ".norm_" in k:
                state[k] = v.clone()
        fresh.load_state_dict(state)
        fresh.name = "identity"
        fresh.eval()
        return fresh


def _stack(a: Delta, b: Delta) -> Delta:
    """Two MEND steps of the same editor as one delta: their factor rows stacked (both use the
    editor's α for each layer, so Σ −α δ̃ ũᵀ over the rows is exactly the sum of the steps)."""
    layers = {}
    for name, la in a.layers.items():
        lb = b.layers[name]
        if not torch.equal(la.alpha, lb.alpha):
            raise ValueError(f"{name}: cannot stack steps with different α")
        layers[name] = LayerDelta(name, la.shape, u=torch.cat([la.u, lb.u]), d=torch.cat([la.d, lb.d]),
                                  alpha=la.alpha.clone(), transposed=la.transposed)
    return Delta(layers, dict(a.meta))


def _total_norm(delta: Delta) -> float:
    """‖ΔW‖_F of all the delta's weights together."""
    return sum(v * v for v in delta.norms().values()) ** 0.5


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
