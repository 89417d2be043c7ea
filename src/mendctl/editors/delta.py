"""Edit deltas: what one edit changes, as data.

A MEND edit is exactly low rank: for each edited weight ΔW = -α · Σ_i δ̃_i ũ_iᵀ, so it is kept
as its factors ũ (n × d_in), δ̃ (n × d_out) and the step α, and ΔW is only built when it is
applied. Baselines (fine-tuning) produce a dense ΔW; a `LayerDelta` holds either form.

This module also owns the two rules that make a ledger replayable bit for bit:
- a state is `W_base + ΔW_1 + ΔW_2 + ...` added in order, in fp32, each dense ΔW computed from
  its factors in float64 and rounded once (so the result does not depend on thread count or
  matmul blocking);
- the state hash is sha256 over the edited tensors in sorted-name order (name, shape, bytes).

It depends on torch only; serialisation to files is the store's job (`to_tensors`/`from_tensors`
give it flat, safetensors-ready dicts).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

FORMAT = "mendctl.delta"
FORMAT_VERSION = 1
_SEP = "::"
#: singular values of a low-rank ΔW below this fraction of the largest are float rounding
#: (fp32 keeps about 7 significant digits), so `compacted` may drop them
COMPACT_RTOL = 1e-7


@dataclass
class LayerDelta:
    """The change to one weight tensor.

    `shape` is the parameter's shape as the model stores it. `transposed` is True when the
    module keeps its weight as (in, out) (GPT-2's Conv1D) rather than (out, in) (nn.Linear);
    the factors are always in the (out, in) sense: ΔW_(out,in) = -α · dᵀ u.
    """

    name: str
    shape: tuple[int, int]
    u: torch.Tensor | None = None  # (n, d_in) pseudo-activations
    d: torch.Tensor | None = None  # (n, d_out) pseudo-deltas
    alpha: torch.Tensor | None = None  # 0-d step size
    dense: torch.Tensor | None = None  # ΔW in the parameter's stored orientation
    transposed: bool = False
    # `applied_factors` per device, made once: a routed state of a thousand edits installs
    # every edit's factors on each load
    _applied: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if self.dense is None and (self.u is None or self.d is None or self.alpha is None):
            raise ValueError(f"{self.name}: a delta needs either dense or all of u, d, alpha")
        if self.alpha is not None and not isinstance(self.alpha, torch.Tensor):
            self.alpha = torch.tensor(float(self.alpha), dtype=torch.float32)

    @property
    def is_lowrank(self) -> bool:
        return self.dense is None

    def applied_factors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, −α·d) in float32 on `device`: ΔW x = dᵀ(−α)(u x), as a hook applies it without
        building ΔW. Made once per device: the factors must not change once a hook has used them
        (an editor scales a step's δ̃ only right after making it)."""
        key = str(device) if device is not None else str(self.u.device)
        if key not in self._applied:
            u, d = self.u.detach().float(), self.d.detach().float() * -self.alpha.detach().float()
            self._applied[key] = (u.to(device), d.to(device)) if device is not None else (u, d)
        return self._applied[key]

    @property
    def rank(self) -> int:
        """Number of factor rows (an upper bound on the rank of ΔW); full for dense deltas."""
        return int(self.u.shape[0]) if self.is_lowrank else min(self.shape)

    def to_dense(self) -> torch.Tensor:
        """ΔW in the parameter's stored orientation, fp32, on the CPU."""
        if not self.is_lowrank:
            return self.dense.detach().to("cpu", torch.float32)
        u = self.u.detach().to("cpu", torch.float64)
        d = self.d.detach().to("cpu", torch.float64)
        w = (d.T @ u) * (-self.alpha.detach().to("cpu", torch.float64))
        if self.transposed:
            w = w.T
        return w.to(torch.float32).contiguous()

    def frobenius_norm(self) -> float:
        if not self.is_lowrank:
            return float(torch.linalg.norm(self.to_dense().double()))
        # ‖dᵀu‖_F² = Σ (d dᵀ) ⊙ (u uᵀ): two (rows × rows) Gram matrices in float64 instead of
        # the (out × in) product (the drift guard takes this for every step of every fact)
        u = self.u.detach().to("cpu", torch.float64)
        d = self.d.detach().to("cpu", torch.float64)
        sq = float(((d @ d.T) * (u @ u.T)).sum())
        return abs(float(self.alpha)) * max(sq, 0.0) ** 0.5

    def nbytes(self) -> int:
        ts = [self.dense] if not self.is_lowrank else [self.u, self.d, self.alpha]
        return sum(t.numel() * t.element_size() for t in ts)

    def is_finite(self) -> bool:
        ts = [self.dense] if not self.is_lowrank else [self.u, self.d, self.alpha]
        return all(bool(torch.isfinite(t).all()) for t in ts)

    def compacted(self, rtol: float = COMPACT_RTOL) -> "LayerDelta":
        """The same ΔW from fewer factor rows, when dᵀu has fewer than its rows' worth of
        singular values above `rtol` × the largest (computed in float64: QR of both factors,
        an SVD of the small core). A multi-step edit stacks one row per token per step, but
        its steps write along nearly the same directions, so most of those rows are
        redundant. What is dropped is below `rtol` of the largest direction, i.e. float
        rounding at the default; the stored factors then define the state, as always."""
        if not self.is_lowrank or self.u.shape[0] <= 1:
            return self
        u, d = self.u.detach().double().cpu(), self.d.detach().double().cpu()
        qu, ru = torch.linalg.qr(u.T)  # (in, n), (n, n)
        qd, rd = torch.linalg.qr(d.T)  # (out, n), (n, n)
        a, sv, bh = torch.linalg.svd(rd @ ru.T)  # dᵀu = qd (rd ruᵀ) quᵀ
        k = max(1, int((sv > sv[0] * rtol).sum())) if float(sv[0]) > 0 else 1
        if k >= u.shape[0]:
            return self
        return LayerDelta(self.name, self.shape, u=(bh[:k] @ qu.T).float().contiguous(),
                          d=((qd @ a[:, :k]) * sv[:k]).T.float().contiguous(),
                          alpha=self.alpha, transposed=self.transposed)


@dataclass
class Delta:
    """All layer deltas of one edit, plus free-form string metadata (editor, base hash...)."""

    layers: dict[str, LayerDelta]
    meta: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(self.layers)

    def norms(self) -> dict[str, float]:
        return {n: self.layers[n].frobenius_norm() for n in self.names()}

    def is_finite(self) -> bool:
        return all(l.is_finite() for l in self.layers.values())

    def nbytes(self) -> int:
        return sum(l.nbytes() for l in self.layers.values())

    def compacted(self, rtol: float = COMPACT_RTOL) -> "Delta":
        """Every layer `LayerDelta.compacted`; meta `factor_rows`: rows before → after."""
        layers = {n: l.compacted(rtol) for n, l in self.layers.items()}
        before = sum(l.rank for l in self.layers.values())
        after = sum(l.rank for l in layers.values())
        return Delta(layers, {**self.meta, "factor_rows": f"{before}->{after}"})

    def dense_nbytes(self) -> int:
        """Bytes the same change would take as dense fp32 matrices."""
        return sum(4 * l.shape[0] * l.shape[1] for l in self.layers.values())

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Flat tensors and string metadata, ready for `safetensors.torch.save_file`."""
        tensors: dict[str, torch.Tensor] = {}
        layout = {}
        for name in self.names():
            l = self.layers[name]
            if l.is_lowrank:
                tensors[name + _SEP + "u"] = l.u.detach().cpu().contiguous()
                tensors[name + _SEP + "d"] = l.d.detach().cpu().contiguous()
                tensors[name + _SEP + "alpha"] = l.alpha.detach().cpu().reshape(()).contiguous()
            else:
                tensors[name + _SEP + "dense"] = l.dense.detach().cpu().contiguous()
            layout[name] = {"shape": list(l.shape), "transposed": l.transposed,
                            "kind": "lowrank" if l.is_lowrank else "dense"}
        meta = {str(k): str(v) for k, v in self.meta.items()}
        meta.update(format=FORMAT, format_version=str(FORMAT_VERSION),
                    layout=json.dumps(layout, sort_keys=True))
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> "Delta":
        """Inverse of `to_tensors`; raises ValueError on anything that does not fit."""
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a mendctl delta (format={meta.get('format')!r})")
        version = int(meta.get("format_version", "0"))
        if version > FORMAT_VERSION:
            raise ValueError(f"delta format version {version} is newer than this mendctl "
                             f"knows ({FORMAT_VERSION}); upgrade mendctl")
        layout = json.loads(meta["layout"])
        layers = {}
        for name, info in layout.items():
            get = lambda part: tensors.get(name + _SEP + part)  # noqa: E731
            if info["kind"] == "lowrank":
                u, d, a = get("u"), get("d"), get("alpha")
                if u is None or d is None or a is None:
                    raise ValueError(f"{name}: factors missing from the delta file")
                out_dim, in_dim = info["shape"][::-1] if info["transposed"] else info["shape"]
                if a.numel() != 1:
                    raise ValueError(f"{name}: alpha must be a scalar, got shape {tuple(a.shape)}")
                if u.dim() != 2 or d.dim() != 2 or u.shape[0] != d.shape[0] \
                        or u.shape[1] != in_dim or d.shape[1] != out_dim:
                    raise ValueError(f"{name}: factor shapes {tuple(u.shape)}, {tuple(d.shape)} "
                                     f"do not fit weight shape {tuple(info['shape'])}")
                layers[name] = LayerDelta(name, tuple(info["shape"]), u=u, d=d, alpha=a,
                                          transposed=info["transposed"])
            else:
                w = get("dense")
                if w is None or tuple(w.shape) != tuple(info["shape"]):
                    raise ValueError(f"{name}: dense delta missing or of the wrong shape")
                layers[name] = LayerDelta(name, tuple(info["shape"]), dense=w,
                                          transposed=info["transposed"])
        extra = {k: v for k, v in meta.items() if k not in ("format", "format_version", "layout")}
        return cls(layers, extra)


def summed(plus: list[Delta], minus: list[Delta] = ()) -> Delta:
    """One low-rank delta equal to Σ `plus` − Σ `minus` (meta: the first's): every layer's
    factor rows stacked, a row's d scaled by its α over the first's (and negated for `minus`),
    so −α₀ Σ dᵀu over the rows is the sum. Every delta must be low-rank over the same weights."""
    parts = [(x, 1.0) for x in plus] + [(x, -1.0) for x in minus]
    first = parts[0][0]
    layers = {}
    for name, l0 in first.layers.items():
        us, ds = [], []
        for x, sign in parts:
            l = x.layers.get(name)
            if l is None or not l.is_lowrank or not l0.is_lowrank or set(x.layers) != set(first.layers):
                raise ValueError(f"{name}: only low-rank deltas of the same weights can be summed")
            us.append(l.u)
            ds.append(l.d * (sign * float(l.alpha) / float(l0.alpha)))
        layers[name] = LayerDelta(name, l0.shape, u=torch.cat(us), d=torch.cat(ds),
                                  alpha=l0.alpha.clone(), transposed=l0.transposed)
    return Delta(layers, dict(first.meta))


def apply_deltas(base: dict[str, torch.Tensor], deltas: list[Delta],
                 scales: list[float] | None = None) -> dict[str, torch.Tensor]:
    """State = base + Σ_k s_k ΔW_k, added in the given order, in fp32. Returns new tensors."""
    out = {n: t.detach().to("cpu", torch.float32).clone() for n, t in base.items()}
    for k, delta in enumerate(deltas):
        s = 1.0 if scales is None else float(scales[k])
        for name, layer in delta.layers.items():
            if name not in out:
                raise KeyError(f"delta changes {name!r}, which is not among the edited weights")
            dw = layer.to_dense()
            if tuple(dw.shape) != tuple(out[name].shape):
                raise ValueError(f"{name}: delta shape {tuple(dw.shape)} != weight shape "
                                 f"{tuple(out[name].shape)}")
            out[name] = out[name] + (dw if s == 1.0 else dw * s)
    return out


def state_hash(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in sorted-name order: name, shape and fp32 bytes."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
