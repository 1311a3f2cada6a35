"""Offline interpretability proxies that need no judge model (claim 4 of PAPER.md).

1. Sparse probing: can a few latents predict a labelled property of the text (e.g. the wiki article's topic)?
   The k_features latents with the best univariate class separation (ANOVA F on the train half) feed a
   multinomial logistic regression (plain torch, L-BFGS); held-out accuracy is compared with the
   majority-class baseline.
2. Token concentration: for each latent, the share of its top-N activations that fall on its single most
   common token id (1.0 = a pure single-token detector; near 1/N for a latent spread over many tokens).

Both take a latent *subset*, so a pruned vanilla SAE's top-G latents, a Matryoshka prefix, or the inner vs
outer Matryoshka groups (`group_latents`) can be compared. Encode with the SAE being judged: a pruned SAE's
codes come from `prune_sae(...)` itself (its TopK competes among kept latents only), not from the full SAE.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Codes = Tensor | tuple[Tensor, Tensor]


@torch.no_grad()
def encode_all(sae, batches: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """Sparse codes (values [N, w], indices [N, w]) of every token, on CPU, in eval mode; zero value = inactive."""
    if isinstance(batches, Tensor):
        batches = [batches]
    was_training = sae.training
    sae.eval()
    vals, idxs = [], []
    try:
        dev = sae.W_enc.device
        for x in batches:
            v, i = sae.encode(x.reshape(-1, x.shape[-1]).to(dev))
            vals.append(v.float().cpu())
            idxs.append(i.cpu())
    finally:
        sae.train(was_training)
    if not vals:
        raise ValueError("encode_all got no batches")
    width = max(v.shape[1] for v in vals)  # BatchTopK's threshold rule gives a varying width: pad with zeros
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


def _fit_logistic(x: Tensor, y: Tensor, n_classes: int, l2: float) -> tuple[Tensor, Tensor]:
    w = torch.zeros(x.shape[1], n_classes, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(n_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def sparse_probe(
    codes: Codes,
    labels: Tensor | Sequence,
    *,
    latents: Tensor,
    k_features: int = 8,
    seed: int = 0,
    context_ids: Tensor | None = None,
    pool: str = "mean",
    train_fraction: float = 0.5,
    l2: float = 1e-3,
) -> dict:
    """Held-out accuracy of predicting `labels` from the `k_features` best of `latents`.

    codes: dense [N, n] or sparse (values [N, w], indices [N, w]) per token; labels: one per token (ints or
    strings). With `context_ids`, tokens are pooled per context (mean or max) and each context is one example
    (its label must be constant). Split, selection and fit are seeded. Returns dict(accuracy, baseline (the
    train-majority class scored on the test half), lift, train_accuracy, n_train, n_test, n_classes,
    selected (latent ids, best first)).
    """
    latents = torch.as_tensor(latents).reshape(-1).to(torch.long).cpu()
    if latents.numel() == 0:
        raise ValueError("latents must name at least one latent to probe")
    if k_features < 1:
        raise ValueError(f"k_features must be >= 1, got {k_features}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
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
        raise ValueError(f"too few examples ({n}) to split into train and test halves")
    tr, te = perm[:n_train], perm[n_train:]
    if torch.unique(y[tr]).numel() < 2:
        raise ValueError("the train half holds a single class; need labelled data with at least two classes")
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
    o = torch.sort(v, descending=True, stable=True).indices  # then a stable sort by latent keeps value order
    lat, tok = lat[o], tok[o]
    o = torch.sort(lat, stable=True).indices
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


def interpretability_report(
    values: Tensor,
    indices: Tensor,
    token_ids: Tensor,
    n_latents: int,
    *,
    latents: Tensor,
    labels: Tensor | Sequence | None = None,
    context_ids: Tensor | None = None,
    top: int = 50,
    min_activations: int = 5,
    k_features: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """Both proxies for one latent subset, as a flat float dict for tracking.

    token_concentration_mean is over the subset's latents with >= `min_activations` activations
    (n_judged of n_subset); the probe runs only when `labels` is given.
    """
    latents = torch.as_tensor(latents).reshape(-1).to(torch.long)
    conc = token_concentration(values, indices, token_ids, n_latents, top=top, min_activations=min_activations)
    sub = conc[latents]
    judged = sub[~torch.isnan(sub)]
    out = {
        "token_concentration_mean": float(judged.mean()) if judged.numel() else float("nan"),
        "n_judged": float(judged.numel()),
        "n_subset": float(latents.numel()),
    }
    if labels is not None:
        probe = sparse_probe(
            (values, indices), labels, latents=latents, k_features=k_features, seed=seed, context_ids=context_ids
        )
        out.update(
            probe_accuracy=probe["accuracy"], probe_baseline=probe["baseline"], probe_lift=probe["lift"]
        )
    return out
