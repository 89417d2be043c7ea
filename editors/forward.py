"""Forward passes that compute only what editing needs.

Two savings, both exact (the same numbers as a full forward, up to float rounding order):
- `PrefixCache`: an edit changes weights in the last few blocks only, so everything below the
  first edited block is the same for the base and the edited model. One no-grad pass stores the
  hidden state entering that block; later passes swap the lower blocks for stubs that return
  it, so only the edited blocks run (with gradients where needed).
- `selected_logits`: the output projection is applied only at the positions a loss reads (for
  a 49k vocabulary it costs more than three blocks per position).

Both work on any model whose blocks sit in one ``nn.ModuleList`` and whose base model
(``model.base_model``) returns ``last_hidden_state`` after the final norm; anything else falls
back to full passes (`supported()` says which).
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from .text import Batch
from .weights import WeightSpec

_BLOCK = re.compile(r"^(.*)\.(\d+)\.")


def _strip(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter names of the full model → names inside model.base_model."""
    prefix = model.base_model_prefix + "." if getattr(model, "base_model_prefix", "") else ""
    out = {}
    for n, w in weights.items():
        if prefix and not n.startswith(prefix):
            raise KeyError(f"{n} is outside {prefix!r}")
        out[n[len(prefix):]] = w
    return out


def supported(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return (model.base_model is not model and model.get_output_embeddings() is not None
            and not getattr(cfg, "final_logit_softcapping", None))


def selected_logits(model: nn.Module, batch: Batch, select: torch.Tensor,
                    weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits (N, V) at the positions where `select` (B, T) is True, optionally with some
    parameters replaced functionally (names as in model.named_parameters())."""
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if not supported(model):
        if weights:
            logits = functional_call(model, weights, args=(), kwargs=kwargs).logits
        else:
            logits = model(**kwargs).logits
        return logits[select]
    base = model.base_model
    if weights:
        hidden = functional_call(base, _strip(model, weights), args=(), kwargs=kwargs).last_hidden_state
    else:
        hidden = base(**kwargs).last_hidden_state
    return model.get_output_embeddings()(hidden[select])


class _Stub(nn.Module):
    """Stands in for a lower block: returns the cached hidden state, shaped like the block's
    own output (a tensor, or a tuple whose first item is the hidden state)."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


class PrefixCache:
    """Skip the blocks below the first edited one (see the module docstring)."""

    def __init__(self, model: nn.Module, specs: list[WeightSpec]):
        self.model = model
        self.blocks: nn.ModuleList | None = None
        self.start = 0
        matches = [_BLOCK.match(s.module_name) for s in specs]
        found = {(m.group(1), int(m.group(2))) for m in matches if m}
        if specs and all(matches) and len({p for p, _ in found}) == 1:
            path = next(iter(found))[0]
            mod = model.get_submodule(path)
            if isinstance(mod, nn.ModuleList):
                self.blocks = mod
                self.start = min(i for _, i in found)
        self.enabled = self.blocks is not None and self.start > 0 and supported(model)
        self.memo_enabled = False
        self.memo: dict[bytes, torch.Tensor] = {}
        self.memo_dtype = torch.float32
        self._as_tuple = False

    def enable_memo(self, dtype: torch.dtype = torch.float32) -> None:
        """Remember each sequence's hidden state (only valid while the base model is fixed)."""
        self.memo_enabled, self.memo_dtype = True, dtype

    @torch.no_grad()
    def _compute(self, batch: Batch) -> tuple[torch.Tensor, bool]:
        seen = {}

        def grab(module, args, output):
            seen["h"] = output[0] if isinstance(output, tuple) else output
            seen["tuple"] = isinstance(output, tuple)
            raise _Stop  # the blocks above are not needed

        h = self.blocks[self.start - 1].register_forward_hook(grab)
        try:
            self.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        except _Stop:
            pass
        finally:
            h.remove()
        return seen["h"].detach(), seen["tuple"]

    @torch.no_grad()
    def hidden(self, batch: Batch) -> tuple[torch.Tensor, bool]:
        """The hidden state entering block `start` for every row of this right-padded batch.

        With `memo` on (training, where the base model never changes), each distinct token
        sequence is computed once and then read back: hidden states are causal, so a row's
        values do not depend on the other rows or on padding (padding positions get zeros,
        which no loss reads)."""
        if not self.memo_enabled:
            return self._compute(batch)
        lengths = batch.attention_mask.sum(1).tolist()
        keys = [batch.input_ids[i, :n].cpu().numpy().tobytes() for i, n in enumerate(lengths)]
        missing = sorted({i for i, k in enumerate(keys) if k not in self.memo},
                         key=lambda i: keys[i])
        if missing:
            sub = Batch(batch.input_ids[missing], batch.attention_mask[missing], batch.labels[missing])
            width = max(lengths[i] for i in missing)
            h, self._as_tuple = self._compute(Batch(sub.input_ids[:, :width],
                                                    sub.attention_mask[:, :width],
                                                    sub.labels[:, :width]))
            for j, i in enumerate(missing):
                self.memo[keys[i]] = h[j, : lengths[i]].to(self.memo_dtype).clone()
        first = next(iter(self.memo.values()))
        param = next(self.model.parameters())
        out = torch.zeros(batch.input_ids.shape + (first.shape[-1],), dtype=param.dtype,
                          device=param.device)
        for i, k in enumerate(keys):
            out[i, : lengths[i]] = self.memo[k].to(param.device, param.dtype)
        return out, self._as_tuple

    @contextmanager
    def skipping(self, hidden: torch.Tensor, as_tuple: bool):
        """Inside, the model's lower blocks return `hidden` instead of computing."""
        saved = [self.blocks[i] for i in range(self.start)]
        stub = _Stub(hidden, as_tuple)
        try:
            for i in range(self.start):
                self.blocks[i] = stub
            yield
        finally:
            for i, b in enumerate(saved):
                self.blocks[i] = b


class _Stop(Exception):
    """Raised from a hook to end a forward pass early once the wanted activation is seen."""
