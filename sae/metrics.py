"""Reconstruction and similarity metrics for an SAE, all summed in float64.

Why float64: FVU is a ratio of two sums over up to ~1e8 squared values; float32 sums drift by more than the
differences between SAEs being compared. (The streaming accumulator forms each squared error in the inputs'
precision, one rounding per element that does not accumulate, and sums them in float64.) The streaming accumulator merges per-batch means and centred second
moments (Chan et al.), so it equals the one-shot value without the cancellation of sum(x^2) - N mean^2.

Conventions: `mse` is the mean over all elements (tokens x dimensions); `l0` counts non-zeros per token, so
it accepts either sparse `values` [B, k] (padding entries are 0) or a dense code [B, n].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def _flat(x: Tensor, name: str) -> Tensor:
    if x.ndim < 2:
        raise ValueError(f"{name} must be [tokens, d] (or [..., d]), got shape {list(x.shape)}")
    return x.reshape(-1, x.shape[-1]).to(torch.float64)


def _check_pair(x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {list(x.shape)} and {list(x_hat.shape)}")
    return _flat(x, "x"), _flat(x_hat, "x_hat")


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (mean over tokens)."""
    x64, xh64 = _check_pair(x, x_hat)
    denom = (x64 - x64.mean(0)).pow(2).sum()
    if denom <= 0:
        raise ValueError("x has zero variance over tokens, so FVU is undefined; evaluate on more than one distinct token")
    return float((x64 - xh64).pow(2).sum() / denom)


def mse(x: Tensor, x_hat: Tensor) -> float:
    """Mean squared error over all elements."""
    x64, xh64 = _check_pair(x, x_hat)
    return float((x64 - xh64).pow(2).mean())


def l0(values: Tensor) -> float:
    """Mean number of non-zero entries per token (sparse values [B, k] or dense codes [B, n])."""
    v = values.reshape(-1, values.shape[-1]) if values.ndim >= 2 else values.reshape(1, -1)
    return float((v != 0).sum(-1, dtype=torch.float64).mean())


def dead_fraction(freq: Tensor) -> float:
    """Fraction of latents that never fired over the evaluation window (firing frequency exactly 0)."""
    if freq.numel() == 0:
        raise ValueError("freq is empty; pass the per-latent firing frequencies from latent_stats")
    return float((freq == 0).to(torch.float64).mean())


class BatchMoments(NamedTuple):
    """One batch's targets [B, d] (as given) with their float64 mean and centred sum of squares: computed once
    per batch and shared by every reconstruction of it (an evaluation scores ~70 reduced SAEs against the same x)."""

    x: Tensor
    mean: Tensor
    m2: Tensor  # 0-dim float64, on x's device


def batch_moments(x: Tensor) -> BatchMoments:
    if x.ndim < 2:
        raise ValueError(f"x must be [tokens, d] (or [..., d]), got shape {list(x.shape)}")
    x = x.reshape(-1, x.shape[-1])
    x64 = x.to(torch.float64)
    mean = x64.mean(0)
    return BatchMoments(x, mean, (x64 - mean).pow(2).sum())


