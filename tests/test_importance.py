"""Power-law fits on planted spectra (window, bins, bootstrap, held-out comparison), and latent statistics."""

import pytest
import torch

from sae.config import SAEConfig
from sae.importance import MODELS, decoder_spectrum, fit_power_law, latent_stats
from sae.model import SparseAutoencoder
from sae.plots import plot_importance


def _noisy(clean: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return clean * torch.exp(0.1 * torch.randn(clean.shape, generator=g, dtype=torch.float64))


def _ranks(n: int) -> torch.Tensor:
    return torch.arange(1, n + 1, dtype=torch.float64)


@pytest.mark.parametrize("alpha", [0.7, 1.5])
def test_power_law_data_prefers_power_law_by_heldout_error(alpha):
    rank = _ranks(2000)
    imp = _noisy(3.0 * rank**-alpha, seed=0)
    imp = torch.cat([imp, torch.zeros(50, dtype=torch.float64)])[torch.randperm(2050)]  # dead, shuffled
    fit = fit_power_law(imp, head=0)
    assert fit.exponent == pytest.approx(alpha, rel=0.05)
    assert fit.preferred == "power_law" and fit.heldout_mse_power_law < fit.heldout_mse_exponential
    assert fit.r2 > fit.exp_r2  # in-sample R^2 kept as a secondary number
    assert (fit.n_fit, fit.n_dead, fit.dense_head, fit.min_rank, fit.max_rank) == (2000, 50, 0, 1, 2000)
    assert 20 <= fit.n_bins <= 30


def test_power_law_preferred_over_seeds_despite_nested_lognormal():
    """The log-normal law nests the power law; the one-standard-error rule keeps it from winning ties."""
    rank = _ranks(3000)
    prefs = [fit_power_law(_noisy(rank**-1.2, seed=s), head=0, n_boot=0, seed=s).preferred for s in range(10)]
    assert prefs.count("power_law") >= 8 and "exponential" not in prefs


def test_exponential_data_prefers_exponential():
    fit = fit_power_law(_noisy(torch.exp(-0.004 * _ranks(2000)), seed=1), head=0)
    assert fit.preferred == "exponential"
    assert fit.heldout_mse_exponential < min(fit.heldout_mse_power_law, fit.heldout_mse_lognormal)
    assert fit.exp_rate == pytest.approx(0.004, rel=0.05)


@pytest.mark.parametrize("curvature", [0.03, 0.1])
def test_lognormal_data_prefers_lognormal(curvature):
    log_r = torch.log(_ranks(4000))
    fit = fit_power_law(_noisy(torch.exp(1.0 - 0.5 * log_r - curvature * log_r**2), seed=2), head=0)
    assert fit.preferred == "lognormal"
    assert fit.heldout_mse_lognormal < min(fit.heldout_mse_power_law, fit.heldout_mse_exponential)
    assert fit.ln_curvature == pytest.approx(curvature, rel=0.2)


def test_dense_head_detected_excluded_and_reported():
    k, alpha = 32, 1.0
    imp = _noisy(_ranks(4000) ** -alpha, seed=3)
    g = torch.Generator().manual_seed(3)
    imp[:k] = 200.0 * (1 + 0.5 * torch.rand(k, generator=g, dtype=torch.float64))  # dense latents, then a cliff
    tail = imp[k:]
    fit = fit_power_law(imp)
    assert fit.dense_head == k and fit.min_rank == k + 1
    assert fit.exponent == pytest.approx(alpha, rel=0.05)
    assert fit.exponent_lo <= alpha <= fit.exponent_hi
    assert fit_power_law(imp, head=k).exponent == pytest.approx(fit.exponent)  # caller-given head
    everything = fit_power_law(imp, head=0)
    assert everything.dense_head == 0 and abs(everything.exponent - alpha) > 0.3
    assert fit_power_law(tail).dense_head == 0  # a plain power law has no head


@pytest.mark.parametrize("n", [300, 20000])
def test_bootstrap_interval_contains_true_exponent(n):
    fit = fit_power_law(_noisy(2.0 * _ranks(n) ** -1.2, seed=4), head=0)
    assert fit.exponent_lo < 1.2 < fit.exponent_hi
    assert fit.exponent_lo < fit.exponent < fit.exponent_hi


def test_bootstrap_interval_narrows_with_more_latents():
    def width(n: int) -> float:
        fit = fit_power_law(_noisy(2.0 * _ranks(n) ** -1.2, seed=5), head=0)
        return fit.exponent_hi - fit.exponent_lo

    assert width(20000) < 0.7 * width(300)
    again = fit_power_law(_noisy(2.0 * _ranks(300) ** -1.2, seed=5), head=0)
    assert again.exponent_hi - again.exponent_lo == width(300)  # seeded: reproducible


def test_too_rare_latents_cut_when_freq_given():
    """Latents fire ~ Poisson(p T) times with p ~ 1/rank and heavy-tailed z^2 per firing: E[z^2] of a latent
    that fired a few times is mostly noise, so the law is recovered only when those latents are cut."""
    n, tokens = 8000, 1_000_000
    g = torch.Generator().manual_seed(6)
    fires = torch.poisson(0.05 / _ranks(n) * tokens, generator=g)
    owner = torch.repeat_interleave(torch.arange(n), fires.long())
    z2 = torch.exp(1.5 * torch.randn(owner.numel(), generator=g, dtype=torch.float64))
    imp = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, z2) / tokens
    fit = fit_power_law(imp, freq=fires / tokens, tokens=tokens, head=0)
    assert fit.n_too_rare == int(((fires > 0) & (fires < 20)).sum()) > 1000
    assert fit.n_fit == int((fires >= 20).sum())
    assert fit.exponent_lo < 1.0 < fit.exponent_hi
    uncut = fit_power_law(imp, head=0)  # without freq only dead latents are dropped
    assert uncut.n_too_rare == 0 and uncut.n_fit == int((fires > 0).sum())
    assert abs(uncut.exponent - 1.0) > 3 * abs(fit.exponent - 1.0)
    with pytest.raises(ValueError, match="freq and tokens together"):
        fit_power_law(imp, freq=fires / tokens)


