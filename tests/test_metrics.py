"""FVU/MSE/L0 definitions, the streaming accumulator, RSA and linear CKA invariances."""

import math

import pytest
import torch

from sae.metrics import (
    ReconstructionAccumulator,
    RSAReference,
    batch_moments,
    dead_fraction,
    fvu,
    l0,
    linear_cka,
    linear_cka_from_grams,
    mse,
    rsa,
)


def _data(n=300, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 3.0, d) + 2.0
    return x, x + 0.3 * torch.randn(n, d, generator=g)


def test_fvu_endpoints_and_mse():
    x, x_hat = _data()
    assert fvu(x, x) == 0.0
    assert fvu(x, x.mean(0, keepdim=True).expand_as(x)) == pytest.approx(1.0, abs=1e-12)
    assert fvu(x, torch.zeros_like(x)) > 1.0  # ignoring the mean is worse than predicting it
    assert mse(x, x_hat) == pytest.approx(float(((x - x_hat).double() ** 2).mean()), rel=1e-12)
    with pytest.raises(ValueError, match="zero variance"):
        fvu(torch.ones(4, 3), torch.zeros(4, 3))


def test_l0_and_dead_fraction():
    values = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])  # padding zeros are not firing
    assert l0(values) == 1.5
    assert dead_fraction(torch.tensor([0.0, 0.1, 0.0, 0.5])) == 0.5


def test_accumulator_equals_one_shot():
    x, x_hat = (t.double() for t in _data(n=257))  # float64 in, float64 throughout: equal to rounding
    values = (torch.rand(257, 8, generator=torch.Generator().manual_seed(1)) > 0.4).float()
    acc = ReconstructionAccumulator()
    for s in range(0, 257, 50):  # uneven last batch
        acc.update(x[s : s + 50], x_hat[s : s + 50], values[s : s + 50])
    r = acc.result()
    assert r["fvu"] == pytest.approx(fvu(x, x_hat), rel=1e-10)
    assert r["mse"] == pytest.approx(mse(x, x_hat), rel=1e-10)
    assert r["l0"] == pytest.approx(l0(values), rel=1e-12)
    assert r["tokens"] == 257
    shared = ReconstructionAccumulator()  # x's moments computed once and shared: the same numbers
    for s in range(0, 257, 50):
        shared.update(x[s : s + 50], x_hat[s : s + 50], values[s : s + 50], moments=batch_moments(x[s : s + 50]))
    assert shared.result() == r
    single = ReconstructionAccumulator()  # float32 in: each error rounds once, the sums stay float64
    for s in range(0, 257, 50):
        single.update(x[s : s + 50].float(), x_hat[s : s + 50].float(), values[s : s + 50])
    assert single.result()["fvu"] == pytest.approx(r["fvu"], rel=1e-7)
    scaled = ReconstructionAccumulator()  # from residuals in units 4x the raw ones (an SAE's normalised space)
    for s in range(0, 257, 50):
        residual = 4.0 * (x[s : s + 50] - x_hat[s : s + 50])
        scaled.update_residual(residual, values[s : s + 50], moments=batch_moments(x[s : s + 50]), to_raw=0.25)
    assert scaled.result() == pytest.approx(r, rel=1e-12)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        scaled.update_residual(residual[:, :-1], moments=batch_moments(x[:50]))
    acc2 = ReconstructionAccumulator()
    acc2.update(x, x_hat)
    assert math.isnan(acc2.result()["l0"])
    with pytest.raises(ValueError, match="same shape"):
        acc2.update(x, x_hat[:, :-1])
    with pytest.raises(ValueError, match="empty"):
        ReconstructionAccumulator().result()


def test_rsa_identity_and_permutation():
    x, x_hat = _data(n=400)
    assert rsa(x, x, n_tokens=200) == pytest.approx(1.0, abs=1e-12)
    assert rsa(x, x_hat, n_tokens=200) > 0.8
    shuffled = x[torch.randperm(400, generator=torch.Generator().manual_seed(3))]
    assert abs(rsa(x, shuffled, n_tokens=200)) < 0.1
    assert rsa(x, x_hat, n_tokens=200, seed=1) == rsa(x, x_hat, n_tokens=200, seed=1)  # seeded sample
    assert rsa(x, x * 3.0, metric="cosine") == pytest.approx(1.0, abs=1e-12)


def test_rsa_reference_ranks_x_once_and_scores_like_rsa():
    x, x_hat = _data(n=400)
    ref = RSAReference(x, n_tokens=200, seed=1)
    for other in (x_hat, x_hat.flip(1), x):
        assert ref(other) == rsa(x, other, n_tokens=200, seed=1)  # the same sample, pairs and ranks
    with pytest.raises(ValueError, match="400 tokens"):
        ref(x_hat[:300])


def test_cka_from_float32_sums_about_a_shift_matches_float64():
    """The evaluation accumulates CKA's sums in float32 about the eval mean: with activations far from the origin
    (a residual stream's mean is large), uncentred float32 sums would cancel; shifted ones stay exact to 1e-6."""
    x, x_hat = _data(n=4096)
    x, x_hat = x.float() + 300.0, x_hat.float() + 300.0
    exact = linear_cka(x, x_hat)
    shift = x.double().mean(0).float()
    xc, yc = x - shift, x_hat - shift
    shifted = linear_cka_from_grams((xc.T @ xc).double(), xc.sum(0, dtype=torch.float64), (yc.T @ yc).double(),
                                    (yc.T @ xc).double(), yc.sum(0, dtype=torch.float64), x.shape[0])
    naive = linear_cka_from_grams((x.T @ x).double(), x.sum(0, dtype=torch.float64), (x_hat.T @ x_hat).double(),
                                  (x_hat.T @ x).double(), x_hat.sum(0, dtype=torch.float64), x.shape[0])
    assert shifted == pytest.approx(exact, abs=1e-6)
    assert abs(naive - exact) > 100 * abs(shifted - exact)  # what the shift is for


def test_cka_invariances():
    x, x_hat = _data(n=500)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    base = linear_cka(x, x_hat)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, (x_hat.double() @ q) * 7.5) == pytest.approx(base, abs=1e-10)
    noise = torch.randn(500, 16, generator=torch.Generator().manual_seed(5))
    assert linear_cka(x, noise) < 0.2 < base


def test_variance_share_of_top_tokens_flags_massive_activations():
    from sae.metrics import variance_share_of_top_tokens

    x = torch.randn(1000, 16, generator=torch.Generator().manual_seed(0))
    assert variance_share_of_top_tokens(x, 0.01) < 0.05  # ordinary data: the top 1% hold a few percent
    x[::100] *= 200.0  # one token in a hundred carries a massive activation, like the first token after BOS
    assert variance_share_of_top_tokens(x, 0.01) > 0.95
    with pytest.raises(ValueError, match="fraction"):
        variance_share_of_top_tokens(x, 0.0)
