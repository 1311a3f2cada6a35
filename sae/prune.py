"""Subset pruning: keep the G most important latents of an SAE as a standalone SAE of size G.

A pruned SAE keeps the chosen encoder columns, b_enc entries and decoder rows (in the order given, so its own
prefixes are again importance-ordered) and the shared b_dec, input_scale and threshold. Its TopK picks the
top k among the kept latents only. Config changes, because SAEConfig needs 0 < k < n_latents:
- k becomes min(cfg.k, G - 1), so G must be >= 2;
- a Matryoshka partition survives only for a prefix keep (arange(G)): boundaries < G plus G, with their
  group weights; any other subset mixes groups, so the partition (and group_weights) is dropped. A partition
  that collapses to one group is dropped too (the result is an ordinary SAE).

`pruning_curve` evaluates many G in one pass over the data: the full pre-activations are computed once per
batch, permuted into importance order, and each G selects from its prefix, which is exactly what the pruned
SAE would compute (tests check this against `prune_sae(...).encode`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from sae.config import SAEConfig
from sae.importance import LatentStats
from sae.metrics import ReconstructionAccumulator

ORDERINGS = ("ez2", "freq", "random")  # importance orderings for a vanilla SAE (claim 3)
MEASURES = (*ORDERINGS, "prefix")  # "prefix" = identity order, the natural one for a Matryoshka SAE

BatchSource = Callable[[], Iterable[Tensor]] | Sequence[Tensor] | Tensor


def order_latents(stats: LatentStats | int, measure: str, seed: int = 0) -> Tensor:
    """Latent indices, most important first. Ties break by E[z^2] (for "freq"), then by lower index.

    `stats` may be a plain latent count for the measures that need no statistics ("random", "prefix").
    """
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {list(MEASURES)}, got {measure!r}")
    n = stats if isinstance(stats, int) else stats.n_latents
    if measure == "prefix":
        return torch.arange(n)
    if measure == "random":
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if isinstance(stats, int):
        raise ValueError(f"measure {measure!r} needs LatentStats from latent_stats(), not a latent count")
    by_ez2 = torch.sort(stats.mean_sq, descending=True, stable=True).indices
    if measure == "ez2":
        return by_ez2
    return by_ez2[torch.sort(stats.freq[by_ez2], descending=True, stable=True).indices]


def _check_keep(keep: Tensor, n: int, name: str = "keep") -> Tensor:
    keep = torch.as_tensor(keep).reshape(-1).to(torch.long).cpu()
    if keep.numel() < 2:
        raise ValueError(f"{name} must keep at least 2 latents (an SAE of size G needs k <= G - 1), got {keep.numel()}")
    if int(keep.min()) < 0 or int(keep.max()) >= n:
        raise ValueError(f"{name} indices must lie in [0, {n}), got range [{int(keep.min())}, {int(keep.max())}]")
    if torch.unique(keep).numel() != keep.numel():
        raise ValueError(f"{name} must not repeat a latent index")
    return keep


def pruned_config(cfg: SAEConfig, keep: Tensor) -> SAEConfig:
    """The SAEConfig of the SAE that keeps latents `keep` (see module docstring for k and partition)."""
    keep = _check_keep(keep, cfg.n_latents)
    G = keep.numel()
    partition, weights = None, None
    if cfg.partition is not None and torch.equal(keep, torch.arange(G)):
        partition = tuple(b for b in cfg.partition if b < G) + (G,)
        if cfg.group_weights is not None:
            weights = tuple(cfg.group_weights[: len(partition)])
        if len(partition) == 1:
            partition, weights = None, None
    return SAEConfig(
        **{**cfg.model_dump(), "n_latents": G, "k": min(cfg.k, G - 1), "partition": partition, "group_weights": weights}
    )


@torch.no_grad()
def prune_sae(sae, keep: Tensor):
    """A standalone SparseAutoencoder of size G = len(keep) holding latents `keep` of `sae`, in that order."""
    cfg = pruned_config(sae.cfg, keep)
    keep = _check_keep(keep, sae.cfg.n_latents).to(sae.W_enc.device)
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG stream
        out = type(sae)(cfg)
    out = out.to(device=sae.W_enc.device)
    out.W_enc.copy_(sae.W_enc[:, keep])
    out.b_enc.copy_(sae.b_enc[keep])
    out.W_dec.copy_(sae.W_dec[keep])
    out.b_dec.copy_(sae.b_dec)
    out.threshold.copy_(sae.threshold)
    out.compute_dtype = getattr(sae, "compute_dtype", None)
    return out.train(sae.training)


def prefix_sae(sae, G: int):
    """The Matryoshka prefix of size G: latents [0, G), partition truncated to its boundaries below G."""
    if not 2 <= G <= sae.cfg.n_latents:
        raise ValueError(f"G must lie in [2, n_latents={sae.cfg.n_latents}], got {G}")
    return prune_sae(sae, torch.arange(G))


def _iter_batches(batches: BatchSource) -> Iterable[Tensor]:
    if isinstance(batches, Tensor):
        return [batches]
    if callable(batches):
        return batches()
    return batches


def _select(pre_prefix: Tensor, k: int, architecture: str, threshold: Tensor) -> tuple[Tensor, Tensor]:
    """The pruned SAE's eval-mode selection on its own pre-activations (see SparseAutoencoder.select)."""
    if architecture == "topk":
        vals, idx = pre_prefix.topk(k, dim=1, sorted=False)
        return vals.float().clamp_min_(0), idx
    pre = pre_prefix.float()
    active = pre > threshold.clamp_min(0)
    width = max(1, int(active.sum(1).max()))
    return pre.masked_fill(~active, 0).topk(width, dim=1, sorted=False)


