"""The MEND gradient transform g_ℓ (Eq. 3 of Mitchell et al., 2022) and its input normaliser.

For one edited layer ℓ and one token, z = concat(u, δ) (the layer's input and the gradient of
the edit loss w.r.t. its output), normalised by running statistics, and

    h = z + σ(s¹_ℓ ⊙ (U₁V₁ z + b) + o¹_ℓ)
    g = h + σ(s²_ℓ ⊙ U₂V₂ h + o²_ℓ)

with low-rank U_jV_j, U zero at start (so g is the identity), per-layer scale s and offset o.
g is split back into the pseudo-activation ũ and pseudo-delta δ̃. One network serves every
layer of one weight shape; the layer index picks its s, o.

σ is ReLU written as clamp(min=0): at the identity start every pre-activation is exactly 0,
where nn.ReLU's gradient is 0 and training could never leave the start; clamp passes the
gradient at 0 (the reference code does the same).
"""
from __future__ import annotations

import torch
from torch import nn


class RunningNorm(nn.Module):
    """Per-feature running mean and variance (Welford over all tokens seen while training).

    Statistics update only in training mode and are saved with the editor; in eval mode they
    are frozen, so an edit is a pure function of (editor, model, example)."""

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        b_mean = x.mean(0)
        b_m2 = ((x - b_mean) ** 2).sum(0)
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += b_m2 + delta**2 * (self.count * n / total)
        self.count.copy_(total)

    def std(self) -> torch.Tensor:
        if self.count < 2:
            return torch.ones_like(self.mean)
        return (self.m2 / (self.count - 1)).clamp(min=0).sqrt() + self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:  # nothing seen yet: pass through
            return x
        mean = self.mean.to(x.dtype)
        std = self.std().to(x.dtype)
        return (x - mean) / std


def _relu(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=0)


class GradientTransform(nn.Module):
    """g for every layer of one weight shape (d_in → d_out), with n_layers sets of s, o."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_layers: int, norm: bool = True):
        super().__init__()
        self.d_in, self.d_out, self.rank, self.n_layers = d_in, d_out, rank, n_layers
        dim = d_in + d_out
        self.use_norm = norm
        self.norm_u = RunningNorm(d_in)
        self.norm_d = RunningNorm(d_out)
        self.V1 = nn.Parameter(torch.empty(rank, dim))
        self.U1 = nn.Parameter(torch.zeros(dim, rank))
        self.b1 = nn.Parameter(torch.zeros(dim))
        self.V2 = nn.Parameter(torch.empty(rank, dim))
        self.U2 = nn.Parameter(torch.zeros(dim, rank))
        self.s1 = nn.Parameter(torch.ones(n_layers, dim))
        self.o1 = nn.Parameter(torch.zeros(n_layers, dim))
        self.s2 = nn.Parameter(torch.ones(n_layers, dim))
        self.o2 = nn.Parameter(torch.zeros(n_layers, dim))
        nn.init.xavier_uniform_(self.V1)
        nn.init.xavier_uniform_(self.V2)

    def observe(self, u: torch.Tensor, d: torch.Tensor) -> None:
        """Feed the normaliser (training only)."""
        if self.use_norm and self.training:
            self.norm_u.update(u)
            self.norm_d.update(d)

    def forward(self, u: torch.Tensor, d: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, d_in), (n, d_out) → pseudo-activations ũ, pseudo-deltas δ̃ of the same shapes."""
        if self.use_norm:
            u, d = self.norm_u(u), self.norm_d(d)
        z = torch.cat([u, d], dim=-1)
        h = z + _relu(self.s1[layer] * ((z @ self.V1.T) @ self.U1.T + self.b1) + self.o1[layer])
        g = h + _relu(self.s2[layer] * ((h @ self.V2.T) @ self.U2.T) + self.o2[layer])
        return g[:, : self.d_in], g[:, self.d_in:]
