"""Per-latent importance measures and the power-law test of Peter & Soegaard (2025).

Three measures: mean squared activation E[z_j^2] (the paper's best ordering), firing frequency E[1{z_j > 0}],
and the eigen-spectrum of the decoder covariance. The statistics stream over batches in the SAE's sparse form
(values, indices) with index_add / bincount, so a 2^16-latent SAE never needs a dense [B, n] code here.

`fit_power_law` regresses log(importance) on log(rank) (power law) and on rank (exponential), both in log
space so their R^2 values are comparable, and says which fits better (claim 1 of PAPER.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LatentStats:
    """Per-latent statistics over an evaluation set of `tokens` tokens (float64 tensors of length n)."""

    mean_sq: Tensor  # E[z^2]
    freq: Tensor  # E[1{z > 0}]
    tokens: int

    @property
    def n_latents(self) -> int:
        return int(self.mean_sq.numel())

    @property
    def dead(self) -> Tensor:
        """Boolean mask of latents that never fired in the window."""
        return self.freq == 0


def _param_device_dtype(sae: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(sae.parameters())
    return p.device, p.dtype


@torch.no_grad()
def latent_stats(sae, batches: Iterable[Tensor]) -> LatentStats:
    """E[z^2] and firing frequency per latent, streamed over `batches` of raw activations [B, d] (or [..., d]).

    The SAE is evaluated in eval mode (BatchTopK uses its inference threshold) and restored afterwards.
    Entries with value 0 (padding, or a TopK pick that ReLU zeroed) count as not firing.
    """
    if isinstance(batches, Tensor):
        batches = [batches]
    n = int(sae.cfg.n_latents)
    device, dtype = _param_device_dtype(sae)
    sum_sq = torch.zeros(n, dtype=torch.float64, device=device)
    fires = torch.zeros(n, dtype=torch.float64, device=device)
    tokens = 0
    was_training = sae.training
    sae.eval()
    try:
        for x in batches:
            x = x.reshape(-1, x.shape[-1]).to(device=device, dtype=dtype)
            if x.shape[0] == 0:
                continue
            values, indices = sae.encode(x)
            v = values.reshape(-1).to(torch.float64)
            idx = indices.reshape(-1)
            sum_sq.index_add_(0, idx, v * v)
            active = v > 0
            fires += torch.bincount(idx[active], minlength=n).to(torch.float64)
            tokens += x.shape[0]
    finally:
        sae.train(was_training)
    if tokens == 0:
        raise ValueError("latent_stats got no tokens: batches was empty")
    return LatentStats(mean_sq=(sum_sq / tokens).cpu(), freq=(fires / tokens).cpu(), tokens=tokens)


@torch.no_grad()
def decoder_spectrum(sae, weights: Tensor | None = None) -> Tensor:
    """Eigenvalues (descending, float64, length d_in) of the decoder covariance W_dec^T diag(w) W_dec / sum(w).

    With `weights=None` every latent counts equally (the geometry of the dictionary alone); pass
    `stats.mean_sq` to weight each direction by how much it is used, which approximates the covariance of
    the sparse part of the reconstruction (cross terms ignored). W_dec is taken in the SAE's normalised space.
    """
    w_dec = sae.W_dec.detach().to(torch.float64).cpu()
    n = w_dec.shape[0]
    if weights is None:
        w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    else:
        w = weights.detach().to(torch.float64).cpu().reshape(-1)
        if w.numel() != n:
            raise ValueError(f"weights must have one entry per latent ({n}), got {w.numel()}")
        if (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero")
        w = w / w.sum()
    cov = w_dec.T @ (w[:, None] * w_dec)
    return torch.linalg.eigvalsh(cov).flip(0).clamp_min(0.0)


@dataclass
class PowerLawFit:
    """importance ~ C * rank^-exponent, compared with importance ~ C' * exp(-exp_rate * rank).

    Both R^2 values are of log(importance), so `preferred` ("power_law" or "exponential") is the better fit in
    log space. Ranks are 1-based over latents sorted by importance; dead (zero) latents are excluded from the
    fit: `n_fit` points were used and `n_excluded_zero` latents were dropped.
    """

    exponent: float
    r2: float
    exp_rate: float
    exp_r2: float
    preferred: str
    log_c: float  # intercept of the power law: log C
    exp_log_c: float  # intercept of the exponential: log C'
    n_fit: int
    n_excluded_zero: int
    min_rank: int
    max_rank: int

    def predict(self, rank: Tensor, kind: str = "power_law") -> Tensor:
        """Fitted importance at the given (1-based) ranks, for plotting."""
        r = rank.to(torch.float64)
        if kind == "power_law":
            return torch.exp(self.log_c - self.exponent * torch.log(r))
        if kind == "exponential":
            return torch.exp(self.exp_log_c - self.exp_rate * r)
        raise ValueError(f"kind must be 'power_law' or 'exponential', got {kind!r}")

    def as_dict(self) -> dict[str, float | int | str]:
        return dict(self.__dict__)


def _linfit(x: Tensor, y: Tensor) -> tuple[float, float, float]:
    """Least squares y = a + b x; returns (a, b, R^2)."""
    xm, ym = x.mean(), y.mean()
    dx, dy = x - xm, y - ym
    sxx = float(dx @ dx)
    b = float(dx @ dy) / sxx
    a = float(ym) - b * float(xm)
    ss_tot = float(dy @ dy)
    ss_res = float(((y - (a + b * x)) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return a, b, r2


def fit_power_law(importance: Tensor, *, min_rank: int = 1, max_rank: int | None = None) -> PowerLawFit:
    """Fit importance against rank (in any order; it is sorted descending here) over ranks [min_rank, max_rank].

    Zero-importance latents are dead: they have no logarithm and are excluded (reported in the result).
    """
    imp = importance.detach().reshape(-1).to(torch.float64).cpu()
    if not torch.isfinite(imp).all():
        raise ValueError("importance must be finite; got NaN or Inf entries")
    if (imp < 0).any():
        raise ValueError("importance must be non-negative (E[z^2], frequency or eigenvalues)")
    live = torch.sort(imp[imp > 0], descending=True).values
    n_zero = int(imp.numel() - live.numel())
    hi = live.numel() if max_rank is None else min(int(max_rank), live.numel())
    if min_rank < 1:
        raise ValueError(f"min_rank must be >= 1 (ranks are 1-based), got {min_rank}")
    if hi - min_rank + 1 < 3:
        raise ValueError(
            f"need at least 3 live latents in ranks [{min_rank}, {hi}] to fit; "
            f"{live.numel()} of {imp.numel()} latents have non-zero importance"
        )
    rank = torch.arange(min_rank, hi + 1, dtype=torch.float64)
    y = torch.log(live[min_rank - 1 : hi])
    if float(y.max() - y.min()) == 0.0:
        raise ValueError("importance is constant over the fitted ranks, so no decay law can be fitted")
    log_c, slope, r2 = _linfit(torch.log(rank), y)
    exp_log_c, exp_slope, exp_r2 = _linfit(rank, y)
    return PowerLawFit(
        exponent=-slope,
        r2=r2,
        exp_rate=-exp_slope,
        exp_r2=exp_r2,
        preferred="power_law" if r2 >= exp_r2 else "exponential",
        log_c=log_c,
        exp_log_c=exp_log_c,
        n_fit=int(rank.numel()),
        n_excluded_zero=n_zero,
        min_rank=int(min_rank),
        max_rank=int(hi),
    )


def importance_summary(stats: LatentStats, fit: PowerLawFit | None = None) -> dict[str, float]:
    """Flat float dict for tracking: dead fraction, share of E[z^2] in the top 10% of latents, fit numbers."""
    ms = torch.sort(stats.mean_sq, descending=True).values
    total = float(ms.sum())
    top = max(1, math.ceil(0.1 * ms.numel()))
    out = {
        "dead_fraction": float(stats.dead.to(torch.float64).mean()),
        "ez2_top10pct_share": float(ms[:top].sum()) / total if total > 0 else float("nan"),
        "mean_freq": float(stats.freq.mean()),
    }
    if fit is not None:
        out.update(
            power_law_exponent=fit.exponent,
            power_law_r2=fit.r2,
            exponential_rate=fit.exp_rate,
            exponential_r2=fit.exp_r2,
            power_law_preferred=float(fit.preferred == "power_law"),
            power_law_n_fit=float(fit.n_fit),
        )
    return out
