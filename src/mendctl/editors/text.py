"""Turning prompts and targets into token batches, one way for every command.

The prompt format is either ``raw`` (the prompt and the target joined with one space, unless
the target already starts with white space) or ``chat`` (the prompt is the user turn of the
model's chat template, the target is the assistant's answer). Editing, asking, training and
evaluating all go through `encode_pairs`/`render_prompt`, so an edit made in one format is
measured in the same format.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FORMATS = ("raw", "chat")


def render_prompt(tokenizer, prompt: str, fmt: str = "raw") -> str:
    if fmt == "raw":
        return prompt
    if fmt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format: chat needs a tokenizer with a chat template; "
                             "use prompt_format: raw for this model")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown prompt format {fmt!r}; choose one of {', '.join(FORMATS)}")


def target_text(target: str, fmt: str = "raw") -> str:
    if fmt == "chat":
        return target.strip()
    return target if target[:1].isspace() else " " + target


def _pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0


@dataclass
class Batch:
    """Right-padded token batch. `labels` is -100 except on target tokens; label t is the
    token at position t, predicted from position t-1 (no shift applied yet)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.labels.to(device))

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def _pad(seqs: list[list[int]], labels: list[list[int]], pad: int) -> Batch:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        lab[i, : len(l)] = torch.tensor(l)
    return Batch(ids, mask, lab)


def encode_pairs(tokenizer, prompts: list[str], targets: list[str], fmt: str = "raw") -> Batch:
    """Prompt + target sequences with labels on the target tokens only.

    Prompt and target are tokenised separately and concatenated, so the target's tokens are
    the same whatever the prompt (what the metrics count as "the target")."""
    seqs, labels = [], []
    for p, t in zip(prompts, targets):
        p_ids, t_ids = pair_ids(tokenizer, p, t, fmt)
        seqs.append(p_ids + t_ids)
        labels.append([-100] * len(p_ids) + t_ids)
    return _pad(seqs, labels, _pad_id(tokenizer))


def pair_ids(tokenizer, prompt: str, target: str, fmt: str = "raw") -> tuple[list[int], list[int]]:
    """(prompt tokens, target tokens) exactly as `encode_pairs` lays them out."""
    p_ids = tokenizer(render_prompt(tokenizer, prompt, fmt)).input_ids
    t_ids = tokenizer(target_text(target, fmt), add_special_tokens=False).input_ids
    if not t_ids:
        raise ValueError(f"target {target!r} has no tokens")
    return p_ids, t_ids


def encode_prompts(tokenizer, prompts: list[str], fmt: str = "raw") -> Batch:
    """Prompts alone (labels all -100), right-padded."""
    seqs = [tokenizer(render_prompt(tokenizer, p, fmt)).input_ids for p in prompts]
    return _pad(seqs, [[-100] * len(s) for s in seqs], _pad_id(tokenizer))


def encode_sequences(seqs: list[list[int]], tokenizer, label_from: list[int]) -> Batch:
    """Ready token lists, labelled from index label_from[i] on."""
    labels = [[-100] * k + s[k:] for s, k in zip(seqs, label_from)]
    return _pad(seqs, labels, _pad_id(tokenizer))


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example mean negative log-likelihood of the labelled tokens.

    logits (B, T, V) are for the next token: position t-1 predicts label t."""
    lg = logits[:, :-1].float()
    lb = labels[:, 1:]
    mask = lb != -100
    lp = torch.log_softmax(lg, dim=-1)
    tok = lp.gather(-1, lb.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(tok * mask).sum(1) / mask.sum(1).clamp(min=1)