def test_fit_rank_window_and_errors():
    rank = _ranks(100)
    fit = fit_power_law(rank**-1.0, head=4, max_rank=50)
    assert (fit.n_fit, fit.min_rank, fit.max_rank, fit.dense_head) == (46, 5, 50, 4)
    assert fit.exponent == pytest.approx(1.0, abs=1e-9)
    tiny = fit_power_law(torch.tensor([1.0, 0.5, 0.3, 0.2]), head=0)
    assert tiny.preferred == "undetermined" and tiny.exponent == pytest.approx(1.0, abs=0.2)
    with pytest.raises(ValueError, match="at least 3 live"):
        fit_power_law(torch.tensor([1.0, 0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="non-negative"):
        fit_power_law(torch.tensor([1.0, -0.5, 0.2]))


def test_as_dict_is_flat_and_predict_covers_every_model():
    fit = fit_power_law(_noisy(_ranks(500) ** -1.0, seed=7))
    d = fit.as_dict()
    assert all(isinstance(v, int | float | str) for v in d.values())
    for key in ("exponent", "exponent_lo", "exponent_hi", "r2", "exp_r2", "heldout_mse_power_law",
                "heldout_mse_exponential", "heldout_mse_lognormal", "preferred", "dense_head", "n_too_rare",
                "n_fit", "min_rank", "max_rank", "preferred_power_law"):
        assert key in d, key
    r = torch.tensor([10.0, 100.0])
    for kind in MODELS:
        assert torch.all(fit.predict(r, kind) > 0)
    assert fit.predict(r)[0] / fit.predict(r)[1] == pytest.approx(10**fit.exponent)
    with pytest.raises(ValueError, match="kind must be one of"):
        fit.predict(r, "cubic")


def test_plot_importance_draws_window_bins_and_three_fits(tmp_path):
    imp = torch.cat([torch.full((8,), 50.0), _noisy(_ranks(1000) ** -1.0, seed=8)])
    fit = fit_power_law(imp)
    fig = plot_importance(imp, fit)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert len(ax.get_lines()) == 5 and any("rank bins" in t for t in labels)
    assert sum("held-out MSE" in t for t in labels) == 3
    fig.savefig(tmp_path / "importance.png")
    assert (tmp_path / "importance.png").stat().st_size > 0


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
