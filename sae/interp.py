"""Offline interpretability *proxies* that need no judge model (claim 4 in docs/science.md).

The paper judged latents with an LLM (explain, then score). Offline we have two proxies; for both, HIGHER means
"more interpretable", and both are only read against a baseline drawn from the same SAE and the same codes:

1. Token concentration (`token_concentration`): the share of a latent's top-N activations on its single most
   common token id. Higher = closer to a single-token detector, which is easy to explain. It cannot see
   contextual or abstract features (they score low yet may be clear), and a latent concentrated on a frequent
   token may still be polysemantic across contexts; it reads top activations only (the "explain" half), never
   whether the latent fires predictably elsewhere (the "score" half). It is confounded by frequency: a latent
   that fires 5 times is concentrated almost by chance. Hence
   - `token_conc_excess`: each latent minus the mean of reference latents in its firing-frequency bin
     (`frequency_matched_concentration`); 0 = as concentrated as equally frequent latents of this SAE;
   - `token_conc_lift`: the subset's mean minus that of size-matched random subsets (`random_subset_baseline`).
2. Sparse topic probe (`sparse_probe`): C candidate latents drawn (seeded) from the subset, the k_features best
   by ANOVA F on the train half, multinomial logistic regression (plain torch, L-BFGS), held-out accuracy.
   Higher = the subset carries more linearly decodable topic information in few latents. Decodable is not
   monosemantic (a distributed code can carry topic too), and only topics are probed. Every subset gets the same
   number C of candidates, because picking the best 8 of 1,024 beats the best 8 of 64 by chance alone; with the
   draw, the probe measures how *rich* a subset is in topic latents, not whether it holds one somewhere.
   `probe_lift` is against the majority class, `probe_acc_lift` against size-matched random subsets.

All functions take a latent *subset* (a Matryoshka group from `group_latents`, a pruned SAE's kept latents), and
`proxy_report` gives every key for one subset. Under the `masked` rule a reduced SAE's code on its kept latents
IS the full SAE's code, so pass the full SAE's codes with `latents=kept`: the reference and random subsets then
come from the full SAE. With codes of a standalone reduced SAE, compare with the `prune_random` curve instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Codes = Tensor | tuple[Tensor, Tensor]

# log10 firing-frequency bin edges: quarter-decades [-7, -6.75), ..., [-0.25, 0]; values outside go to the end bins.
# Fixed (not data-dependent) so two SAEs evaluated on the same tokens are compared within the same bins. Quarter,
# not half, decades: concentration still falls steeply with frequency inside a bin for latents firing < ~30 times.
FREQ_BIN_EDGES: tuple[float, ...] = tuple(e / 4 for e in range(-28, 1))
_CANDIDATE_SEED = 1_000_003  # offsets the candidate draw from the train/test split stream of the same seed


class ProbeDataError(ValueError):
    """The labels cannot be split into train and test halves holding two classes: there is nothing to probe."""


@torch.no_grad()
def concat_codes(vals: Sequence[Tensor], idxs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-batch sparse codes as one (values [N, w], indices [N, w]): BatchTopK's threshold rule gives each batch
    its own width, so narrower ones are padded with zeros (inactive)."""
    width = max(v.shape[1] for v in vals)
    vals = [F.pad(v, (0, width - v.shape[1])) for v in vals]
    idxs = [F.pad(i, (0, width - i.shape[1])) for i in idxs]
    return torch.cat(vals), torch.cat(idxs)