@torch.no_grad()
def pruning_curve(sae, batches_factory: BatchSource, Gs: Sequence[int], order: Tensor) -> list[dict[str, float]]:
    """Per G in `Gs` (keeping `order[:G]`): dict(G, k, fvu, mse, l0, dead_fraction, tokens), in the order of Gs.

    `batches_factory` is a callable returning a fresh iterator of raw batches [B, d], or a list of tensors;
    it is iterated once. The SAE is evaluated in eval mode (BatchTopK: threshold rule) and restored after.
    `dead_fraction` is the share of the G kept latents that never fired in the window.
    """
    n = sae.cfg.n_latents
    Gs = [int(g) for g in Gs]
    if not Gs:
        raise ValueError("Gs must list at least one latent count")
    bad = [g for g in Gs if not 2 <= g <= n]
    if bad:
        raise ValueError(f"Gs must each lie in [2, n_latents={n}], got {bad}")
    g_max = max(Gs)
    order = torch.as_tensor(order).reshape(-1).to(torch.long)
    if order.numel() < g_max:
        raise ValueError(f"order must rank at least max(Gs) = {g_max} latents, got {order.numel()}")
    _check_keep(order[:g_max], n, name="order")
    device = sae.W_enc.device
    kept = order[:g_max].to(device)
    ks = [min(sae.cfg.k, g - 1) for g in Gs]
    accs = [ReconstructionAccumulator() for _ in Gs]
    fired = [torch.zeros(g, dtype=torch.bool, device=device) for g in Gs]
    was_training = sae.training
    sae.eval()
    try:
        for x in _iter_batches(batches_factory):
            x = x.reshape(-1, x.shape[-1]).to(device)
            if x.shape[0] == 0:
                continue
            _, pre = sae.pre_activations(sae.normalise(x))
            pre = pre[:, kept]  # importance order; each G uses the prefix [:, :G]
            for i, (g, k) in enumerate(zip(Gs, ks, strict=True)):
                vals, idx = _select(pre[:, :g], k, sae.cfg.architecture, sae.threshold)
                x_hat = sae.decode(vals, kept[idx])
                accs[i].update(x, x_hat, vals)
                fired[i][idx[vals > 0]] = True
    finally:
        sae.train(was_training)
    rows = []
    for g, k, acc, f in zip(Gs, ks, accs, fired, strict=True):
        r = acc.result()
        rows.append({"G": g, "k": k, **r, "dead_fraction": 1.0 - float(f.float().mean())})
    return rows
