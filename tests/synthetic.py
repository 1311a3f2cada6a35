"""Planted sparse dictionaries: data whose true features are known, so tests can check recovery.

x = sum_i a_i f_i + noise, with unit-norm features f_i whose firing probabilities follow a power law over rank
(frequent features first) and non-negative magnitudes a_i. Seeded and small so training takes seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Planted:
    features: Tensor  # [F, d] unit-norm true dictionary, most frequent first
    freq: Tensor  # [F] firing probability of each feature
    x: Tensor  # [N, d] activations


def make_planted(*, d: int = 32, n_features: int = 96, n_tokens: int = 16384, mean_active: float = 4.0,
                 exponent: float = 0.6, noise: float = 0.02, offset: float = 0.5, scale: float = 3.0,
                 seed: int = 0, feature_seed: int = 0) -> Planted:
    """Tokens with ~mean_active features each; feature i fires with probability proportional to (i+1)^-exponent.

    A constant `offset` direction and an overall `scale` make sure b_dec and input normalisation matter.
    `feature_seed` fixes the dictionary, `seed` the tokens (so held-out data shares the features).
    """
    gf = torch.Generator().manual_seed(10_007 + feature_seed)  # offset: never the SAE's own init stream
    feats = torch.randn(n_features, d, generator=gf)
    g = torch.Generator().manual_seed(20_011 + seed)
    feats = feats / feats.norm(dim=1, keepdim=True)
    p = (torch.arange(1, n_features + 1, dtype=torch.float64) ** -exponent)
    p = (p / p.sum() * mean_active).clamp(max=0.9).float()
    fire = torch.rand(n_tokens, n_features, generator=g) < p
    mag = 0.5 + torch.rand(n_tokens, n_features, generator=g)
    codes = fire * mag
    x = codes @ feats + noise * torch.randn(n_tokens, d, generator=g)
    x = scale * (x + offset * torch.ones(d) / d**0.5)
    return Planted(features=feats, freq=p, x=x)


def batches(x: Tensor, batch_size: int, *, epochs: int = 1, seed: int = 0) -> Iterator[Tensor]:
    """Shuffled [batch_size, d] batches for `epochs` passes (the last partial batch of each pass is dropped)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for s in range(0, x.shape[0] - batch_size + 1, batch_size):
            yield x[perm[s : s + batch_size]]


def best_cosines(features: Tensor, W_dec: Tensor) -> Tensor:
    """For each planted feature, the largest cosine with any decoder row."""
    w = W_dec / W_dec.norm(dim=1, keepdim=True)
    return (features @ w.t()).max(dim=1).values


@contextmanager
def single_thread() -> Iterator[None]:
    """Tiny tensors run fastest on one thread (and the CI box is shared); restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