class ReconstructionAccumulator:
    """Streaming FVU / MSE / L0 over batches; `result()` equals the one-shot metrics on the concatenation.

    The running sums are float64 tensors on the inputs' device, read only by `result()`: an evaluation updates
    ~70 accumulators per batch, and on a GPU a float() per update would be a host sync each."""

    def __init__(self) -> None:
        self.tokens = 0
        self._d: int | None = None
        self._mean: Tensor | None = None  # running per-dimension mean of x
        self._m2: Tensor | float = 0.0  # running sum over dims of centred second moment of x
        self._sq_err: Tensor | float = 0.0
        self._nonzero: Tensor | float = 0.0
        self._has_l0 = True  # False once any batch arrives without `values`

    def update(self, x: Tensor, x_hat: Tensor, values: Tensor | None = None, *,
               moments: BatchMoments | None = None) -> None:
        """Add one batch: raw x and x_hat [B, d]; `values` (sparse [B, k] or dense [B, n]) for L0; `moments`:
        batch_moments(x) when several reconstructions of one x are scored (x's side is then computed once)."""
        if x.shape != x_hat.shape:
            raise ValueError(f"x and x_hat must have the same shape, got {list(x.shape)} and {list(x_hat.shape)}")
        moments = moments if moments is not None else batch_moments(x)
        self.update_residual(torch.sub(moments.x, x_hat.reshape(moments.x.shape)), values, moments=moments)

    def update_residual(self, residual: Tensor, values: Tensor | None = None, *, moments: BatchMoments,
                        to_raw: float = 1.0) -> None:
        """Add one batch from its residual x - x_hat [B, d] (what an SAE that reconstructs in its own normalised
        units has at hand: then `to_raw` = 1 / input_scale) and the batch's `moments` of the raw x."""
        b, d = moments.x.shape
        if residual.shape != moments.x.shape:
            raise ValueError(f"residual must have x's shape {[b, d]}, got {list(residual.shape)}")
        if b == 0:
            return
        if self._d is not None and d != self._d:
            raise ValueError(f"x has d={d} but earlier batches had d={self._d}")
        if values is not None and values.reshape(-1, values.shape[-1]).shape[0] != b:
            raise ValueError(f"values must have one row per token ({b}), got shape {list(values.shape)}")
        batch_mean, batch_m2 = moments.mean, moments.m2
        if self._mean is None:
            self._d, self._mean, self._m2 = d, batch_mean, batch_m2
        else:
            n_a, n = self.tokens, self.tokens + b
            delta = batch_mean - self._mean
            self._m2 = self._m2 + batch_m2 + delta.pow(2).sum() * (n_a * b / n)
            self._mean = self._mean + delta * (b / n)
        self.tokens += b
        # each token's squared error summed in the inputs' precision (a d-term dot: ~1e-10 relative against a
        # float64 reference at d = 576), the tokens' sums in float64: one pass over the residual, where a
        # float64 copy of it took 4x the time
        self._sq_err = self._sq_err + torch.linalg.vecdot(residual, residual).sum(dtype=torch.float64) * to_raw**2
        if values is None:
            self._has_l0 = False
        else:
            self._nonzero = self._nonzero + (values.reshape(b, -1) != 0).sum(dtype=torch.float64)

    def result(self) -> dict[str, float]:
        """dict(fvu, mse, l0, tokens); l0 is NaN if any batch was added without `values`."""
        if self.tokens == 0 or self._d is None:
            raise ValueError("ReconstructionAccumulator is empty: call update() with at least one batch first")
        m2, sq_err, nonzero = float(self._m2), float(self._sq_err), float(self._nonzero)
        if m2 <= 0:
            raise ValueError("x has zero variance over tokens, so FVU is undefined")
        return {
            "fvu": sq_err / m2,
            "mse": sq_err / (self.tokens * self._d),
            "l0": nonzero / self.tokens if self._has_l0 else float("nan"),
            "tokens": float(self.tokens),
        }


