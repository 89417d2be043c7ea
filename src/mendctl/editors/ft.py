"""Fine-tuning baselines behind the editor interface: FT and FT+KL (the paper's comparison rows).

Both optimise the edited weights directly with Adam on the edit loss −log p(y_e | x_e), for at
most `steps` steps, stopping early once every target token is the argmax. FT+KL adds
KL(p_W(·|x_loc) ‖ p_W'(·|x_loc)) on locality inputs (the request's own locality prompts, else a
few generic-text openings) to keep the rest of the model in place. The result is a dense ΔW per
weight, stored as such in the ledger.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from .delta import Delta, LayerDelta
from .forward import selected_logits
from .mend.capture import label_positions, per_example_nll
from .text import encode_pairs, encode_prompts
from .weights import WeightSpec, input_device


class FTEditor:
    """`kl_weight` 0 gives FT, > 0 gives FT+KL."""

    def __init__(self, specs: list[WeightSpec], steps: int = 25, lr: float = 5e-4,
                 kl_weight: float = 0.0, generic_texts: list[str] | None = None):
        self.specs, self.steps, self.lr, self.kl_weight = list(specs), steps, lr, kl_weight
        self.name = "ft_kl" if kl_weight > 0 else "ft"
        self.generic = [" ".join(t.split()[:24]) for t in (generic_texts or [])][:4]
        self.info = {"editor": self.name, "steps": steps, "lr": lr, "kl_weight": kl_weight}

    def edit(self, model: nn.Module, tokenizer, prompts: list[str], targets: list[str],
             fmt: str = "raw", locality: list[str] | None = None, max_steps: int = 1,
             max_norm: float | None = None, protect=None, preserve=None, apply=None) -> Delta:
        """`self.steps` Adam steps on the edited weights (the editor contract's MEND settings,
        `max_steps` to `apply`, do not apply to fine-tuning and are ignored)."""
        t0 = time.perf_counter()
        device = input_device(model)
        batch = encode_pairs(tokenizer, prompts, targets, fmt).to(device)
        select, labels, owner = label_positions(batch)
        base = {s.name: model.get_parameter(s.name).detach().float() for s in self.specs}
        params = {n: w.clone().requires_grad_(True) for n, w in base.items()}
        opt = torch.optim.Adam(list(params.values()), lr=self.lr)
        loc_batch = loc_sel = base_lp = None
        if self.kl_weight > 0:
            loc_prompts = list(locality or []) or self.generic
            if loc_prompts:
                loc_batch = encode_prompts(tokenizer, loc_prompts, fmt).to(device)
                loc_sel = loc_batch.attention_mask.bool()
                with torch.no_grad():
                    base_lp = torch.log_softmax(selected_logits(model, loc_batch, loc_sel).float(), -1)
        steps_run = 0
        with torch.enable_grad():
            for _ in range(self.steps):
                cast = {n: p.to(model.get_parameter(n).dtype) for n, p in params.items()}
                logits = selected_logits(model, batch, select, cast)
                if bool((logits.argmax(-1) == labels).all()):
                    break  # every target token is already the argmax
                loss = per_example_nll(logits, labels, owner, batch.labels.shape[0]).sum()
                if base_lp is not None:
                    lp = torch.log_softmax(selected_logits(model, loc_batch, loc_sel, cast).float(), -1)
                    loss = loss + self.kl_weight * (base_lp.exp() * (base_lp - lp)).sum(-1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps_run += 1
        layers = {s.name: LayerDelta(s.name, s.shape, dense=(params[s.name].detach() - base[s.name]).cpu(),
                                     transposed=s.transposed) for s in self.specs}
        return Delta(layers, {"editor": self.name, "ft_steps": str(steps_run),
                              "compute_seconds": f"{time.perf_counter() - t0:.4f}"})
