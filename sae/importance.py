"""Per-latent importance measures and the power-law test of docs/science.md (Peter & Søgaard 2025).

Three measures: mean squared activation E[z_j^2] (the paper's best ordering), firing frequency E[1{z_j > 0}],
and the eigen-spectrum of the decoder covariance. The statistics stream over batches in the SAE's sparse form
(values, indices) with index_add / bincount, so a 2^16-latent SAE never needs a dense [B, n] code here.

`fit_power_law` tests claim 1 of docs/science.md (importance follows a power law in rank): inside a rank window
fixed before fitting (no dense head, no dead or too-rare latents) it fits a power law, an exponential and a
log-normal rank law to log-spaced rank bins, bootstraps the exponent, and compares the laws by held-out error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from sae.model import evaluating


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
    with evaluating(sae):
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


MODELS = ("power_law", "exponential", "lognormal")


@dataclass
class PowerLawFit:
    """Importance vs rank inside a fixed rank window: a power law, an exponential and a log-normal rank law.

    Models, all in log space: power law log I = log_c - exponent * log r; exponential log I = exp_log_c -
    exp_rate * r; log-normal rank law log I = ln_log_c - ln_slope * log r - ln_curvature * (log r)^2. Ranks are
    1-based positions in the importance order of all latents. Fits use `n_bins` log-spaced rank bins (the mean
    log-importance per bin), so the tail's many latents count no more than the head's few. `preferred` is the
    model with the lowest held-out (K-fold over bins) squared error of log-importance, except that the nested
    log-normal law must beat the power law by one standard error (see `_preferred`); "undetermined" with too
    few bins to hold any out. r2 / exp_r2 / lognormal_r2 are in-sample R^2 over the bins, secondary numbers.
    """

    exponent: float
    exponent_lo: float  # 95% percentile bootstrap interval (rank bins resampled with replacement)
    exponent_hi: float
    log_c: float
    r2: float
    exp_rate: float
    exp_log_c: float
    exp_r2: float
    ln_log_c: float
    ln_slope: float
    ln_curvature: float
    lognormal_r2: float
    heldout_mse_power_law: float
    heldout_mse_exponential: float
    heldout_mse_lognormal: float
    preferred: str
    dense_head: int  # leading latents excluded as the dense head (given or detected)
    n_too_rare: int  # latents in the window dropped for firing fewer than min_fires times
    n_dead: int  # zero-importance latents (always excluded)
    n_fit: int  # latents that entered the fit
    n_bins: int  # non-empty rank bins the models were fitted on
    min_rank: int  # first and last fitted rank
    max_rank: int
    bin_rank: Tensor | None = None  # geometric-mean rank of each bin, for plotting
    bin_importance: Tensor | None = None  # exp(mean log importance) of each bin

    @property
    def preferred_power_law(self) -> float:
        return float(self.preferred == "power_law")

    def predict(self, rank: Tensor, kind: str = "power_law") -> Tensor:
        """Fitted importance at the given (1-based) ranks under model `kind` (one of MODELS), for plotting."""
        if kind not in MODELS:
            raise ValueError(f"kind must be one of {MODELS}, got {kind!r}")
        r = rank.to(torch.float64)
        return torch.exp(_features(r, kind) @ torch.tensor(self._params(kind), dtype=torch.float64))

    def _params(self, kind: str) -> tuple[float, ...]:
        return {"power_law": (self.log_c, -self.exponent), "exponential": (self.exp_log_c, -self.exp_rate),
                "lognormal": (self.ln_log_c, -self.ln_slope, -self.ln_curvature)}[kind]

    def as_dict(self) -> dict[str, float | int | str]:
        """Flat scalars (tracked as power_law/<key>); the bin tensors are left out."""
        out = {k: v for k, v in self.__dict__.items() if not isinstance(v, Tensor) and v is not None}
        out["preferred_power_law"] = self.preferred_power_law
        return out


def _features(rank: Tensor, kind: str) -> Tensor:
    """Regressors [m, p] of model `kind`, intercept first; every model is linear in its parameters."""
    log_r = torch.log(rank)
    cols = {"power_law": (log_r,), "exponential": (rank,), "lognormal": (log_r, log_r * log_r)}[kind]
    return torch.stack((torch.ones_like(rank), *cols), dim=-1)


def _lstsq(x: Tensor, y: Tensor) -> Tensor:
    return torch.linalg.lstsq(x, y.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)


def _r2(y: Tensor, pred: Tensor) -> float:
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0


def detect_dense_head(sorted_live: Tensor, head_factor: float = 10.0) -> int:
    """Size of the dense head of a descending importance vector (0 if none).

    Rule: flag every rank r <= n/4 with I(r) > head_factor * I(2r); the head ends at the flagged rank with the
    steepest drop to the next rank, log I(r) - log I(r+1). A TopK SAE often has ~k latents that fire on almost
    every token with a cliff after them at rank h: the ranks that span the cliff (about h/2 to h + h/8) are
    flagged, and the cliff itself is the steepest step among them. A pure power law has I(r)/I(2r) =
    2^exponent, so the default factor 10 flags nothing below exponent 3.3 (pass head= for steeper spectra).
    Only the top quarter is searched, so a steep drop at the rare end is never read as a head.
    """
    r = torch.arange(1, sorted_live.numel() // 4 + 1)
    flagged = r[sorted_live[r - 1] > head_factor * sorted_live[2 * r - 1]]
    if flagged.numel() == 0:
        return 0
    log_i = torch.log(sorted_live)
    return int(flagged[torch.argmax(log_i[flagged - 1] - log_i[flagged])])


def _bin_means(values: Tensor, bin_idx: Tensor, n_bins: int) -> Tensor:
    """Per-bin mean of values [m] or [m, p]."""
    sums = torch.zeros((n_bins, *values.shape[1:]), dtype=torch.float64).index_add_(0, bin_idx, values)
    counts = torch.bincount(bin_idx, minlength=n_bins).to(torch.float64)
    return sums / counts.reshape(-1, *([1] * (values.dim() - 1)))


def _heldout_sq(xs: dict[str, Tensor], y: Tensor, folds: int, seed: int) -> dict[str, Tensor] | None:
    """Held-out squared error per bin, K-fold over bins (None with < 5 bins: too few to hold any out).

    Each block of `folds` consecutive bins sends one bin (seeded order) to each fold, so every held-out bin
    sits between training bins and no fold extrapolates a whole end of the window.
    """
    nb = y.numel()
    if nb < 5:  # the 3-parameter model needs >= 4 training bins
        return None
    g = torch.Generator().manual_seed(seed)
    fold = torch.cat([torch.randperm(folds, generator=g) for _ in range(-(-nb // folds))])[:nb]
    sq = {k: torch.zeros(nb, dtype=torch.float64) for k in xs}
    for f in range(folds):
        test = fold == f
        for k, x in xs.items():
            beta = _lstsq(x[~test], y[~test])
            sq[k][test] = (x[test] @ beta - y[test]) ** 2
    return sq


def _preferred(sq: dict[str, Tensor] | None) -> str:
    """Lowest held-out error, but the log-normal law must beat the power law by more than one standard error.

    It nests the power law (curvature 0) with one parameter more, so on a true power law it ties and would
    win about a third of the time by chance; the one-standard-error rule (Hastie, Tibshirani & Friedman,
    ESL 7.10) of the paired per-bin difference keeps the simpler model unless the curvature is supported.
    """
    if sq is None:
        return "undetermined"
    best = min(MODELS, key=lambda k: float(sq[k].mean()))
    diff = sq["power_law"] - sq["lognormal"]
    if best == "lognormal" and float(diff.mean()) <= float(diff.std()) / math.sqrt(diff.numel()):
        best = min(("power_law", "exponential"), key=lambda k: float(sq[k].mean()))
    return best


def _bootstrap_exponent(log_rank: Tensor, y: Tensor, n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the power-law exponent over `n_boot` resamples of the bins (pairs bootstrap).

    Bins, not latents, are resampled: the head's bins hold one latent each, so resampling latents would leave
    their scatter out and (on synthetic power laws) cover the true exponent well under 95% of the time.
    Resamples whose bins all share one rank have no slope and are skipped.
    """
    pick = torch.randint(y.numel(), (n_boot, y.numel()), generator=torch.Generator().manual_seed(seed))
    x, yy = log_rank[pick], y[pick]
    dx = x - x.mean(1, keepdim=True)
    sxx = (dx * dx).sum(1)
    slopes = (dx * (yy - yy.mean(1, keepdim=True))).sum(1)[sxx > 0] / sxx[sxx > 0]
    if slopes.numel() == 0:
        return float("nan"), float("nan")
    return -float(torch.quantile(slopes, 0.975)), -float(torch.quantile(slopes, 0.025))


