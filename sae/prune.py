"""Subset pruning: keep G latents of an SAE, either as a standalone SAE or as a scoring rule on the full code.

Two scoring rules for a reduced SAE that keeps latents `keep` (see docs/science.md, "Scoring rules"):
- `masked`: the full SAE's selection, with every latent outside `keep` zeroed. This is how a Matryoshka SAE is
  trained and scored (each prefix reconstructs from the full top-k restricted to the prefix), so L0 at G is
  below k. It needs nothing but the full SAE's code, so one encoding of the eval set serves every G.
- `reselect`: the top k among the kept latents only (k becomes min(k, G - 1)); exactly what the standalone SAE
  `prune_sae(sae, keep)` computes, so L0 = k for TopK (fewer where ReLU zeroes a pick). For BatchTopK the
  inference rule is a threshold, under which the two rules coincide.
The two rules can put a Matryoshka prefix on either side of a pruned vanilla SAE, which is why both are logged
with their L0.

A standalone pruned SAE keeps the chosen encoder columns, b_enc entries and decoder rows (in the order given,
so its own prefixes are again importance-ordered) and the shared b_dec, input_scale and threshold. Config
changes, because SAEConfig needs 0 < k < n_latents:
- k becomes min(cfg.k, G - 1), so G must be >= 2;
- a Matryoshka partition survives only for a prefix keep (arange(G)): boundaries < G plus G, with their
  group weights; any other subset mixes groups, so the partition (and group_weights) is dropped. A partition
  that collapses to one group is dropped too (the result is an ordinary SAE).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from sae.config import SAEConfig
from sae.importance import LatentStats
from sae.model import fixed_shapes_on, sparse_decode

ORDERINGS = ("ez2", "freq", "random")  # importance orderings for a vanilla SAE (claim 3)
MEASURES = (*ORDERINGS, "prefix")  # "prefix" = identity order, the natural one for a Matryoshka SAE


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


RULES = ("masked", "reselect")


def reduced_code(sae, pre: Tensor, full_vals: Tensor, full_idx: Tensor, kept: Tensor, rule: str,
                 kept_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The code (values, indices into the FULL dictionary) of the SAE reduced to latents `kept`, by `rule`.

    pre: the full SAE's dense pre-activations [B, n]; full_vals/full_idx: its own selection of them (what
    `sae.select(pre)` returns in eval mode). `kept_mask` (bool [n], True on `kept`) may be passed to save
    rebuilding it per batch. Decode with the full SAE: `sae.decode(values, indices)` equals what the standalone
    `prune_sae(sae, kept)` reconstructs under `reselect` (tests check this).
    """
    if rule == "masked":
        if kept_mask is None:
            kept_mask = torch.zeros(sae.cfg.n_latents, dtype=torch.bool, device=full_idx.device)
            kept_mask[kept] = True
        return full_vals * kept_mask[full_idx], full_idx
    if rule != "reselect":
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    sub = pre.index_select(1, kept)
    g = kept.numel()
    if sae.cfg.architecture == "topk":
        vals, idx = sub.topk(min(sae.cfg.k, g - 1), dim=1, sorted=False)
        vals = vals.to(full_vals.dtype).clamp_min_(0)
    else:  # BatchTopK's inference threshold is per token and latent, so this equals the masked code
        sub = sub.to(full_vals.dtype)
        active = sub > sae.threshold.clamp_min(0)
        # a token's active kept latents are among its active latents, so the full code's width bounds them: off
        # the CPU that fixed width saves a host read of the exact one
        width = (max(1, min(full_vals.shape[1], g)) if fixed_shapes_on(pre.device)
                 else max(1, int(active.sum(1).max())))
        vals, idx = sub.masked_fill(~active, 0).topk(width, dim=1, sorted=False)
    return vals, kept[idx]


def check_nested(prefixes: Sequence[Tensor]) -> None:
    """Raise unless each kept set extends the one before it (`order[:G]` for increasing G): what the nested
    scorers below rely on. A caller that scores many batches of the same curve checks once and passes
    check=False (on a GPU each torch.equal is a host sync)."""
    empty = prefixes[0][:0] if prefixes else None
    for small, big in itertools.pairwise([empty, *prefixes] if prefixes else []):
        if big.numel() <= small.numel() or not torch.equal(big[: small.numel()], small):
            raise ValueError(f"each kept set must extend the one before it (a prefix of one order), got sizes "
                             f"{[p.numel() for p in prefixes]}")