def group_latents(partition: Sequence[int]) -> list[Tensor]:
    """Latent indices of each Matryoshka group: [0, m_1), [m_1, m_2), ..., [m_{G-1}, m_G)."""
    bounds = [0, *partition]
    if any(b <= a for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"partition must be strictly increasing positive boundaries, got {list(partition)}")
    return [torch.arange(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def _subset_dense(codes: Codes, latents: Tensor) -> Tensor:
    """[N, len(latents)] float64 activations of the chosen latents, from dense or sparse codes."""
    if isinstance(codes, Tensor):
        return codes.reshape(-1, codes.shape[-1])[:, latents].to(torch.float64)
    values, indices = codes
    values = values.reshape(-1, values.shape[-1])
    indices = indices.reshape(-1, indices.shape[-1])
    if values.shape != indices.shape:
        raise ValueError(f"values and indices must share a shape, got {list(values.shape)} and {list(indices.shape)}")
    size = int(max(int(indices.max()) if indices.numel() else 0, int(latents.max()))) + 1
    column = torch.full((size,), -1, dtype=torch.long)
    column[latents] = torch.arange(latents.numel())
    col = column[indices.cpu()]
    keep = (col >= 0) & (values.cpu() != 0)
    rows = torch.arange(values.shape[0])[:, None].expand_as(col)
    out = torch.zeros(values.shape[0], latents.numel(), dtype=torch.float64)
    out.index_put_((rows[keep], col[keep]), values.cpu()[keep].to(torch.float64), accumulate=True)
    return out


def _class_ids(labels: Tensor | Sequence) -> Tensor:
    if isinstance(labels, Tensor):
        return torch.unique(labels.reshape(-1).cpu(), return_inverse=True)[1]
    names = sorted(set(labels))
    lookup = {name: i for i, name in enumerate(names)}
    return torch.tensor([lookup[x] for x in labels], dtype=torch.long)


def _pool(x: Tensor, y: Tensor, context_ids: Tensor, how: str) -> tuple[Tensor, Tensor]:
    ctx, inv = torch.unique(context_ids.reshape(-1).cpu(), return_inverse=True)
    c = ctx.numel()
    label = torch.full((c,), -1, dtype=torch.long).scatter_(0, inv, y)
    if not torch.equal(label[inv], y):
        raise ValueError("labels must be constant within each context when pooling by context_ids")
    if how == "mean":
        sums = torch.zeros(c, x.shape[1], dtype=x.dtype).index_add_(0, inv, x)
        pooled = sums / torch.bincount(inv, minlength=c).to(x.dtype)[:, None]
    elif how == "max":
        pooled = torch.zeros(c, x.shape[1], dtype=x.dtype).index_reduce_(0, inv, x, "amax", include_self=False)
    else:
        raise ValueError(f"pool must be 'mean' or 'max', got {how!r}")
    return pooled, label


def _doc_features(values: Tensor, indices: Tensor, labels: Tensor | Sequence, doc_ids: Tensor,
                  n_latents: int) -> tuple[Tensor, Tensor]:
    """Mean code per document [D, n_latents] (float64) and its class id [D]: pooled once, so that each probe of a
    report only picks columns instead of re-pooling every token (what `sparse_probe` does with context_ids)."""
    values = values.reshape(-1, values.shape[-1]).cpu()
    indices = indices.reshape(-1, indices.shape[-1]).cpu()
    y = _class_ids(labels)
    if y.numel() != values.shape[0] or doc_ids.numel() != values.shape[0]:
        raise ValueError(f"labels [{y.numel()}] and doc_ids [{doc_ids.numel()}] need one entry per token "
                         f"({values.shape[0]})")
    _, inv = torch.unique(doc_ids.reshape(-1).cpu(), return_inverse=True)
    d = int(inv.max()) + 1
    label = torch.full((d,), -1, dtype=torch.long).scatter_(0, inv, y)
    if not torch.equal(label[inv], y):
        raise ValueError("labels must be constant within each context when pooling by context_ids")
    live = values != 0
    cell = inv[:, None].expand_as(indices)[live] * n_latents + indices[live]
    x = torch.zeros(d * n_latents, dtype=torch.float64).index_add_(0, cell, values[live].to(torch.float64))
    return x.view(d, n_latents) / torch.bincount(inv, minlength=d).to(torch.float64)[:, None], label


def _anova_f(x: Tensor, y: Tensor, n_classes: int) -> Tensor:
    """Per-feature ANOVA F statistic (between-class over within-class variance); 0 for constant features."""
    counts = torch.bincount(y, minlength=n_classes).to(x.dtype)
    present = counts > 0
    means = torch.zeros(n_classes, x.shape[1], dtype=x.dtype).index_add_(0, y, x)
    means[present] /= counts[present, None]
    grand = x.mean(0)
    between = (counts[:, None] * (means - grand) ** 2).sum(0) / max(int(present.sum()) - 1, 1)
    within = ((x - means[y]) ** 2).sum(0) / max(x.shape[0] - int(present.sum()), 1)
    f = between / within.clamp_min(1e-12)
    return torch.where(between > 0, f, torch.zeros_like(f))


def _fit_logistic(x: Tensor, y: Tensor, n_classes: int, l2: float, max_iter: int = 100,
                  tol: float = 1e-9) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression, mean cross-entropy + l2 * |w|^2 (bias unpenalised), by Newton's method
    with a backtracking line search. A probe is tiny ([examples, k_features + 1] x classes parameters) and
    strictly convex in w, so a few exact-Hessian steps reach the optimum that L-BFGS approached in about 60
    Python-level loss evaluations (20x the time). Runs on one thread: extra OpenMP threads only add overhead on
    tensors this small (10x slower on a shared CPU); the process's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _newton_logistic(x, y, n_classes, l2, max_iter, tol)
    finally:
        torch.set_num_threads(threads)


def _newton_logistic(x: Tensor, y: Tensor, n_classes: int, l2: float, max_iter: int,
                     tol: float) -> tuple[Tensor, Tensor]:
    n, f = x.shape
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)  # the last row of theta is the bias
    onehot = F.one_hot(y, n_classes).to(x.dtype)
    penalised = torch.ones(f + 1, 1, dtype=x.dtype)
    penalised[-1] = 0.0
    eye = torch.eye(n_classes, dtype=x.dtype)
    # softmax is unchanged by adding one constant to every class's bias: the Hessian is singular along that
    # direction (the gradient has no part in it), which a tiny ridge makes solvable without moving the optimum
    ridge = (2 * l2 * penalised.expand(f + 1, n_classes).reshape(-1) + 1e-10).diag()
    theta = torch.zeros(f + 1, n_classes, dtype=x.dtype)

    def loss(th: Tensor) -> Tensor:
        logits = xa @ th
        return (torch.logsumexp(logits, 1) - logits.gather(1, y[:, None]).squeeze(1)).mean() \
            + l2 * (th[:-1] ** 2).sum()

    current = loss(theta)
    for _ in range(max_iter):
        p = torch.softmax(xa @ theta, 1)
        grad = xa.T @ (p - onehot) / n + 2 * l2 * penalised * theta
        if float(grad.abs().max()) < tol:
            break
        # Hessian over theta flattened as (feature, class): sum_i (diag(p_i) - p_i p_i^T) (x) x_i x_i^T / n
        xp = (xa[:, :, None] * p[:, None, :]).reshape(n, -1)
        hess = -(xp.T @ xp) / n
        blocks = torch.einsum("ia,ib,ic->acb", xa, xa, p) / n  # the diag(p_i) part, one block per class
        hess = (hess.view(f + 1, n_classes, f + 1, n_classes) + blocks[..., None] * eye[None, :, None, :]
                ).reshape(hess.shape) + ridge
        step = torch.linalg.solve(hess, grad.reshape(-1)).view_as(theta)
        slope = float((grad * step).sum())
        t = 1.0
        while True:  # Armijo backtracking: a full Newton step can overshoot far from the optimum
            trial = loss(theta - t * step)
            if float(trial) <= float(current) - 1e-4 * t * slope or t < 1e-10:
                break
            t *= 0.5
        if not float(trial) < float(current):
            break  # no step lowers the loss further: at the optimum to rounding
        theta, current = theta - t * step, trial
    return theta[:-1], theta[-1]


def _as_latents(latents: Tensor | Sequence[int], name: str = "latents") -> Tensor:
    out = torch.as_tensor(latents).reshape(-1).to(torch.long).cpu()
    if out.numel() == 0:
        raise ValueError(f"{name} must name at least one latent")
    return out


def _draw_candidates(latents: Tensor, candidates: int | None, seed: int) -> Tensor:
    """`candidates` latents drawn without replacement (seeded, kept in the subset's order); all if there are fewer."""
    if candidates is None or latents.numel() <= candidates:
        return latents
    g = torch.Generator().manual_seed(seed + _CANDIDATE_SEED)
    return latents[torch.randperm(latents.numel(), generator=g)[:candidates].sort().values]


def sparse_probe(codes: Codes, labels: Tensor | Sequence, *, latents: Tensor, k_features: int = 8,
                 candidates: int | None = 64, seed: int = 0, context_ids: Tensor | None = None, pool: str = "mean",
                 train_fraction: float = 0.5, l2: float = 1e-3) -> dict:
    """Held-out accuracy of predicting `labels` from the `k_features` best of `candidates` latents of `latents`.

    Every probe sees the same number of candidates: `candidates` latents are drawn (seeded) from a larger subset,
    a subset of at most `candidates` latents is used whole (None = always whole). Otherwise a large group would
    win by having more chances to hold a lucky latent. codes: dense [N, n] or sparse (values [N, w], indices
    [N, w]) per token; labels: one per token (ints or strings). With `context_ids`, tokens are pooled per context
    (mean or max) and each context is one example (its label must be constant). Split, draw, selection and fit
    are seeded. Returns dict(accuracy, baseline (the train-majority class scored on the test half), lift,
    train_accuracy, n_train, n_test, n_classes, candidates (latent ids probed), selected (latent ids, best first)).
    Raises ProbeDataError when the labels cannot be split into two halves with two classes in the train half.
    """
    latents = _as_latents(latents)
    if k_features < 1:
        raise ValueError(f"k_features must be >= 1, got {k_features}")
    if candidates is not None and candidates < 1:
        raise ValueError(f"candidates must be >= 1 (or None for the whole subset), got {candidates}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    latents = _draw_candidates(latents, candidates, seed)
    x = _subset_dense(codes, latents)
    y = _class_ids(labels)
    if y.numel() != x.shape[0]:
        raise ValueError(f"labels must have one entry per token ({x.shape[0]}), got {y.numel()}")
    if context_ids is not None:
        if context_ids.numel() != x.shape[0]:
            raise ValueError(f"context_ids must have one entry per token ({x.shape[0]}), got {context_ids.numel()}")
        x, y = _pool(x, y, context_ids, pool)
    n_classes = int(y.max()) + 1
    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(train_fraction * n))
    if n_train < 2 or n - n_train < 1:
        raise ProbeDataError(f"too few examples ({n}) to split into train and test halves")
    tr, te = perm[:n_train], perm[n_train:]
    if torch.unique(y[tr]).numel() < 2:
        raise ProbeDataError("the train half holds a single class; need labelled data with at least two classes")
    score = _anova_f(x[tr], y[tr], n_classes)
    top = torch.sort(score, descending=True, stable=True).indices[: min(k_features, latents.numel())]
    xs = x[:, top]
    mu, sd = xs[tr].mean(0), xs[tr].std(0, unbiased=False)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    xs = (xs - mu) / sd
    w, b = _fit_logistic(xs[tr], y[tr], n_classes, l2)
    pred = (xs @ w + b).argmax(1)
    majority = int(torch.bincount(y[tr], minlength=n_classes).argmax())
    acc = float((pred[te] == y[te]).double().mean())
    base = float((y[te] == majority).double().mean())
    return {
        "accuracy": acc,
        "baseline": base,
        "lift": acc - base,
        "train_accuracy": float((pred[tr] == y[tr]).double().mean()),
        "n_train": int(n_train),
        "n_test": int(n - n_train),
        "n_classes": n_classes,
        "candidates": latents.tolist(),
        "selected": latents[top].tolist(),
    }


def token_concentration(
    values: Tensor, indices: Tensor, token_ids: Tensor, n_latents: int, top: int = 50, min_activations: int = 1
) -> Tensor:
    """Per latent [n_latents] float64: share of its top-`top` activations on its most common token id.

    NaN for latents with fewer than `min_activations` positive activations (dead or too rare to judge).
    values/indices: sparse codes [N, w] per token; token_ids: [N].
    """
    if top < 1 or min_activations < 1:
        raise ValueError(f"top and min_activations must be >= 1, got top={top}, min_activations={min_activations}")
    values = values.reshape(-1, values.shape[-1]).cpu()
    indices = indices.reshape(-1, indices.shape[-1]).cpu()
    token_ids = token_ids.reshape(-1).cpu().to(torch.long)
    if values.shape != indices.shape or token_ids.numel() != values.shape[0]:
        raise ValueError(
            f"values {list(values.shape)}, indices {list(indices.shape)} and token_ids [{token_ids.numel()}] "
            "must describe the same tokens"
        )
    tok = token_ids[:, None].expand_as(indices).reshape(-1)
    v, lat = values.reshape(-1), indices.reshape(-1)
    live = v > 0
    v, lat, tok = v[live], lat[live], tok[live]
    out = torch.full((n_latents,), float("nan"), dtype=torch.float64)
    if v.numel() == 0:
        return out
    # one sort by latent, then by value descending: lat + 1/(1+v) lies in (lat, lat+1); ties keep token order
    o = torch.sort(lat.to(torch.float64) + 1.0 / (1.0 + v.to(torch.float64)), stable=True).indices
    lat, tok = lat[o], tok[o]
    fires = torch.bincount(lat, minlength=n_latents)
    starts = fires.cumsum(0) - fires
    rank = torch.arange(lat.numel()) - starts[lat]
    keep = rank < top
    lat, tok = lat[keep], tok[keep]
    n_kept = torch.bincount(lat, minlength=n_latents)
    vocab = int(tok.max()) + 1
    pairs, counts = torch.unique(lat * vocab + tok, return_counts=True)
    best = torch.zeros(n_latents, dtype=torch.long).scatter_reduce_(0, pairs // vocab, counts, "amax")
    ok = fires >= min_activations
    out[ok] = best[ok].to(torch.float64) / n_kept[ok].to(torch.float64)
    return out


def firing_frequency(values: Tensor, indices: Tensor, n_latents: int) -> Tensor:
    """Per latent [n_latents] float64: fraction of tokens on which it is active (value > 0) in these codes."""
    values = values.reshape(-1, values.shape[-1]).cpu()
    indices = indices.reshape(-1, indices.shape[-1]).cpu()
    fires = torch.bincount(indices[values > 0], minlength=n_latents)[:n_latents]
    return fires.to(torch.float64) / max(values.shape[0], 1)


def _nanmean(x: Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else math.nan


@dataclass(frozen=True)
class MatchedConcentration:
    """Token concentration of a subset read against latents of the same firing frequency (one SAE, one code)."""

    excess: float  # mean of excess_per_latent over the matched latents (NaN if none)
    excess_per_latent: Tensor  # [len(subset)] conc minus its bin's reference mean; NaN = unjudged or unmatched
    n_matched: int
    edges: Tensor  # [B + 1] log10 firing-frequency bin edges
    subset_mean: Tensor  # [B] mean concentration of the subset's judged latents per bin (NaN where empty)
    subset_count: Tensor  # [B] judged subset latents per bin
    reference_mean: Tensor  # [B] mean concentration of the reference latents per bin (NaN where empty)

    def binned(self, name: str = "token_conc") -> dict[str, float]:
        """Flat keys `<name>_logf<lo>` (bin [lo, lo + width) of log10 frequency) for the subset's non-empty bins."""
        return {f"{name}_logf{float(self.edges[b]):g}": float(self.subset_mean[b])
                for b in range(self.subset_mean.numel()) if self.subset_count[b] > 0}


def frequency_matched_concentration(conc: Tensor, freq: Tensor, subset: Tensor | Sequence[int], *,
                                    reference: Tensor | Sequence[int] | None = None,
                                    bins: Sequence[float] = FREQ_BIN_EDGES) -> MatchedConcentration:
    """Token concentration of `subset` minus that of reference latents with the same firing frequency.

    conc, freq: per latent [n] (from `token_concentration` and `firing_frequency` on the same codes; NaN conc =
    not judged). Latents fall in fixed log10-frequency bins `bins` (default FREQ_BIN_EDGES: quarter-decades
    from 1e-7 to 1; frequencies outside go to the end bins). Reference: the judged latents of `reference` (default:
    every judged, i.e. live, latent of the SAE). A subset latent's excess is its concentration minus the mean
    concentration of the OTHER reference latents in its bin (leave-one-out, so a latent is never its own
    baseline and the whole SAE's excess is exactly 0); NaN when its bin holds no other reference latent.
    `excess` averages the per-latent excesses, so the subset's own frequency mix no longer moves it.
    """
    conc = conc.reshape(-1).to(torch.float64).cpu()
    freq = freq.reshape(-1).to(torch.float64).cpu()
    if conc.shape != freq.shape:
        raise ValueError(f"conc [{conc.numel()}] and freq [{freq.numel()}] must have one entry per latent")
    edges = torch.as_tensor(bins, dtype=torch.float64)
    if edges.numel() < 2 or bool((edges[1:] <= edges[:-1]).any()):
        raise ValueError(f"bins must be >= 2 strictly increasing log10 edges, got {edges.tolist()}")
    subset = _as_latents(subset, "subset")
    judged = ~torch.isnan(conc)
    in_ref = torch.zeros_like(judged) if reference is not None else judged.clone()
    if reference is not None:
        in_ref[_as_latents(reference, "reference")] = True
        in_ref &= judged
    n_bins = edges.numel() - 1
    bin_of = torch.bucketize(torch.log10(freq), edges[1:-1], right=True)
    ref_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bin_of[in_ref], conc[in_ref])
    ref_n = torch.bincount(bin_of[in_ref], minlength=n_bins).to(torch.float64)
    b, c, own = bin_of[subset], conc[subset], in_ref[subset]
    others = ref_n[b] - own.to(torch.float64)
    base = (ref_sum[b] - torch.where(own, c, torch.zeros_like(c))) / others.clamp_min(1)
    excess = torch.where((others > 0) & ~torch.isnan(c), c - base, torch.full_like(c, math.nan))
    ok = ~torch.isnan(c)
    sub_n = torch.bincount(b[ok], minlength=n_bins).to(torch.float64)
    sub_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b[ok], c[ok])
    return MatchedConcentration(
        excess=_nanmean(excess),
        excess_per_latent=excess,
        n_matched=int((~torch.isnan(excess)).sum()),
        edges=edges,
        subset_mean=sub_sum / sub_n.where(sub_n > 0, torch.full_like(sub_n, math.nan)),
        subset_count=sub_n.to(torch.long),
        reference_mean=ref_sum / ref_n.where(ref_n > 0, torch.full_like(ref_n, math.nan)),
    )


def random_subset_baseline(metric_fn: Callable[[Tensor], float], n_latents: int, size: int, draws: int = 5,
                           seed: int = 0, pool: Tensor | Sequence[int] | None = None) -> dict[str, float]:
    """Mean and std of `metric_fn(latents)` over `draws` seeded random subsets of `size` latents of one SAE.

    Subsets are drawn without replacement from `pool` (default all n_latents; pass the live latents to leave dead
    ones out), capped at the pool's size. Draws whose metric is NaN are left out; std is the sample std (n - 1),
    0 for one draw. Returns dict(mean, std, n_draws).
    """
    if draws < 1 or size < 1:
        raise ValueError(f"draws and size must be >= 1, got draws={draws}, size={size}")
    pool_t = torch.arange(n_latents) if pool is None else _as_latents(pool, "pool")
    g = torch.Generator().manual_seed(seed)
    vals = [metric_fn(pool_t[torch.randperm(pool_t.numel(), generator=g)[: min(size, pool_t.numel())]].sort().values)
            for _ in range(draws)]
    v = torch.tensor([x for x in vals if not math.isnan(x)], dtype=torch.float64)
    if v.numel() == 0:
        return {"mean": math.nan, "std": math.nan, "n_draws": 0.0}
    return {"mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0, "n_draws": float(v.numel())}


def proxy_report(values: Tensor, indices: Tensor, token_ids: Tensor, n_latents: int, *,
                 latents: Tensor | Sequence[int], freq: Tensor | None = None, labels: Tensor | Sequence | None = None,
                 doc_ids: Tensor | None = None, top: int = 32, min_activations: int = 5, k_features: int = 8,
                 candidates: int = 64, random_draws: int = 5, seed: int = 0, pool: Tensor | Sequence[int] | None = None,
                 binned: bool = False, conc: Tensor | None = None) -> dict[str, float]:
    """Every proxy for one latent subset as flat floats (the caller adds `proxy/` and the group or method).

    values/indices: sparse codes [N, w]; token_ids [N]; freq: per-latent firing frequency (default: measured on
    these codes). Keys: token_conc (mean over the subset's latents with >= `min_activations` activations),
    n_judged, n_subset, token_conc_excess (frequency-matched, see `frequency_matched_concentration`, reference
    = judged latents of `pool`), n_matched; with random_draws > 0 also token_conc_random, token_conc_random_std,
    token_conc_lift (vs `random_draws` size-matched random subsets of `pool`, default all latents). With
    `labels` (pooled per `doc_ids` when given) and data that can be split: probe_acc, probe_baseline, probe_lift
    (vs the majority class), and with random_draws > 0 probe_acc_random, probe_acc_random_std, probe_acc_lift
    (the random subsets use the same split and the same number of candidates). `binned` adds the subset's
    per-frequency-bin means (`token_conc_logf<lo>`). `conc`: `token_concentration` of these codes with the same
    top/min_activations, to reuse it across the subsets of one SAE (the costly part without labels).
    """
    latents = _as_latents(latents)
    if conc is None:
        conc = token_concentration(values, indices, token_ids, n_latents, top=top, min_activations=min_activations)
    elif conc.numel() != n_latents:
        raise ValueError(f"conc must have one entry per latent ({n_latents}), got {conc.numel()}")
    freq = firing_frequency(values, indices, n_latents) if freq is None else freq
    sub = conc[latents]
    out = {"token_conc": _nanmean(sub), "n_judged": float((~torch.isnan(sub)).sum()), "n_subset": float(latents.numel())}
    matched = frequency_matched_concentration(conc, freq, latents, reference=pool)
    out.update(token_conc_excess=matched.excess, n_matched=float(matched.n_matched))
    if binned:
        out.update(matched.binned())
    size = latents.numel()
    if random_draws > 0:
        rnd = random_subset_baseline(lambda s: _nanmean(conc[s]), n_latents, size, random_draws, seed, pool)
        out.update(token_conc_random=rnd["mean"], token_conc_random_std=rnd["std"],
                   token_conc_lift=out["token_conc"] - rnd["mean"])
    if labels is None:
        return out
    codes: Codes = (values, indices)
    if doc_ids is not None and doc_ids.numel() > 0 and int(doc_ids.unique().numel()) * n_latents <= 2**25:
        codes, labels, doc_ids = *_doc_features(values, indices, labels, doc_ids, n_latents), None

    def probe(subset: Tensor) -> dict:  # the same split, seed and number of candidates for every subset
        return sparse_probe(codes, labels, latents=subset, k_features=k_features, candidates=candidates, seed=seed,
                            context_ids=doc_ids)

    try:
        res = probe(latents)
    except ProbeDataError:
        return out
    out.update(probe_acc=res["accuracy"], probe_baseline=res["baseline"], probe_lift=res["lift"])
    if random_draws > 0:
        rnd = random_subset_baseline(lambda s: probe(s)["accuracy"], n_latents, size, random_draws, seed, pool)
        out.update(probe_acc_random=rnd["mean"], probe_acc_random_std=rnd["std"],
                   probe_acc_lift=res["accuracy"] - rnd["mean"])
    return out