def fit_power_law(
    importance: Tensor,
    *,
    freq: Tensor | None = None,
    tokens: int | None = None,
    head: int | None = None,
    head_factor: float = 10.0,
    min_fires: int = 20,
    max_rank: int | None = None,
    n_bins: int = 30,
    folds: int = 5,
    n_boot: int = 500,
    seed: int = 0,
) -> PowerLawFit:
    """Fit importance (any order; sorted descending here) against rank inside a window fixed before fitting.

    The window drops the dense head (`head` leading latents, else `detect_dense_head(..., head_factor)`),
    dead latents, latents beyond `max_rank`, and, when `freq` and `tokens` are given, latents that fired fewer
    than `min_fires` times (their importance is mostly sampling noise). Ranks stay positions in the full order.
    Why a log-normal rank law as the third model: it is the classic look-alike of a power law (Clauset, Shalizi
    & Newman 2009) -- a power law bent by a (log r)^2 term -- so a power-law verdict means no curvature was
    supported on held-out bins, not just that the exponential fits worse. It is linear in its parameters, like
    the other two, so every fit is one least-squares solve.
    """
    imp = importance.detach().reshape(-1).to(torch.float64).cpu()
    if not torch.isfinite(imp).all():
        raise ValueError("importance must be finite; got NaN or Inf entries")
    if (imp < 0).any():
        raise ValueError("importance must be non-negative (E[z^2], frequency or eigenvalues)")
    if (freq is None) != (tokens is None):
        raise ValueError("pass freq and tokens together (e.g. stats.freq, stats.tokens) or neither")
    if n_bins < 1 or folds < 2:
        raise ValueError(f"need n_bins >= 1 and folds >= 2, got n_bins={n_bins}, folds={folds}")
    if head is not None and head < 0:
        raise ValueError(f"head must be >= 0 latents, got {head}")
    order = torch.sort(imp, descending=True, stable=True).indices
    sorted_imp = imp[order]
    n_live = int((sorted_imp > 0).sum())
    dense = detect_dense_head(sorted_imp[:n_live], head_factor) if head is None else min(int(head), n_live)
    hi = n_live if max_rank is None else min(int(max_rank), n_live)
    in_window = torch.zeros(imp.numel(), dtype=torch.bool)
    in_window[dense:hi] = True
    rare = torch.zeros_like(in_window)
    if freq is not None:
        f = freq.detach().reshape(-1).to(torch.float64).cpu()
        if f.numel() != imp.numel():
            raise ValueError(f"freq must have one entry per latent ({imp.numel()}), got {f.numel()}")
        rare = in_window & (f[order] * float(tokens) < min_fires)
    keep = in_window & ~rare
    if int(keep.sum()) < 3:
        raise ValueError(
            f"need at least 3 live latents in the fit window to fit; {n_live} of {imp.numel()} latents are live, "
            f"{dense} are the dense head, {int(rare.sum())} too rare (< {min_fires} fires), max_rank={max_rank}"
        )
    rank = torch.nonzero(keep).reshape(-1).to(torch.float64) + 1.0
    y = torch.log(sorted_imp[keep])
    if float(y.max() - y.min()) == 0.0:
        raise ValueError("importance is constant over the fitted ranks, so no decay law can be fitted")
    lo_r, hi_r = int(rank[0]), int(rank[-1])
    log_edges = torch.linspace(math.log(lo_r), math.log(hi_r + 1), n_bins + 1, dtype=torch.float64)
    edges = torch.unique(torch.floor(torch.exp(log_edges) + 1e-9))
    _, bin_idx = torch.unique(torch.searchsorted(edges, rank, right=True), return_inverse=True)
    nb = int(bin_idx.max()) + 1
    yb = _bin_means(y, bin_idx, nb)
    xs = {k: _bin_means(_features(rank, k), bin_idx, nb) for k in MODELS}
    beta = {k: _lstsq(x, yb) for k, x in xs.items()}
    r2 = {k: _r2(yb, xs[k] @ beta[k]) for k in MODELS}
    sq = _heldout_sq(xs, yb, min(folds, nb), seed)
    mse = {k: float("nan") if sq is None else float(sq[k].mean()) for k in MODELS}
    log_rb = _bin_means(torch.log(rank), bin_idx, nb)
    lo, hi = _bootstrap_exponent(log_rb, yb, n_boot, seed) if n_boot > 0 else (float("nan"), float("nan"))
    return PowerLawFit(
        exponent=-float(beta["power_law"][1]),
        exponent_lo=lo,
        exponent_hi=hi,
        log_c=float(beta["power_law"][0]),
        r2=r2["power_law"],
        exp_rate=-float(beta["exponential"][1]),
        exp_log_c=float(beta["exponential"][0]),
        exp_r2=r2["exponential"],
        ln_log_c=float(beta["lognormal"][0]),
        ln_slope=-float(beta["lognormal"][1]),
        ln_curvature=-float(beta["lognormal"][2]),
        lognormal_r2=r2["lognormal"],
        heldout_mse_power_law=mse["power_law"],
        heldout_mse_exponential=mse["exponential"],
        heldout_mse_lognormal=mse["lognormal"],
        preferred=_preferred(sq),
        dense_head=dense,
        n_too_rare=int(rare.sum()),
        n_dead=imp.numel() - n_live,
        n_fit=int(rank.numel()),
        n_bins=nb,
        min_rank=lo_r,
        max_rank=hi_r,
        bin_rank=torch.exp(log_rb),
        bin_importance=torch.exp(yb),
    )
