"""The field's edit metrics, computed on a model as it is.

- edit success: every target token is the argmax under teacher forcing (per example);
- paraphrase success: the same on rephrased prompts;
- locality: top-1 agreement between the edited and the base model on the locality prompts'
  base continuations (the prompt's last position and the base model's greedy continuation),
  plus the mean KL(base ‖ edited) over those positions;
- perplexity on a generic-text sample; drawdown = ppl_after / ppl_before − 1;
- fluency of generated text: the n-gram entropy ROME and its successors report (the weighted
  bigram and trigram entropies, weights 2/3 and 4/3, averaged), which falls when a text
  repeats itself; and whether an answer repeats the edit's target.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from .forward import selected_logits
from .route import answering
from .text import Batch, encode_pairs, encode_sequences, render_prompt
from .weights import input_device


def _device(model):
    return input_device(model)


@torch.no_grad()
def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    batch = batch.to(_device(model))
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()


@torch.no_grad()
def _logits_at(model: nn.Module, batch: Batch, select: torch.Tensor) -> torch.Tensor:
    """fp32 logits (N, V) at the positions where `select` (B, T) holds, row-major: the output
    projection runs there only (`forward.selected_logits`; over a 49k vocabulary it costs more
    than the blocks at every other position)."""
    batch = batch.to(_device(model))
    return selected_logits(model, batch, select.to(batch.input_ids.device)).float()


@torch.no_grad()
def target_scores(model, tokenizer, prompts, targets, fmt="raw", chunk: int = 32,
                  token_accuracy: bool = False):
    """Per example: (success: bool, sum of target log-probs); with `token_accuracy` also the
    share of target tokens that are the argmax (EasyEdit's rewrite_acc / rephrase_acc, which
    the published tables report; success is the stricter exact match: every token)."""
    ok, lp, acc = [], [], []
    for i in range(0, len(prompts), chunk):
        batch = encode_pairs(tokenizer, prompts[i:i + chunk], targets[i:i + chunk], fmt)
        labels = batch.labels[:, 1:]
        mask = labels != -100
        select = torch.zeros_like(batch.labels, dtype=torch.bool)
        select[:, :-1] = mask  # position t predicts token t + 1
        logits = _logits_at(model, batch, select)
        lab = labels[mask].to(logits.device)
        n = len(labels)
        owner = torch.arange(n)[:, None].expand_as(mask)[mask].to(logits.device)
        hit = (logits.argmax(-1) == lab).float()
        logp = torch.log_softmax(logits, -1).gather(-1, lab[:, None])[:, 0]
        count = torch.zeros(n, device=logits.device).index_add(0, owner, torch.ones_like(hit))
        hits = torch.zeros(n, device=logits.device).index_add(0, owner, hit)
        ok += (hits == count).tolist()
        acc += (hits / count.clamp(min=1)).tolist()
        lp += torch.zeros(n, device=logits.device, dtype=logp.dtype).index_add(0, owner, logp).tolist()
    return (ok, lp, acc) if token_accuracy else (ok, lp)


def edit_success(model, tokenizer, prompts, targets, fmt="raw") -> list[bool]:
    return target_scores(model, tokenizer, prompts, targets, fmt)[0]


@dataclass
class LocalityRef:
    """The base model's view of some locality prompts: sequences (prompt + greedy
    continuation), which positions count, and the base log-probs there."""

    batch: Batch
    positions: torch.Tensor  # (B, T) bool: positions whose next-token distribution counts
    base_logp: torch.Tensor | None  # (N, V) log-probs at the counted positions (None: top-1 only)
    base_top1: torch.Tensor  # (N,)
    owner: torch.Tensor  # (N,) which prompt each counted position belongs to
    # prompts per forward, the reference's own: scoring the base model in the same chunks
    # repeats the reference's arithmetic exactly (KL 0, not rounding)
    chunk: int = 32

    def rows(self, idx: list[int]) -> "LocalityRef":
        """The reference of prompts `idx` only (in that order)."""
        keep = torch.isin(self.owner, torch.tensor(idx, dtype=self.owner.dtype))
        renum = torch.full((int(self.owner.max()) + 1 if len(self.owner) else 0,), -1,
                           dtype=self.owner.dtype)
        renum[torch.tensor(idx, dtype=torch.long)] = torch.arange(len(idx), dtype=self.owner.dtype)
        b = self.batch
        sel = torch.tensor(idx, dtype=torch.long)
        # positions are flattened row-major: a subset of rows in ascending order keeps them in
        # step with base_top1; other orders are sorted first
        if idx != sorted(idx):
            raise ValueError("rows() takes ascending prompt indices")
        return LocalityRef(Batch(b.input_ids[sel], b.attention_mask[sel], b.labels[sel]),
                           self.positions[sel], None if self.base_logp is None else self.base_logp[keep],
                           self.base_top1[keep], renum[self.owner[keep].long()], self.chunk)


@torch.no_grad()
def continued(model, tokenizer, prompts: list[str], fmt="raw", n_new: int = 4,
              chunk: int = 32) -> tuple[list[list[int]], list[int]]:
    """(token lists: each prompt and the model's greedy continuation of `n_new` tokens, the
    prompts' lengths): the sequences a locality reference scores (`reference_of`)."""
    seqs = [tokenizer(render_prompt(tokenizer, p, fmt)).input_ids for p in prompts]
    starts = [len(ids) for ids in seqs]
    return [x + c for x, c in zip(seqs, greedy_ids(model, seqs, n_new, chunk))], starts


@torch.no_grad()
def locality_reference(model, tokenizer, prompts: list[str], fmt="raw", n_new: int = 4,
                       chunk: int = 32) -> LocalityRef:
    """The model's view of locality prompts as it is now: each prompt goes on with the
    model's greedy continuation (a few tokens), and the model's log-probs at the prompt's
    last position and along the continuation are what a later state is compared with."""
    return reference_of(model, tokenizer, *continued(model, tokenizer, prompts, fmt, n_new, chunk), chunk)


@torch.no_grad()
def reference_of(model, tokenizer, seqs: list[list[int]], starts: list[int], chunk: int = 32) -> LocalityRef:
    """`locality_reference` of sequences already continued (`continued`; any subset of them)."""
    batch = encode_sequences(seqs, tokenizer, starts)
    # position t predicts token t+1: count the last prompt position and the continuation
    pos = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    for i, (s, k) in enumerate(zip(seqs, starts)):
        pos[i, k - 1: len(s) - 1] = True
    lp = torch.cat([torch.log_softmax(lg, -1).cpu() for _, lg in _logits_by_rows(model, batch, pos, chunk)])
    owner = torch.arange(len(seqs))[:, None].expand_as(pos)[pos]
    return LocalityRef(batch, pos, lp, lp.argmax(-1), owner, chunk)


def _per_prompt(values: torch.Tensor, owner: torch.Tensor) -> list[float]:
    """Means of `values` (one per counted position) grouped by the prompt owning each."""
    n = int(owner.max()) + 1 if len(owner) else 0
    return [float(values[owner == i].mean()) for i in range(n)]


def _logits_by_rows(model: nn.Module, batch: Batch, select: torch.Tensor, chunk: int):
    """`_logits_at` a chunk of prompts at a time: yields (slice of the counted positions, their
    logits). Counted positions are row-major, so a run of rows owns a contiguous slice. One
    forward over thousands of prompts would hold full-vocabulary rows for every counted
    position at once (a chain of 1,000's 5,000 locality prompts: ~4 GB per copy)."""
    start = 0
    for i in range(0, len(select), chunk):
        rows = slice(i, i + chunk)
        # right-padded: drop the columns that are padding in every row of the chunk
        width = max(int(batch.attention_mask[rows].sum(1).max()), 1)
        sub = Batch(batch.input_ids[rows, :width], batch.attention_mask[rows, :width],
                    batch.labels[rows, :width])
        sel = select[rows, :width]
        n = int(sel.sum())
        if n:
            yield slice(start, start + n), _logits_at(model, sub, sel)
        start += n


@torch.no_grad()
def locality_scores(model, ref: LocalityRef, chunk: int | None = None) -> tuple[list[float], list[float]]:
    """Per prompt: top-1 agreement with the base, and mean KL(base ‖ model); `chunk` prompts
    per forward (default: the reference's)."""
    agree = torch.empty(len(ref.owner))
    kl = torch.empty(len(ref.owner))
    for at, logits in _logits_by_rows(model, ref.batch, ref.positions, chunk or ref.chunk):
        lp = torch.log_softmax(logits, -1).cpu()
        base = ref.base_logp[at]
        agree[at] = (lp.argmax(-1) == ref.base_top1[at]).float()
        kl[at] = (base.exp() * (base - lp)).sum(-1)
    return _per_prompt(agree, ref.owner), _per_prompt(kl, ref.owner)


@torch.no_grad()
def top1_agreement(model, ref: LocalityRef, chunk: int | None = None) -> list[float]:
    """Per prompt: top-1 agreement with the base (what `locality_scores` gives without the KL,
    so a reference without log-probs will do)."""
    agree = torch.empty(len(ref.owner))
    for at, logits in _logits_by_rows(model, ref.batch, ref.positions, chunk or ref.chunk):
        agree[at] = (logits.argmax(-1).cpu() == ref.base_top1[at]).float()
    return _per_prompt(agree, ref.owner)


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], chunk: int = 8, max_tokens: int = 256) -> float:
    """Token-level perplexity over the texts (each truncated to max_tokens)."""
    nll, count = 0.0, 0
    for i in range(0, len(texts), chunk):
        seqs = [tokenizer(t).input_ids[:max_tokens] for t in texts[i:i + chunk]]
        batch = encode_sequences(seqs, tokenizer, [1] * len(seqs))
        logits = _logits(model, batch)[:, :-1]
        labels = batch.labels[:, 1:].to(logits.device)
        mask = labels != -100
        logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        nll -= float((logp * mask).sum())
        count += int(mask.sum())
    return math.exp(nll / max(count, 1))


