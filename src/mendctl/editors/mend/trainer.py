"""Editor training (Algorithm 1 of the paper).

Each step samples n edit cases from the training split and:
1. captures (u, δ) of the edit loss −log p_W(y_e | x_e) on the base model (no grad to the
   editor: these are inputs, so no higher-order gradients are ever needed);
2. maps them through the editor to factors and builds, per edit, W̃ = W − α Σ δ̃ ũᵀ over that
   edit's tokens (`edit_batch` facts per edit; 1 by default: the n edits are n single edits);
3. runs the model functionally with each W̃ (torch.func.functional_call) on its equivalent
   inputs (x_e itself and a rephrasing x'_e, target y_e) and its locality prompts x_loc;
4. L = c_e · L_e + L_loc, L_e = −log p_W̃(y_e | x'_e), L_loc = KL(p_W(·|x_loc) ‖ p_W̃(·|x_loc)),
   and one Adam step on the editor only (α with its own learning rate).

L_loc is taken where locality is measured: a locality prompt is extended by the base model's
greedy continuation (computed once per prompt) and the KL is averaged over the prompt's last
position and the continuation, i.e. the positions that say the neighbouring fact. Averaging
over every prompt position instead (the first shipped editor) let the easy positions dilute
the signal: its training agreement read .94 while validation locality stayed at .87.
Generic-text passages count at every position (there every token is "the answer").

Single edits per step, not one batched edit of all the step's facts (editors up to v3): a
user edits one fact at a time and the evaluation measures that, while a batched training edit
teaches the editor the size of a 4-fact update and scores locality against it.

Validation runs at intervals on held-out cases (edit success, paraphrase success, locality);
the best checkpoint by validation score is kept, the learning rate follows a cosine decay, and
training stops early when validation stops improving. Progress is shown with tqdm. A resumable
training state (editor, optimiser moments, step, RNG) is written as safetensors + JSON.

Data parallel (`replicas`, see editors/mend/distributed.py): N processes train one editor. Each
draws the whole step with the same RNG (so the step's edits, paraphrases and locality prompts
are the single-process ones) and computes the loss terms of its share of the edits; every
process sees every edit's (u, δ) (the normaliser observes them all, and a batched edit needs
its other facts' terms). The gradients are summed over the
processes before clipping and the Adam step, which every process takes identically. Only the
main process validates and writes checkpoints and the training state; the others wait and
adopt its decision. With one process nothing of this runs.
"""
from __future__ import annotations

import json
import math
import random
import time
import zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from ..forward import PrefixCache, Projection, low_rank_rows, native_bf16, projecting, selected_logits
from ..text import Batch, encode_pairs, encode_sequences, pair_ids, render_prompt
from ..weights import WeightSpec, input_device
from .capture import capture_edit_gradients, label_positions, per_example_nll
from .distributed import Replicas, digest
from .editor import MendEditor

STATE_FILE = "train_state.safetensors"
STATE_JSON = "train_state.json"


@dataclass
class TrainConfig:
    steps: int = 3000
    edits_per_step: int = 4
    lr: float = 1e-4
    alpha_lr: float = 1e-4
    c_edit: float = 0.1
    c_loc: float = 1.0
    val_every: int = 250
    val_cases: int = 64
    patience: int = 6  # validations without improvement before stopping
    norm_warmup: int = 20  # edit batches that only feed the normaliser before step 1
    max_minutes: float = 0.0  # 0: no wall-clock limit
    seed: int = 0
    grad_clip: float = 100.0
    loc_per_edit: int = 2  # locality prompts per edit and step
    loc_new_tokens: int = 4  # base continuation tokens scored (as `mendctl eval` does)
    # facts per training edit: 1 trains single edits, as they are made and evaluated (each
    # step averages edits_per_step of them); N groups the step's edits into batched edits of N
    # facts; 0 makes the whole step one batched edit (how the editors up to v3 were trained)
    edit_batch: int = 1
    # > 1: train on chains of edits. Each step edits the state left by up to chain_length − 1
    # earlier edits of the run (the first edit of each earlier step, made by the editor as it
    # then was); locality is the KL to that state, on the usual prompts and on one earlier
    # fact of the chain per edit. The chain restarts from the base model when full (and on
    # resume). 0 or 1: every step edits the base model.
    chain_length: int = 0
    # train routed edits, as `mendctl edit` makes them by default (editors/route.py): an edit
    # acts from the first token of its subject (meta "subject") on and not at all on text
    # that does not name it. Locality is then scored where a routed edit can still do harm:
    # other prompts about the same subject (the case's locality prompts that name it) and
    # ordinary text that names it (a generic passage after the subject); prompts about other
    # subjects never see the edit. Cases without a subject are trained as weight edits.
    gated: bool = False


@dataclass
class TrainResult:
    steps: int
    seconds: float
    best_step: int
    best_val: dict
    history: list = field(default_factory=list)
    step_seconds: float = 0.0  # time in the training steps (no validation, no set-up)


def _cat_batches(a: Batch, b: Batch, pad: int) -> Batch:
    width = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def grow(t, fill):
        out = torch.full((t.shape[0], width), fill, dtype=t.dtype)
        out[:, : t.shape[1]] = t
        return out

    return Batch(torch.cat([grow(a.input_ids, pad), grow(b.input_ids, pad)]),
                 torch.cat([grow(a.attention_mask, 0), grow(b.attention_mask, 0)]),
                 torch.cat([grow(a.labels, -100), grow(b.labels, -100)]))