def variance_share_of_top_tokens(x: Tensor, fraction: float = 0.01) -> float:
    """Share of the centred sum of squares (FVU's denominator) held by the `fraction` of tokens farthest from
    the mean. Near `fraction` for ordinary data; near 1 when a few "massive activation" tokens (e.g. a position
    right after BOS) dominate, so that FVU mostly scores how well those few tokens are rebuilt."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    x64 = _flat(x, "x")
    sq = (x64 - x64.mean(0)).pow(2).sum(1)
    total = float(sq.sum())
    if total <= 0:
        raise ValueError("x has zero variance over tokens, so no share of it can be computed")
    top = max(1, int(round(fraction * sq.numel())))
    return float(sq.topk(top).values.sum()) / total


def _average_ranks(v: Tensor) -> Tensor:
    """Ranks 1..N with ties sharing their average rank (as Spearman's rho requires)."""
    sorted_v, order = torch.sort(v, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    avg = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(v, dtype=torch.float64)
    ranks[order] = avg[inverse]
    return ranks


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else 0.0


def _pair_distances(x: Tensor, a: Tensor, b: Tensor, metric: str) -> Tensor:
    """Distances between rows a[i] and b[i] of x, from one Gram matrix (a matmul, not a gather of pairs)."""
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    if metric == "cosine":
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gram = x @ x.T
    if metric == "cosine":
        return 1.0 - gram[a, b]
    sq = gram.diagonal()
    return (sq[a] + sq[b] - 2 * gram[a, b]).clamp_min(0).sqrt()


class RSAReference:
    """The input side of RSA, computed once: the seeded token sample, the token pairs and the ranks of their
    distances in x. A curve scores dozens of reconstructions of the same x, so only x_hat's side is per call."""

    def __init__(self, x: Tensor, *, n_tokens: int = 2048, seed: int = 0, metric: str = "euclidean",
                 max_pairs: int | None = 250_000):
        x64 = _flat(x, "x")
        if n_tokens < 3:
            raise ValueError(f"n_tokens must be >= 3 to correlate pairwise distances, got {n_tokens}")
        n = x64.shape[0]
        if n < 3:
            raise ValueError(f"rsa needs at least 3 tokens, got {n}")
        gen = torch.Generator().manual_seed(seed)
        self.n_input, self.rows = n, None
        if n > n_tokens:
            self.rows = torch.randperm(n, generator=gen)[:n_tokens]
            x64, n = x64[self.rows], n_tokens
        self.a, self.b = (t.to(x64.device) for t in _pairs(n, max_pairs, gen))  # index x's Gram where it lives
        if self.rows is not None:
            self.rows = self.rows.to(x64.device)
        self.metric = metric
        self.x_ranks = _average_ranks(_pair_distances(x64, self.a, self.b, metric))

    def __call__(self, x_hat: Tensor) -> float:
        """Spearman correlation of x's and x_hat's pairwise distances (x_hat: the same tokens as x)."""
        xh64 = _flat(x_hat, "x_hat")
        if xh64.shape[0] != self.n_input:
            raise ValueError(f"x_hat must hold the {self.n_input} tokens of x, got shape {list(x_hat.shape)}")
        if self.rows is not None:
            xh64 = xh64[self.rows]
        return _pearson(self.x_ranks, _average_ranks(_pair_distances(xh64, self.a, self.b, self.metric)))


def _pairs(n: int, max_pairs: int | None, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """All token pairs a < b, or a seeded uniform sample of `max_pairs` distinct ones."""
    n_pairs = n * (n - 1) // 2
    if max_pairs is None or n_pairs <= max_pairs:
        a, b = torch.triu_indices(n, n, offset=1)
        return a, b
    flat = torch.randperm(n_pairs, generator=gen)[:max_pairs]
    # flat index -> (a, b) with a < b, row-major over the upper triangle
    a = (n - 0.5 - torch.sqrt((n - 0.5) ** 2 - 2 * flat.double())).floor().long()
    start = a * (2 * n - a - 1) // 2
    fix = flat < start  # guard the float sqrt at row boundaries
    a[fix] -= 1
    start = a * (2 * n - a - 1) // 2
    fix = flat >= start + (n - 1 - a)
    a[fix] += 1
    start = a * (2 * n - a - 1) // 2
    return a, a + 1 + (flat - start)


def rsa(x: Tensor, x_hat: Tensor, *, n_tokens: int = 2048, seed: int = 0, metric: str = "euclidean",
        max_pairs: int | None = 250_000) -> float:
    """Representational similarity: Spearman correlation of the pairwise distances of x and of x_hat.

    Over a seeded sample of `n_tokens` tokens (all of them if fewer). With more than `max_pairs` token pairs, a
    seeded uniform sample of `max_pairs` distinct pairs is correlated instead of all of them: ranking 2M pairs
    per reduced SAE would cost seconds, and at 250k pairs the estimate's sampling error (~1/sqrt(pairs) = 0.002)
    is far below the differences the evaluation compares. A constant distance matrix (e.g. a reconstruction
    that ignores its input) carries no structure and scores 0. Scoring many x_hat of one x: `RSAReference`.
    """
    _check_pair(x, x_hat)
    return RSAReference(x, n_tokens=n_tokens, seed=seed, metric=metric, max_pairs=max_pairs)(x_hat)


def linear_cka(x: Tensor, x_hat: Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred features.

    Computed with d x d Gram matrices, so it is linear in the number of tokens. Invariant to orthogonal
    transforms and isotropic scaling of either side; 0 if either side is constant.
    """
    x64, xh64 = _check_pair(x, x_hat)
    return linear_cka_from_grams(x64.T @ x64, x64.sum(0), xh64.T @ xh64, xh64.T @ x64, xh64.sum(0), x64.shape[0])


def linear_cka_from_grams(gram_x: Tensor, sum_x: Tensor, gram_y: Tensor, cross_yx: Tensor, sum_y: Tensor,
                          tokens: int) -> float:
    """Linear CKA from uncentred sums over N tokens (X^T X, sum x, Y^T Y, Y^T X, sum y), so it streams over
    batches: CKA over every eval token costs O(N d^2) time and O(d^2) memory, never an N x N matrix."""
    mx, my = sum_x.double() / tokens, sum_y.double() / tokens
    a = gram_x.double() - tokens * torch.outer(mx, mx)
    b = gram_y.double() - tokens * torch.outer(my, my)
    c = cross_yx.double() - tokens * torch.outer(my, mx)
    denom = a.norm() * b.norm()
    return float(c.pow(2).sum() / denom) if denom > 0 else 0.0
