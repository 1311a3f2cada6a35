"""Power-law vs exponential fits on planted spectra, and streaming latent statistics."""

import pytest
import torch

from sae.config import SAEConfig
from sae.importance import decoder_spectrum, fit_power_law, importance_summary, latent_stats
from sae.model import SparseAutoencoder


def _noisy(clean: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return clean * torch.exp(0.1 * torch.randn(clean.shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("alpha", [0.7, 1.5])
def test_power_law_recovers_exponent_and_is_preferred(alpha):
    rank = torch.arange(1, 2001, dtype=torch.float64)
    imp = _noisy(3.0 * rank**-alpha, seed=0)
    imp = torch.cat([imp, torch.zeros(50, dtype=torch.float64)])[torch.randperm(2050)]  # dead, shuffled
    fit = fit_power_law(imp)
    assert fit.exponent == pytest.approx(alpha, rel=0.2)
    assert fit.preferred == "power_law" and fit.r2 > fit.exp_r2
    assert fit.n_fit == 2000 and fit.n_excluded_zero == 50


def test_exponential_data_prefers_exponential():
    rank = torch.arange(1, 2001, dtype=torch.float64)
    fit = fit_power_law(_noisy(torch.exp(-0.004 * rank), seed=1))
    assert fit.preferred == "exponential" and fit.exp_r2 > fit.r2
    assert fit.exp_rate == pytest.approx(0.004, rel=0.2)


def test_fit_rank_window_and_errors():
    rank = torch.arange(1, 101, dtype=torch.float64)
    fit = fit_power_law(rank**-1.0, min_rank=5, max_rank=50)
    assert (fit.n_fit, fit.min_rank, fit.max_rank) == (46, 5, 50)
    assert fit.exponent == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 3 live"):
        fit_power_law(torch.tensor([1.0, 0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="non-negative"):
        fit_power_law(torch.tensor([1.0, -0.5, 0.2]))


def test_latent_stats_matches_dense_codes():
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=12, n_latents=48, k=4)
    sae = SparseAutoencoder.from_config(cfg, seed=0)
    xs = [torch.randn(37, 12) for _ in range(3)]
    stats = latent_stats(sae, xs)
    z = torch.cat([sae.encode_dense(x) for x in xs]).double()
    assert stats.tokens == 111
    torch.testing.assert_close(stats.mean_sq, (z**2).mean(0))
    torch.testing.assert_close(stats.freq, (z > 0).double().mean(0))
    s = importance_summary(stats, fit_power_law(stats.mean_sq))
    assert 0.0 <= s["dead_fraction"] < 1.0 and "power_law_exponent" in s


def test_decoder_spectrum_descending_and_weighted():
    cfg = SAEConfig(d_in=8, n_latents=32, k=2)
    sae = SparseAutoencoder.from_config(cfg, seed=1)
    ev = decoder_spectrum(sae)
    assert ev.shape == (8,) and torch.all(ev[:-1] >= ev[1:])
    assert float(ev.sum()) == pytest.approx(1.0, rel=1e-6)  # trace = mean squared row norm = 1
    w = torch.zeros(32, dtype=torch.float64)
    w[3] = 1.0  # all weight on one unit direction: rank-one covariance
    ev1 = decoder_spectrum(sae, weights=w)
    assert float(ev1[0]) == pytest.approx(1.0, rel=1e-6) and float(ev1[1:].abs().max()) < 1e-9