class _NoEmptyAnswer:
    """A logits processor that forbids the end of text (any special token) while a row's
    answer is still blank, so an answer shown to a user says something: SmolLM2 ends "Who is the prime
    minister of India?" at once, and '' → '' tells the user nothing about the edit."""

    def __init__(self, tokenizer, start: int):
        self.tok, self.start = tokenizer, start

    def blank(self, ids: list[int]) -> bool:
        return not self.tok.decode(ids, skip_special_tokens=True).strip()

    def forbid(self, scores: torch.Tensor) -> None:
        """Rule out, in one row's scores, every special token (the end of text and its kin,
        which decode to nothing)."""
        ids = [i for i in self.tok.all_special_ids if i < scores.shape[-1]]
        scores[ids] = -float("inf")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for r in range(input_ids.shape[0]):
            if self.blank(input_ids[r, self.start:].tolist()):
                self.forbid(scores[r])
        return scores


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], fmt="raw", max_new_tokens: int = 16,
             chunk: int = 16, unpadded: bool = False, say_something: bool = False) -> list[str]:
    """Greedy answers, several prompts per call: left padding, so every prompt's new tokens
    start at the same position (the model's generate takes positions from the mask).
    `unpadded=True` generates prompts of equal token length together instead, with no
    padding at all (what routed edits need: see `greedy_unpadded`). `say_something`: the end
    of text is not taken while an answer is still blank (answers shown to users; the metrics
    leave it off)."""
    if unpadded:
        return greedy_unpadded(model, tokenizer, prompts, fmt, max_new_tokens, chunk, say_something)
    out = []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    texts = [render_prompt(tokenizer, p, fmt) for p in prompts]
    for i in range(0, len(texts), chunk):
        rows = [tokenizer(t).input_ids for t in texts[i:i + chunk]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=_device(model))
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=_device(model))
        extra = {}
        if say_something:
            from transformers import LogitsProcessorList

            extra["logits_processor"] = LogitsProcessorList([_NoEmptyAnswer(tokenizer, width)])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, **extra)
        out += [tokenizer.decode(g[width:], skip_special_tokens=True) for g in gen]
    return out