def nested_reselect_codes(sae, pre: Tensor, prefixes: list[Tensor], dtype: torch.dtype, *, check: bool = True
                          ) -> list[tuple[Tensor, Tensor]]:
    """The `reselect` codes of nested kept sets, each a prefix of the next (`order[:G]` for increasing G), as
    `reduced_code` gives them one by one (TopK only), from one search of each band between consecutive sets: the
    top k among order[:G2] is the top k of the top k among order[:G1] and the top k among order[G1:G2]. So a
    curve costs one pass over its largest kept set instead of one per G."""
    if sae.cfg.architecture != "topk":
        raise ValueError("nested_reselect_codes is for TopK SAEs; BatchTopK's reselect code is its threshold")
    if check:
        check_nested(prefixes)
    k = sae.cfg.k
    top_v = pre.new_empty(pre.shape[0], 0)
    top_i = torch.empty(pre.shape[0], 0, dtype=torch.long, device=pre.device)
    out: list[tuple[Tensor, Tensor]] = []
    previous = prefixes[0][:0] if prefixes else torch.empty(0, dtype=torch.long)
    for kept in prefixes:
        band = kept[previous.numel():]
        band_v, j = pre.index_select(1, band).topk(min(k, band.numel()), dim=1, sorted=False)
        top_v, top_i = torch.cat([top_v, band_v], 1), torch.cat([top_i, band[j]], 1)
        if top_v.shape[1] > k:
            top_v, j = top_v.topk(k, dim=1, sorted=False)
            top_i = top_i.gather(1, j)
        previous = kept
        width = min(k, kept.numel() - 1)
        v, i = top_v, top_i
        if width < v.shape[1]:
            v, j = v.topk(width, dim=1, sorted=False)
            i = i.gather(1, j)
        out.append((v.to(dtype).clamp_min(0), i))
    return out


@torch.no_grad()
def nested_masked_residuals(W_dec: Tensor, residual: Tensor, vals: Tensor, idx: Tensor, prefixes: list[Tensor],
                            n_latents: int, *, check: bool = True, fixed_shapes: bool | None = None) -> list[Tensor]:
    """The `masked` residuals (x - x_hat, in the units of `residual`) of nested kept sets (`order[:G]` for
    increasing G), from the full code's residual: masking drops the code's entries outside the kept set, so each
    residual is the next larger set's plus the decode of the entries in the band between them. Every entry is
    decoded once per curve, where decoding each masked code whole costs one full decode per G.

    residual: the full SAE's x - x_hat [B, d]; vals/idx: its code [B, w]. Returns the residuals in the order of
    `prefixes`. Equal to decoding `reduced_code(..., "masked")` to float32 rounding (tests check this). On a CPU
    each band's entries are gathered first (a decode of the band only); with `fixed_shapes` (None: off the CPU)
    the band is decoded in place with the other entries zeroed, which needs no host read of the band's size."""
    if check:
        check_nested(prefixes)
    if not prefixes:
        return []
    largest = prefixes[-1]
    rank = torch.full((n_latents,), n_latents, dtype=torch.long, device=idx.device)
    rank[largest] = torch.arange(largest.numel(), device=idx.device)
    entry_rank = rank[idx]
    out: list[Tensor] = []
    upper = n_latents + 1
    for kept in reversed(prefixes):
        band = (entry_rank >= kept.numel()) & (entry_rank < upper) & (vals != 0)
        if not fixed_shapes_on(vals.device, fixed_shapes):
            counts = band.sum(1)
            offsets = torch.zeros_like(counts)
            offsets[1:] = counts.cumsum(0)[:-1]
            residual = residual + sparse_decode(vals[band], idx[band], W_dec, offsets)
        else:
            residual = residual + sparse_decode(torch.where(band, vals, 0), idx, W_dec)
        out.append(residual)
        upper = kept.numel()
    return out[::-1]