def _share(x: torch.Tensor, total: int) -> torch.Tensor:
    """This process's share of a mean over `total` items of which it holds `x`: the shares of
    all processes add up to the step's mean. With every item here it is just the mean."""
    return x.mean() if x.numel() == total else x.sum() / total


def edited_weights(specs: list[WeightSpec], base: dict[str, torch.Tensor], factors: dict,
                   rows: torch.Tensor | None = None) -> dict:
    """W̃ = W − α Σ δ̃ ũᵀ, in each parameter's stored orientation; differentiable. `rows` (a
    boolean mask over the token rows) keeps only those tokens' terms: one edit of a batch."""
    out = {}
    for s in specs:
        pu, pd, a = factors[s.name]
        if rows is not None:
            pu, pd = pu[rows], pd[rows]
        dw = -(a * (pd.T @ pu))  # (out, in)
        out[s.name] = base[s.name] + (dw.T if s.transposed else dw)
    return out


class Trainer:
    def __init__(self, editor: MendEditor, model: nn.Module, tokenizer, train_cases, val_cases,
                 config: TrainConfig, fmt: str = "raw", out_dir: str | Path | None = None,
                 progress: bool = True, generic_texts: list[str] | None = None,
                 generic_loc: float = 0.0, replicas: Replicas | None = None):
        self.editor, self.model, self.tok = editor, model, tokenizer
        self.replicas = replicas or Replicas()
        self.train_cases, self.val_cases = list(train_cases), list(val_cases)
        self.cfg, self.fmt = config, fmt
        self.out_dir = Path(out_dir) if out_dir else None
        self.progress = progress
        # locality inputs: the case's own locality prompts, and with probability generic_loc
        # the opening of a generic-text passage (so edits also leave ordinary text alone)
        self.generic = [" ".join(t.split()[:24]) for t in (generic_texts or [])]
        self.generic_loc = generic_loc if self.generic else 0.0
        if self.replicas.parallel:
            if config.edits_per_step < self.replicas.world:
                raise ValueError(f"{self.replicas.world} processes need at least as many edits "
                                 f"per step (have {config.edits_per_step})")
            # every process needs locality sequences for its share of every step
            no_loc = not self.generic and not all(c.locality for c in self.train_cases)
            if config.loc_per_edit < 1 or no_loc:
                raise ValueError("data-parallel training needs locality inputs for every edit: "
                                 "`locality` prompts in every case, or generic text passages")
        if config.gated and config.chain_length > 1:
            raise ValueError("gated (routed) training edits the base model: chain_length must be 0 or 1")
        self.t_start = time.time()
        self.specs = editor.specs
        self.rng = random.Random(config.seed)
        torch.manual_seed(config.seed)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.base = {s.name: model.get_parameter(s.name).detach() for s in self.specs}
        net_params = [p for n, p in editor.named_parameters() if n != "alpha"]
        self.opt = torch.optim.Adam([{"params": net_params, "lr": config.lr},
                                     {"params": [editor.alpha], "lr": config.alpha_lr}])
        self.step = 0
        self.best_score = -math.inf
        self.best_step = 0
        self.best_val: dict = {}
        self.history: list = []
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = input_device(model)
        self.prefix = PrefixCache(model, self.specs)
        self.prefix.enable_memo()  # the base model is fixed for the whole run
        # the steps in bf16 mixed precision where the hardware multiplies bf16 natively
        # (autocast: products in bf16, accumulated and everything else in float32; the frozen
        # output projection, a third of a float32 step on a CPU, cast once): 1.5x the steps
        # per second here, the same losses step for step within about 1 % (bench/train_speed.py
        # measures both and the gradients' agreement; docs/results.md). Validation, and every
        # edit and score outside training, keep float32: replayed edits do not depend on it.
        self.bf16 = native_bf16(self.device)
        self._projection = Projection(torch.bfloat16)
        # locality prompt → (prompt + base greedy continuation, prompt length)
        self._continuations: dict[str, tuple[list[int], int]] = {}
        self._gates: dict[tuple[str, str, bool], int] = {}  # gated training: (text, subject) → token
        self._val_refs: dict = {}
        # chain training: the weights after the current chain's edits (None: the base model),
        # the chain's facts, and the next state (this step's first edit added)
        self._chain_w: dict | None = None
        self._chain_facts: list[tuple[str, str]] = []
        self._chain_next: dict | None = None

    # -- one step -----------------------------------------------------------------------------
    def sample(self, k: int):
        return [self.train_cases[self.rng.randrange(len(self.train_cases))] for _ in range(k)]

    def _part(self, n: int) -> tuple[int, int]:
        return self.replicas.part(n)

    def _all_pairs(self, pairs: dict, owner: torch.Tensor | None = None):
        """The (u, δ) pairs of every process's edits, in edit order (each process captured its
        share). One gather for all weights: every weight's pairs have the same token rows.
        With `owner` (the edit each token row belongs to) returns (pairs, owners) of them all."""
        if not self.replicas.parallel:
            return pairs if owner is None else (pairs, owner)
        parts = [t for s in self.specs for t in pairs[s.name]]
        if owner is not None:  # small integers, exact in float32
            parts.append(owner.to(parts[0].dtype)[:, None])
        full = self.replicas.gather_rows(torch.cat(parts, dim=1))
        out, at = {}, 0
        for s in self.specs:
            u = full[:, at: at + s.in_features].contiguous()
            at += s.in_features
            d = full[:, at: at + s.out_features].contiguous()
            at += s.out_features
            out[s.name] = (u, d)
        return out if owner is None else (out, full[:, at].round().long())

    def losses(self, cases, part: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict]:
        """The loss of one step (see `_losses`), in bf16 mixed precision with `bf16`."""
        if not self.bf16:
            return self._losses(cases, part)
        with torch.autocast(self.device.type, dtype=torch.bfloat16), projecting(self._projection):
            return self._losses(cases, part)

    def _losses(self, cases, part: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict]:
        """The loss of one step whose edits are `cases`: groups of `edit_batch` of them (all of
        them with 0) are each one edit, made from their own facts' (u, δ) only.

        `part` = (lo, hi), data parallel: this process computes the terms of edits lo..hi-1 only
        (their capture, equivalent and locality sequences), each divided by the step's total
        count, so the processes' losses (and the "loss", "l_edit", "l_loc" stats) add up to the
        single-process ones; "es" and "loc" are then means over this share, of "n" edits and
        "loc_n" positions. Paraphrases and locality prompts are still drawn for every case, in
        the single-process order, so the RNG stays in step across processes."""
        eq_all = [self.rng.choice(c.paraphrases) if c.paraphrases else c.input for c in cases]
        loc_all = [self._loc_prompts(c) for c in cases]
        # chain training: each edit is also scored on earlier facts of the chain (drawn here,
        # for every case in order, so the RNG stays in step across processes)
        ret_all = [self._retained_facts() for _ in cases]
        n_all = len(cases)
        m_all = sum(len(x) for x in loc_all) + sum(len(r) for r in ret_all)
        lo, hi = part if part is not None else (0, n_all)
        cases = cases[lo:hi]
        n = len(cases)
        group = self.cfg.edit_batch or n_all
        if n_all % group:
            raise ValueError(f"edits per step ({n_all}) must be a multiple of edit_batch ({group})")
        prompts = [c.input for c in cases]
        targets = [c.target for c in cases]
        eq_prompts = prompts + eq_all[lo:hi]
        loc_inputs = [p for x in loc_all[lo:hi] for p in x]
        if not loc_inputs:
            raise ValueError("training needs locality inputs: cases with `locality` prompts, "
                             "or generic text passages")
        ret = [f for r in ret_all[lo:hi] for f in r]
        loc_edit = torch.tensor([i for i, x in enumerate(loc_all[lo:hi]) for _ in x]
                                + [i for i, r in enumerate(ret_all[lo:hi]) for _ in r])
        loc = self._locality_batch(loc_inputs)
        if ret:
            # an earlier fact with its edited answer, labelled on the answer: the KL to the
            # chain's state there says whether this edit keeps it
            loc = _cat_batches(loc, encode_pairs(self.tok, [p for p, _ in ret], [t for _, t in ret],
                                                 self.fmt), self.pad)
        m = loc.input_ids.shape[0]
        # one padded batch for every sequence of the step: rows [0, n) edit, [n, 3n) equivalent
        # inputs (x_e and a rephrasing), [3n, 3n + m) locality sequences
        edit = encode_pairs(self.tok, prompts, targets, self.fmt)
        equiv = encode_pairs(self.tok, eq_prompts, targets + targets, self.fmt)
        allb = _cat_batches(_cat_batches(edit, equiv, self.pad), loc, self.pad).to(self.device)
        rows = lambda idx: Batch(allb.input_ids[idx], allb.attention_mask[idx], allb.labels[idx])  # noqa: E731
        if self.prefix.enabled:
            hidden, as_tuple = self.prefix.hidden(allb)
            skip = lambda idx: self.prefix.skipping(hidden[idx], as_tuple)  # noqa: E731
        else:
            skip = lambda idx: nullcontext()  # noqa: E731

        # the weights the step edits: the base model's, or the chain's state (chain training)
        w_cur = self._chain_w if self._chain_w is not None else self.base
        w_arg = self._chain_w  # None: the model's own parameters
        pairs, _ = capture_edit_gradients(self.model, self.specs, rows(slice(0, n)),
                                          skip(slice(0, n)), weights=w_arg)
        # the step's token rows of every process, and the edit (global index) each belongs to
        owner = lo + torch.nonzero(edit.attention_mask)[:, 0]
        pairs, owner = self._all_pairs(pairs, owner.to(self.device))
        factors = self.editor.factors(pairs)
        if self.cfg.chain_length > 1:
            # the chain goes on with the step's first edit, alone (every process has its terms)
            with torch.no_grad():
                self._chain_next = edited_weights(self.specs, w_cur, factors, owner == 0)

        # locality rows are labelled where they count (see `_locality_batch`); position t
        # predicts token t+1, so the distribution at t-1 is the one compared for label t
        end = 3 * n + m
        sel_loc = torch.zeros_like(allb.attention_mask, dtype=torch.bool)
        sel_loc[3 * n:end, :-1] = allb.labels[3 * n:end, 1:] != -100
        with torch.no_grad(), skip(slice(3 * n, end)):
            lp_base = torch.log_softmax(
                selected_logits(self.model, rows(slice(3 * n, end)), sel_loc[3 * n:end],
                                w_arg).float(), -1)
        # selected_logits returns positions in row-major order: the locality row of each one
        pos_row = torch.arange(3 * n, end, device=sel_loc.device)[:, None].expand(m, sel_loc.shape[1])
        pos_row = pos_row[sel_loc[3 * n:end]]

        # each group of `group` edits is one edit W̃ of its facts only (group 1: single edits,
        # as they are made and evaluated); its equivalent and locality rows see that W̃. All
        # groups are scored in one forward: each row adds its own edit's low-rank term
        # (forward.low_rank_rows) instead of one functional pass per edit.
        eq_edit = [(lo + i) // group for i in range(n)]
        row_edit = torch.tensor(eq_edit + eq_edit + [(lo + int(j)) // group for j in loc_edit],
                                device=allb.input_ids.device)
        idx = torch.arange(n, end, device=allb.input_ids.device)
        sub = rows(idx)
        sel_eq, lab_eq, own_eq = label_positions(sub)
        sel_eq[2 * n:] = False
        lab_eq, own_eq = lab_eq[own_eq < 2 * n], own_eq[own_eq < 2 * n]
        sel_l = sel_loc[idx]
        mask = None
        if self.cfg.gated:
            subj = [self._subject(c) for c in cases]
            starts = ([self._gate_start(p, subj[i]) for i, p in enumerate(prompts)]
                      + [self._gate_start(p, subj[i]) for i, p in enumerate(eq_all[lo:hi])]
                      + [self._gate_start(t, subj[int(j)], rendered=not g)
                         for (g, t), j in zip(loc_inputs, loc_edit.tolist())])
            mask = self._gate_mask(starts, sub.input_ids.shape[1])
        with skip(idx), low_rank_rows(self.model, self.specs, factors, owner // group, row_edit,
                                      mask):
            logits = selected_logits(self.model, sub, sel_eq | sel_l, w_arg)
        is_eq = sel_eq[sel_eq | sel_l]
        nll = per_example_nll(logits[is_eq], lab_eq, own_eq, 2 * n)
        with torch.no_grad():
            hit = (logits[is_eq].argmax(-1) == lab_eq).float()
            hits = torch.ones(2 * n, device=hit.device).scatter_reduce(0, own_eq, hit, "amin")[:n]
        lp_new = torch.log_softmax(logits[~is_eq].float(), -1)
        kl = (lp_base.exp() * (lp_base - lp_new)).sum(-1)
        # mean over each sequence's counted positions, then over sequences, so a long generic
        # passage weighs as much as one neighbouring fact
        seq = pos_row - 3 * n
        s = torch.zeros(m, device=kl.device).index_add(0, seq, kl)
        per_seq = s / torch.bincount(seq, minlength=m).clamp(min=1)
        with torch.no_grad():
            agree = (lp_new.argmax(-1) == lp_base.argmax(-1)).float()
        l_edit = _share(nll, 2 * n_all)
        l_loc = _share(per_seq, m_all)
        loss = self.cfg.c_edit * l_edit + self.cfg.c_loc * l_loc
        es = hits.mean()
        return loss, {"loss": float(loss.detach()), "l_edit": float(l_edit.detach()),
                      "l_loc": float(l_loc.detach()), "es": float(es), "loc": float(agree.mean()),
                      "n": n, "loc_n": agree.numel()}

    def _retained_facts(self) -> list[tuple[str, str]]:
        """Chain training: one earlier fact of the current chain (prompt, target), if any."""
        if not self._chain_facts:
            return []
        return [self._chain_facts[self.rng.randrange(len(self._chain_facts))]]

    def _advance_chain(self, case) -> None:
        """Chain training, after a step: the step's first edit joins the chain; a chain that
        has reached `chain_length` edits starts again from the base model."""
        if self.cfg.chain_length <= 1:
            return
        self._chain_facts.append((case.input, case.target))
        self._chain_w = self._chain_next
        if len(self._chain_facts) >= self.cfg.chain_length - 1:
            self._chain_w, self._chain_facts = None, []

    def _loc_prompts(self, case) -> list[tuple[bool, str]]:
        """(is a generic passage, text) for each locality input of this edit."""
        out = []
        pool = self._loc_pool(case)
        subject = self._subject(case)
        if subject is not None:
            for _ in range(self.cfg.loc_per_edit):
                if self.generic and (not pool or self.rng.random() < self.generic_loc):
                    out.append((True, self._subject_passage(subject)))
                elif pool:
                    out.append((False, self.rng.choice(pool)))
            return out
        for _ in range(self.cfg.loc_per_edit):
            # a case without locality prompts (users' data) falls back on generic text, or on
            # no locality term at all if there is none
            if (self.generic_loc and self.rng.random() < self.generic_loc) or (not pool and self.generic):
                out.append((True, self.rng.choice(self.generic)))
            elif pool:
                out.append((False, self.rng.choice(pool)))
        return out

    def _loc_pool(self, case) -> list[str]:
        """The case's locality prompts a step draws from: all of them, or for a gated case
        those that name its subject (the others never see a routed edit)."""
        subject = self._subject(case)
        return [p for p in case.locality if subject is None or subject in p]

    def _subject(self, case) -> str | None:
        """The subject a gated edit is routed on; None trains the case as a weight edit."""
        if not self.cfg.gated:
            return None
        subject = case.meta.get("subject")
        return subject if isinstance(subject, str) and subject and subject in case.input else None

    def _subject_passage(self, subject: str) -> str:
        """Ordinary text that names the subject: one generic passage per subject (fixed, so
        its lower-block states are computed once, up front), after the subject's name."""
        # 12 words: every position of a passage is scored, and the output projection at each
        # costs more than the edited blocks' work for it
        passage = self.generic[zlib.crc32(subject.encode()) % len(self.generic)]
        return f"{subject}: {' '.join(passage.split()[:12])}"

    def _gate_start(self, text: str, subject: str | None, rendered: bool = True) -> int:
        """Index of the first token of `text` (as the step tokenises it: rendered as a prompt,
        or raw for a generic passage) that overlaps the subject's first mention; 0 for an
        ungated case (acts everywhere), a huge index when the text does not name the subject."""
        if subject is None:
            return 0
        key = (text, subject, rendered)
        if key not in self._gates:
            full = render_prompt(self.tok, text, self.fmt) if rendered else text
            at = full.find(subject)
            start = 1 << 30
            if at >= 0:
                spans = self.tok(full, return_offsets_mapping=True)["offset_mapping"]
                start = next((i for i, (a, b) in enumerate(spans) if b > at and b > a), start)
            self._gates[key] = start
        return self._gates[key]

    def _gate_mask(self, starts: list[int], width: int) -> torch.Tensor:
        pos = torch.arange(width)[None, :]
        return (pos >= torch.tensor(starts)[:, None]).float().to(self.device)

    @torch.no_grad()
    def _locality_batch(self, prompts: list[tuple[bool, str]]) -> Batch:
        """Locality sequences labelled where they count: a prompt plus the base model's greedy
        continuation (labels on the continuation, so the prompt's last position counts too),
        or a generic passage labelled from its second token."""
        todo = sorted({p for g, p in prompts if not g and p not in self._continuations})
        if todo:
            ids = [self.tok(render_prompt(self.tok, p, self.fmt)).input_ids for p in todo]
            for p, seq in zip(todo, self._greedy(ids, self.cfg.loc_new_tokens)):
                self._continuations[p] = seq
        seqs, starts = [], []
        for generic, p in prompts:
            if generic:
                seqs.append(self.tok(p).input_ids)
                starts.append(1)
            else:
                seq, k = self._continuations[p]
                seqs.append(seq)
                starts.append(k)
        return encode_sequences(seqs, self.tok, starts)

    def _greedy(self, ids: list[list[int]], n_new: int, chunk: int = 64) -> list[tuple[list[int], int]]:
        """Greedy continuations of token lists, as `locality_reference` makes them: left-padded
        batches through `generate` (with its KV cache), prompts sorted by length so that
        little padding is computed. Returns (prompt + continuation, prompt length) per prompt."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list = [None] * len(ids)
        for b in range(0, len(order), chunk):
            idx = order[b: b + chunk]
            width = max(len(ids[i]) for i in idx)
            x = torch.full((len(idx), width), self.pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for j, i in enumerate(idx):
                x[j, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[j, width - len(ids[i]):] = 1
            gen = self.model.generate(input_ids=x.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=n_new, min_new_tokens=n_new,
                                      do_sample=False, pad_token_id=self.pad)
            for j, i in enumerate(idx):
                out[i] = (ids[i] + gen[j, width:].tolist(), len(ids[i]))
        return out

    @torch.no_grad()
    def prepare_locality(self) -> None:
        """Compute the base continuation of every training locality prompt up front, in large
        batches: one at a time, inside the steps, they took half of each step's time.

        Data parallel, the processes take turns over the same blocks of prompts and then
        exchange their results: each block is computed exactly as one process computes it
        (generation batches are formed within a block), so the continuations are the same."""
        prompts = sorted({p for c in self.train_cases for p in self._loc_pool(c)} - set(self._continuations))
        if not prompts:
            return
        chunk = 64
        rep = self.replicas
        blocks = [prompts[b: b + chunk * 8] for b in range(0, len(prompts), chunk * 8)]
        mine = blocks[rep.rank::rep.world]
        bar = tqdm(total=sum(len(b) for b in mine), disable=not self.progress or not rep.main,
                   desc="locality continuations", dynamic_ncols=True)
        done = {}
        for part in mine:
            ids = [self.tok(render_prompt(self.tok, p, self.fmt)).input_ids for p in part]
            for p, seq in zip(part, self._greedy(ids, self.cfg.loc_new_tokens, chunk)):
                done[p] = seq
            bar.update(len(part))
        bar.close()
        for d in rep.gather_objects(done):
            self._continuations.update(d)

    @torch.no_grad()
    def prepare_prefixes(self) -> None:
        """Compute the lower blocks' output for every sequence a step can draw (each case's
        input and paraphrases with its target, every locality sequence, every generic
        passage) once, up front, in large batches of similar length. Drawn inside the steps,
        most sequences were new and a step's handful of them ran the 27 frozen blocks at a
        small batch size: most of a step's time (docs/results.md, training throughput).

        One process only: data-parallel replicas keep computing what they draw (each would
        otherwise compute the whole set)."""
        if not self.prefix.enabled or self.replicas.parallel:
            return
        seqs = []
        for c in self.train_cases:
            for p in [c.input, *c.paraphrases]:
                p_ids, t_ids = pair_ids(self.tok, p, c.target, self.fmt)
                seqs.append(p_ids + t_ids)
        seqs.extend(self._continuations[p][0] for c in self.train_cases for p in self._loc_pool(c))
        seqs.extend(self.tok(p).input_ids for p in self.generic)
        if self.cfg.gated and self.generic:
            subjects = {self._subject(c) for c in self.train_cases} - {None}
            seqs.extend(self.tok(self._subject_passage(x)).input_ids for x in sorted(subjects))
        seqs = sorted({tuple(s) for s in seqs})
        bar = tqdm(total=len(seqs), disable=not self.progress, desc="lower-block states",
                   dynamic_ncols=True)
        self.prefix.remember([list(s) for s in seqs], self.pad, progress=bar.update)
        bar.close()

    def warm_up_normaliser(self) -> None:
        self.editor.train()
        with torch.no_grad():
            for _ in range(self.cfg.norm_warmup):
                cases = self.sample(self.cfg.edits_per_step)
                lo, hi = self._part(len(cases))  # data parallel: capture this process's share
                cases = cases[lo:hi]
                edit = encode_pairs(self.tok, [c.input for c in cases], [c.target for c in cases],
                                    self.fmt).to(self.device)
                pairs, _ = capture_edit_gradients(self.model, self.specs, edit)
                pairs = self._all_pairs(pairs)  # ... and observe every process's tokens
                for s in self.specs:
                    self.editor.net_for(s.name).observe(*pairs[s.name])

    def progress_fraction(self) -> float:
        """How far along the run is: by steps, or by wall clock when a time limit is set,
        whichever is further (so the learning rate has decayed when either limit ends it)."""
        f = self.step / max(self.cfg.steps, 1)
        if self.cfg.max_minutes:
            f = max(f, (time.time() - self.t_start) / 60 / self.cfg.max_minutes)
        return min(f, 1.0)

    def lr_factor(self) -> float:
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * self.progress_fraction()))

    # -- validation -----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Single edits of the validation cases: the editor's own sweep at its trained α, with
        the base model's locality references kept for the whole run (the base never changes).
        When training on chains, the validation cases are edited in chains of the same length
        instead and scored on each chain's last state (`MendEditor.sweep_chain`), so the kept
        checkpoint is the one that keeps chains healthy, not the best at one edit."""
        self.editor.eval()
        cases = self.val_cases[: self.cfg.val_cases]
        if self.cfg.gated:
            r = self._validate_gated(cases)
        elif self.cfg.chain_length > 1:
            r = self.editor.sweep_chain(self.model, self.tok, cases, self.cfg.chain_length,
                                        self.fmt, references=self._val_refs)
        else:
            r = self.editor.sweep_scale(self.model, self.tok, cases, [1.0], self.fmt,
                                        references=self._val_refs)[0]
        self.editor.train()
        keys = ("edit_success", "paraphrase_success", "locality")
        out = {k: float("nan") if r[k] is None else r[k] for k in keys}
        if r.get("immediate_edit_success") is not None:
            out["immediate_edit_success"] = r["immediate_edit_success"]
        out["alpha_mean"] = float(self.editor.alpha.detach().mean())
        return out

    @torch.no_grad()
    def _validate_gated(self, cases, chunk: int = 8) -> dict:
        """Single routed edits of the validation cases at the trained α, scored as they act:
        edit success on the input, paraphrase success on every paraphrase, and top-1
        agreement with the base model on the locality prompts that name the subject (the
        others never see a routed edit), each from the subject's first token on."""
        es, para, agree = [], [], []
        for b in range(0, len(cases), chunk):
            part = cases[b: b + chunk]
            edit = encode_pairs(self.tok, [c.input for c in part], [c.target for c in part],
                                self.fmt).to(self.device)
            pairs, _ = capture_edit_gradients(self.model, self.specs, edit)
            factors = self.editor.factors(pairs)
            owner = torch.nonzero(edit.attention_mask)[:, 0]
            eq, eq_edit, loc, loc_edit, starts = [], [], [], [], []
            for i, c in enumerate(part):
                subject = self._subject(c)
                for p in [c.input, *c.paraphrases]:
                    eq.append((p, c.target))
                    eq_edit.append(i)
                    starts.append(self._gate_start(p, subject))
            for i, c in enumerate(part):
                for p in self._loc_pool(c):
                    loc.append((False, p))
                    loc_edit.append(i)
                    starts.append(self._gate_start(p, self._subject(c)))
            batch = encode_pairs(self.tok, [p for p, _ in eq], [t for _, t in eq], self.fmt)
            if loc:
                batch = _cat_batches(batch, self._locality_batch(loc), self.pad)
            batch = batch.to(self.device)
            select, labels, own = label_positions(batch)
            row_edit = torch.tensor(eq_edit + loc_edit, device=self.device)
            with low_rank_rows(self.model, self.specs, factors, owner, row_edit,
                               self._gate_mask(starts, batch.input_ids.shape[1])):
                top = selected_logits(self.model, batch, select).argmax(-1)
            hit = torch.ones(len(row_edit), device=self.device).scatter_reduce(
                0, own, (top == labels).float(), "amin")
            k = len(eq)
            for i in range(len(part)):
                rows = [j for j in range(k) if eq_edit[j] == i]
                es.append(float(hit[rows[0]]))
                if len(rows) > 1:
                    para.append(float(hit[rows[1:]].mean()))
            if loc:
                base = selected_logits(self.model, batch, select).argmax(-1)
                agree.extend((top == base)[own >= k].float().tolist())
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return {"edit_success": mean(es), "paraphrase_success": mean(para), "locality": mean(agree)}

    @staticmethod
    def score(v: dict) -> float:
        """Model selection: edits must hold and the rest must stay put; paraphrases help."""
        return v["edit_success"] + v["locality"] + 0.5 * v.get("paraphrase_success", 0.0)

    # -- loop -------------------------------------------------------------------------------------
    def run(self, best_dir: str | Path, info: dict | None = None) -> TrainResult:
        cfg, rep = self.cfg, self.replicas
        t0 = self.t_start = time.time()
        start_step = self.step
        # replicas start from the main process's editor, however each one built or loaded it
        rep.broadcast_(list(self.editor.state_dict().values()))
        self.prepare_locality()
        self.prepare_prefixes()
        if self.step == 0:
            self.warm_up_normaliser()
        self.editor.train()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress or not rep.main,
                   desc="train", dynamic_ncols=True)
        run_es = run_loc = None
        bad = 0
        step_seconds = 0.0
        while self.step < cfg.steps:
            t_step = time.perf_counter()
            stats, over_time = self.train_step(t0)
            step_seconds += time.perf_counter() - t_step
            run_es = stats["es"] if run_es is None else 0.98 * run_es + 0.02 * stats["es"]
            run_loc = stats["loc"] if run_loc is None else 0.98 * run_loc + 0.02 * stats["loc"]
            bar.update(1)
            bar.set_postfix(es=f"{run_es:.2f}", loc=f"{run_loc:.3f}", loss=f"{stats['loss']:.3f}")
            if not rep.parallel:
                over_time = cfg.max_minutes and (time.time() - t0) / 60 > cfg.max_minutes
            if self.step % cfg.val_every == 0 or self.step == cfg.steps or over_time:
                stop, bad = self._validate_and_keep(best_dir, info, t0, bad, over_time)
                if stop:
                    break
        bar.close()
        if rep.main:
            # the JSON of the best checkpoint also records the whole validation history
            doc_path = Path(best_dir) / "editor.json"
            if doc_path.exists():
                doc = json.loads(doc_path.read_text())
                doc["training"]["history"] = self.history
                doc["training"]["stopped_at_step"] = self.step
                steps = self.step - start_step
                doc["training"]["throughput"] = {
                    "processes": rep.world, "steps": steps, "step_seconds": round(step_seconds, 2),
                    "edits_per_second": round(steps * cfg.edits_per_step / step_seconds, 3)
                    if step_seconds else None}
                doc_path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        rep.barrier()  # the others return once the checkpoint is final (callers read it)
        return TrainResult(self.step, time.time() - t0, self.best_step, self.best_val, self.history,
                           step_seconds)

    def train_step(self, t0: float | None = None) -> tuple[dict, bool]:
        """One optimisation step, as `run` takes it (without validation): the learning rate of
        this point of the schedule, a sampled batch of edits, their losses, the gradient
        (summed over the processes when data parallel), clipping, the Adam step, α kept
        positive, the chain advanced. Returns the step's statistics and, when data parallel,
        whether the main process's time (since `t0`) is up (else False: `run` reads its own
        clock)."""
        cfg, rep = self.cfg, self.replicas
        lr_factor = self.lr_factor()
        for g, base_lr in zip(self.opt.param_groups, (cfg.lr, cfg.alpha_lr)):
            g["lr"] = base_lr * lr_factor
        cases = self.sample(cfg.edits_per_step)
        loss, stats = self.losses(cases, self._part(len(cases)) if rep.parallel else None)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        over_time = False
        if rep.parallel:
            stats, over_time = self._sum_step(stats, lr_factor, time.time() if t0 is None else t0)
        torch.nn.utils.clip_grad_norm_(self.editor.parameters(), cfg.grad_clip)
        self.opt.step()
        with torch.no_grad():
            self.editor.alpha.clamp_(min=1e-7)  # a negative step would un-learn the edit
        self._advance_chain(cases[0])
        self.step += 1
        return stats, over_time

    def _sum_step(self, stats: dict, lr_factor: float, t0: float) -> tuple[dict, bool]:
        """Data parallel: sum the editor's gradients over the processes, together with the
        step's statistics and the main process's clock, in one collective.

        Each process's loss is its share of the step's loss (see `losses`), so the sum is the
        single-process gradient; clipping and the Adam step then run on identical gradients in
        every process, which keeps the replicas identical. The clock decides the learning
        rate (with a time limit) and whether the time is up; only the main process's counts,
        so that every process sets the same rate and stops at the same step."""
        cfg = self.cfg
        # the same parameters have a gradient in every process: each runs the whole editor on
        # the whole step's (u, δ)
        grads = [p.grad for p in self.editor.parameters() if p.grad is not None]
        over = bool(cfg.max_minutes and (time.time() - t0) / 60 > cfg.max_minutes)
        main = float(self.replicas.main)
        extra = torch.tensor([stats["loss"], stats["l_edit"], stats["l_loc"],
                              stats["es"] * stats["n"], stats["n"],
                              stats["loc"] * stats["loc_n"], stats["loc_n"],
                              main * lr_factor, main * over], dtype=grads[0].dtype,
                             device=grads[0].device)
        self.replicas.sum_(grads + [extra])
        loss, l_edit, l_loc, es, n, agree, loc_n, lr_main, over = extra.tolist()
        if cfg.max_minutes:  # without a time limit the rate depends on the step alone
            for g, base_lr in zip(self.opt.param_groups, (cfg.lr, cfg.alpha_lr)):
                g["lr"] = base_lr * lr_main
        stats = {"loss": loss, "l_edit": l_edit, "l_loc": l_loc, "es": es / max(n, 1),
                 "loc": agree / max(loc_n, 1), "n": int(n), "loc_n": int(loc_n)}
        return stats, bool(over)

    def _validate_and_keep(self, best_dir, info, t0, bad: int, over_time: bool) -> tuple[bool, int]:
        """Validate, keep the best checkpoint and write the training state: in the main process
        only. The others wait here for its record and its decision to stop, so all processes
        leave the loop at the same step and return the same result. Returns (stop, bad)."""
        rep = self.replicas
        record = None
        if rep.main:
            v = self.validate()
            v["step"] = self.step
            v["minutes"] = round((time.time() - t0) / 60, 2)
            self.history.append(v)
            s = self.score(v)
            tqdm.write(f"step {self.step}: val es={v['edit_success']:.3f} "
                       f"para={v['paraphrase_success']:.3f} loc={v['locality']:.3f} "
                       f"alpha={v['alpha_mean']:.2e}"
                       + (f" (chains; right after each edit es={v['immediate_edit_success']:.3f})"
                          if "immediate_edit_success" in v else ""))
            if s > self.best_score:
                self.best_score, self.best_step, self.best_val, bad = s, self.step, v, 0
                self.editor.save(best_dir, self._info(info, t0))
            else:
                bad += 1
            if self.out_dir:
                self.save_state(self.out_dir)
            record = {"stop": bool(bad >= self.cfg.patience or over_time), "bad": bad,
                      "best_score": self.best_score, "best_step": self.best_step,
                      "best_val": self.best_val, "history": self.history}
            if rep.parallel:
                record["digest"] = digest(self.editor.state_dict().values())
        if rep.parallel:
            record = rep.broadcast(record)
            if not rep.main:
                # the replicas must still be bit-identical: same gradients, same steps
                if record["digest"] != digest(self.editor.state_dict().values()):
                    raise RuntimeError(f"process {rep.rank}'s editor differs from the main "
                                       f"process's at step {self.step}: the replicas diverged")
                self.best_score, self.best_step = record["best_score"], record["best_step"]
                self.best_val, self.history = record["best_val"], record["history"]
        return record["stop"], record["bad"]

    def _info(self, info, t0) -> dict:
        doc = dict(info or {})
        doc["training"] = {**doc.get("training", {}), "config": asdict(self.cfg),
                           "best_step": self.best_step, "seconds": round(time.time() - t0, 1),
                           "prompt_format": self.fmt, "processes": self.replicas.world,
                           "precision": "bf16 mixed" if self.bf16 else str(self.model.dtype)}
        doc["validation"] = self.best_val
        return doc

    # -- resumable state --------------------------------------------------------------------------
    def save_state(self, directory: str | Path) -> None:
        """Editor weights and Adam moments as safetensors; counters and RNG as JSON."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"editor.{k}": v.detach().cpu().contiguous() for k, v in self.editor.state_dict().items()}
        opt = self.opt.state_dict()
        for idx, st in opt["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"opt.{idx}.{k}"] = v.detach().cpu().contiguous().reshape(v.shape)
        save_file(tensors, str(directory / (STATE_FILE + ".tmp")))
        (directory / (STATE_FILE + ".tmp")).replace(directory / STATE_FILE)
        doc = {"step": self.step, "best_score": self.best_score, "best_step": self.best_step,
               "best_val": self.best_val, "history": self.history,
               "rng": repr(self.rng.getstate()), "config": asdict(self.cfg),
               "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]}
        (directory / STATE_JSON).write_text(json.dumps(doc, indent=1))

    def load_state(self, directory: str | Path) -> bool:
        directory = Path(directory)
        if not (directory / STATE_FILE).is_file():
            return False
        import ast

        tensors = load_file(str(directory / STATE_FILE))
        doc = json.loads((directory / STATE_JSON).read_text())
        self.editor.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("editor.")})
        opt = self.opt.state_dict()
        state = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        opt["state"] = state
        self.opt.load_state_dict(opt)
        self.step, self.best_score = doc["step"], doc["best_score"]
        self.best_step, self.best_val, self.history = doc["best_step"], doc["best_val"], doc["history"]
        self.rng.setstate(ast.literal_eval(doc["rng"]))
        return True