@torch.no_grad()
def greedy_ids(model, rows: list[list[int]], max_new_tokens: int, chunk: int = 16,
               eos: int | None = None, forbid=None) -> list[list[int]]:
    """Greedy continuations (token ids) of token rows, from batches that are never padded:
    rows of the same length generate together, one token per step with a KV cache. A row
    stops at `eos` (its batch runs on until all have); `forbid(answer, scores)` may rule
    tokens out of a row's scores. Routed edits read the whole sequence (route.py keeps each
    forward's tokens and gate-layer states to follow the cache) and a padded first token would
    move their gates, so this is how a routed state generates."""
    by_length: dict[int, list[int]] = {}
    for j, r in enumerate(rows):
        by_length.setdefault(len(r), []).append(j)
    out: list[list[int]] = [[] for _ in rows]
    for width, members in by_length.items():
        for i in range(0, len(members), chunk):
            group = members[i:i + chunk]
            answers = [out[j] for j in group]
            done = [False] * len(group)
            step = torch.tensor([rows[j] for j in group], device=_device(model))
            cache = None
            with answering([width] * len(group)):  # (routed edits read where answers start)
                for _ in range(max_new_tokens):
                    o = model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=1)
                    cache = o.past_key_values
                    scores = o.logits[:, -1].float()
                    if forbid is not None:
                        for r, a in enumerate(answers):
                            if not done[r]:
                                forbid(a, scores[r])
                    nxt = scores.argmax(-1)
                    for r, t in enumerate(nxt.tolist()):
                        if not done[r]:
                            answers[r].append(t)
                            done[r] = t == eos
                    if all(done):
                        break
                    step = nxt[:, None]
    return out


