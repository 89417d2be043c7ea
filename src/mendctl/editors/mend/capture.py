"""Gradient capture: each edited layer's input u and output gradient δ, one pair per token.

One forward and backward of the edit loss with only the edited weights requiring grad (so
autograd records nothing below the first edited layer). Forward hooks keep each edited
module's input and output; one `torch.autograd.grad` call then returns the outputs' gradients
δ. Everything lives in the `GradCapture` object and every hook is removed on exit — nothing is
attached to tensors or parameters.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from ..forward import selected_logits
from ..text import Batch
from ..weights import WeightSpec


@contextmanager
def grad_only_on(model: nn.Module, names: list[str]):
    """Temporarily make exactly `names` require grad (restores the previous flags)."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    wanted = set(names)
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in wanted)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])


class GradCapture:
    """Context manager collecting u (module input) and the module output per edited weight;
    `grads()` then takes δ = ∂loss/∂output for all of them in one backward pass.

    Asking autograd for the outputs' gradients (not the weights') means no dense weight
    gradient is ever computed: the backward does only what δ needs."""

    def __init__(self, model: nn.Module, specs: list[WeightSpec]):
        self.model, self.specs = model, specs
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self._handles = []

    def _hook(self, name: str):
        def fwd(module, args, output):
            self.inputs[name] = args[0].detach()
            self.outputs[name] = output
        return fwd

    def __enter__(self) -> "GradCapture":
        for s in self.specs:
            mod = self.model.get_submodule(s.module_name)
            self._handles.append(mod.register_forward_hook(self._hook(s.name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def backward(self, loss: torch.Tensor) -> None:
        names = [s.name for s in self.specs]
        missing = [n for n in names if n not in self.outputs or not self.outputs[n].requires_grad]
        if missing:
            raise RuntimeError(f"no gradient can reach {missing[0]}; is it on the loss path?")
        grads = torch.autograd.grad(loss, [self.outputs[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            if g is None:
                raise RuntimeError(f"no gradient reached {n}; is it on the loss path?")
            self.grads[n] = g.detach()
        self.outputs.clear()  # drop the graph

    def pairs(self, mask: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per weight: (u, δ) flattened over batch and sequence, padding tokens dropped."""
        keep = mask.reshape(-1).bool()
        out = {}
        for s in self.specs:
            if s.name not in self.grads:
                raise RuntimeError(f"no gradient reached {s.name}; is it on the loss path?")
            u = self.inputs[s.name].reshape(-1, s.in_features)[keep]
            d = self.grads[s.name].reshape(-1, s.out_features)[keep]
            out[s.name] = (u.float(), d.float())
        return out


def label_positions(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(select (B, T) of the positions that predict a label, the labels there, their example)."""
    nxt = batch.labels[:, 1:]
    select = torch.zeros_like(batch.labels, dtype=torch.bool)
    select[:, :-1] = nxt != -100
    owner = torch.arange(batch.labels.shape[0], device=select.device)[:, None].expand_as(select)
    return select, nxt[nxt != -100], owner[select]


def per_example_nll(logits: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """Mean NLL over each example's labelled tokens, from logits at the selected positions."""
    tok = -torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None])[:, 0]
    total = torch.zeros(n, dtype=tok.dtype, device=tok.device).index_add(0, owner, tok)
    count = torch.zeros(n, dtype=tok.dtype, device=tok.device).index_add(0, owner, torch.ones_like(tok))
    return total / count.clamp(min=1)


def edit_loss(model: nn.Module, batch: Batch, weights=None) -> torch.Tensor:
    """−log p(y_e | x_e): per example the mean over target tokens, summed over examples (so a
    token's gradient does not shrink when more edits share the batch)."""
    return _loss_and_hits(model, batch, weights, hits=False)[0]


def _loss_and_hits(model: nn.Module, batch: Batch, weights=None, hits: bool = True,
                   confidence: float | None = None):
    """The edit loss and, with `hits`, per example whether every target token is already the
    argmax (the metrics' edit success, read off the same logits), and with `confidence`, also
    has at least that probability; and per example whether every target token is the argmax
    (with or without `confidence`)."""
    select, labels, owner = label_positions(batch)
    logits = selected_logits(model, batch, select, weights)
    n = batch.labels.shape[0]
    each = per_example_nll(logits, labels, owner, n)
    loss = each.sum()
    if not hits:
        return loss, None, each, None
    wrong = logits.detach().argmax(-1) != labels
    bad = wrong
    if confidence is not None:
        lp = torch.log_softmax(logits.detach().float(), -1).gather(-1, labels[:, None])[:, 0]
        bad = wrong | (lp < math.log(confidence))
    count = lambda x: torch.zeros(n, device=owner.device).index_add(0, owner, x.float())  # noqa: E731
    return loss, (count(bad) == 0).tolist(), each, (count(wrong) == 0).tolist()


def capture_edit_gradients(model: nn.Module, specs: list[WeightSpec], batch: Batch, skip=None,
                           weights: dict[str, torch.Tensor] | None = None, success: bool = False,
                           per_example: bool = False, confidence: float | None = None):
    """Run forward+backward of the edit loss; return ({name: (u, δ)}, loss value).

    `skip` is an optional context (PrefixCache.skipping) that replaces the lower blocks by
    their cached output for this batch. `weights` ({name: tensor}) stands in for the edited
    parameters (functionally; the model is not touched): the edit is then computed at that
    state of the weights, e.g. deep in a chain of earlier edits.

    With `success`, returns (pairs, loss, ok, argmax): ok[i] says whether every target token of
    example i is already the argmax (the metrics' edit success, read off the logits the loss
    needs anyway); when all are, the backward is skipped and pairs is None. `confidence` raises
    the bar of `ok` (every target token also has at least that probability); `argmax` is the
    bare argmax test either way.

    With `per_example`, the loss returned is each example's (a list) instead of their sum."""
    if weights is not None:
        # leaves that require grad, so the edited modules' outputs are on the loss path
        weights = {s.name: weights[s.name].detach().requires_grad_() for s in specs}
    with grad_only_on(model, [s.name for s in specs]), torch.enable_grad(), \
            GradCapture(model, specs) as cap, (skip if skip is not None else nullcontext()):
        loss, ok, each, argmax = _loss_and_hits(model, batch, weights, hits=success,
                                                confidence=confidence)
        value = each.detach().tolist() if per_example else float(loss.detach())
        if success and all(ok):
            cap.outputs.clear()  # drop the graph
            return None, value, ok, argmax
        # gradients of the module outputs only: nothing is left in the weights' .grad and no
        # dense weight gradient is computed
        cap.backward(loss)
    pairs = cap.pairs(batch.attention_mask)
    return (pairs, value, ok, argmax) if success else (pairs, value)


def pair_owners(mask: torch.Tensor) -> torch.Tensor:
    """The example each row of `GradCapture.pairs(mask)` comes from: a token's (u, δ) belong to
    its own example alone (the loss is a sum over examples and no token attends across rows)."""
    owner = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)
    return owner.reshape(-1)[mask.reshape(-1).bool()]
