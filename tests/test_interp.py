"""Sparse probing finds a planted label latent; token concentration on pure and spread latents."""

import math

import pytest
import torch

from sae.interp import group_latents, interpretability_report, sparse_probe, token_concentration

N_LAT, K = 40, 4


def _planted_codes(n=600, seed=0, labels=None):
    """Sparse codes where latent 7 fires (strongly) on label-1 tokens 90% of the time, 5% otherwise."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.4).long() if labels is None else labels
    indices = torch.stack([torch.randperm(N_LAT, generator=g)[:K] for _ in range(n)])
    indices[indices == 7] = 8  # latent 7 only where planted below
    values = torch.rand(n, K, generator=g) + 0.1
    p_fire = torch.where(labels == 1, 0.9, 0.05)
    fire = torch.rand(n, generator=g) < p_fire
    indices[fire, 0] = 7
    values[fire, 0] = 2.0 + torch.rand(int(fire.sum()), generator=g)
    return values, indices, labels


def test_probe_finds_planted_latent_and_beats_baseline():
    values, indices, labels = _planted_codes()
    res = sparse_probe((values, indices), labels, latents=torch.arange(N_LAT), k_features=3, seed=0)
    assert res["selected"][0] == 7
    assert res["baseline"] < 0.7 and res["accuracy"] > 0.85 and res["lift"] > 0.2
    dense = torch.zeros(600, N_LAT).scatter_(1, indices, values)
    assert sparse_probe(dense, labels, latents=torch.arange(N_LAT), k_features=3)["accuracy"] == res["accuracy"]
    without = sparse_probe((values, indices), labels, latents=torch.arange(10, N_LAT), k_features=3, seed=0)
    assert without["accuracy"] < res["accuracy"] - 0.2  # the subset lacking latent 7 cannot probe the label


def test_probe_pools_per_context_and_accepts_string_labels():
    ctx = torch.arange(800) // 8
    labels = (torch.rand(100, generator=torch.Generator().manual_seed(2)) < 0.3).long().repeat_interleave(8)
    values, indices, _ = _planted_codes(n=800, seed=1, labels=labels)  # label constant within each context
    token_labels = labels.clone()
    token_labels[::8] = 1 - token_labels[::8]
    names = ["history" if int(v) else "science" for v in labels]
    res = sparse_probe((values, indices), names, latents=torch.arange(N_LAT), k_features=2, context_ids=ctx)
    assert res["n_train"] + res["n_test"] == 100 and res["n_classes"] == 2
    assert res["selected"][0] == 7 and res["accuracy"] > 0.9 > res["baseline"]
    with pytest.raises(ValueError, match="constant within each context"):
        sparse_probe((values, indices), token_labels, latents=torch.arange(N_LAT), context_ids=ctx)


def test_token_concentration():
    g = torch.Generator().manual_seed(0)
    n = 500
    tokens = torch.randint(0, 100, (n,), generator=g)
    tokens[::5] = 42
    indices = torch.full((n, 2), 3)
    values = torch.zeros(n, 2)
    values[tokens == 42, 0] = 1.0 + torch.rand(int((tokens == 42).sum()), generator=g)
    indices[:, 0] = 0  # latent 0 fires only on token 42
    indices[:, 1] = 1  # latent 1 fires on every token, spread over the vocabulary
    values[:, 1] = torch.rand(n, generator=g) + 0.01
    conc = token_concentration(values, indices, tokens, n_latents=4, top=50)
    assert conc[0] == 1.0
    assert conc[1] < 0.5
    assert math.isnan(conc[2]) and math.isnan(conc[3])  # never fired (latent 3 only as zero padding)
    rep = interpretability_report(values, indices, tokens, 4, latents=torch.tensor([0, 1, 2]), top=50)
    assert rep["n_judged"] == 2 and rep["token_concentration_mean"] == pytest.approx((1.0 + float(conc[1])) / 2)


def test_top_n_counts_only_largest_activations():
    tokens = torch.tensor([5] * 10 + [6] * 30)
    values = torch.cat([torch.full((10,), 9.0), torch.full((30,), 1.0)])[:, None]
    indices = torch.zeros(40, 1, dtype=torch.long)
    assert token_concentration(values, indices, tokens, 1, top=10)[0] == 1.0  # top 10 are all token 5
    assert token_concentration(values, indices, tokens, 1, top=40)[0] == 0.75


def test_group_latents():
    groups = group_latents((4, 8, 16))
    assert [g.tolist()[:2] for g in groups] == [[0, 1], [4, 5], [8, 9]] and [len(g) for g in groups] == [4, 4, 8]