def greedy_unpadded(model, tokenizer, prompts: list[str], fmt="raw", max_new_tokens: int = 16,
                    chunk: int = 16, say_something: bool = False) -> list[str]:
    """Greedy answers by `greedy_ids`: what a routed state answers."""
    rows = [tokenizer(render_prompt(tokenizer, p, fmt)).input_ids for p in prompts]
    blank = _NoEmptyAnswer(tokenizer, 0)

    def forbid(answer, scores):
        if blank.blank(answer):
            blank.forbid(scores)

    new = greedy_ids(model, rows, max_new_tokens, chunk, tokenizer.eos_token_id,
                     forbid if say_something else None)
    return [tokenizer.decode(a, skip_special_tokens=True) for a in new]


_TOKEN = re.compile(r"\w+|[^\w\s]")


#: Tokens of each answer generated for the fluency measures: long enough to see an answer
#: repeat itself, short enough to stay about the prompt.
ANSWER_TOKENS = 24


def fluency_answers(model, tokenizer, prompts: list[str], fmt="raw") -> list[str]:
    """The continuations the fluency measures score: greedy, `ANSWER_TOKENS` long, and not
    ended while still blank. SmolLM2 ends a question such as "Who is the prime minister of
    India?" at once; scored as it comes, the unedited model's fluency would be 0 on questions
    and any edit that makes it answer would look like a gain."""
    return greedy_unpadded(model, tokenizer, prompts, fmt, ANSWER_TOKENS, say_something=True)


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3),
                  weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """Fluency: the mean over n of weight_n × the entropy (bits) of the text's n-gram
    frequencies, on words and punctuation (ROME's generation entropy). A text that repeats
    itself has few distinct n-grams and a low value; 0 for a text shorter than n words."""
    words = _TOKEN.findall(text.lower())
    out = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        out.append(w * h)
    return sum(out) / len(out)


def repeats_target(answer: str, target: str) -> bool:
    """Does `answer` write the edit's target more than once (an edit acting on its output)?"""
    t = target.strip()
    return bool(t) and answer.count(t) > 1
