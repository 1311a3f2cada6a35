"""Ordering, subset pruning and pruning curves, on an SAE trained on planted synthetic data."""

import pytest
import torch
from synthetic import batches, make_planted

from sae.config import SAEConfig, TrainConfig
from sae.importance import LatentStats, fit_power_law, latent_stats
from sae.model import SparseAutoencoder
from sae.plots import plot_importance, plot_pruning_curves
from sae.prune import order_latents, prefix_sae, prune_sae, pruned_config, pruning_curve

GS = [8, 16, 32, 64]


@torch.no_grad()
def _evaluate(small, x):
    """FVU and L0 of a standalone SAE on x, by its own encode/decode."""
    v, i = small.encode(x)
    x_hat = small.decode(v, i)
    err = float(((x.double() - x_hat.double()) ** 2).sum())
    var = float(((x.double() - x.double().mean(0)) ** 2).sum())
    return err / var, float((v > 0).sum(1).double().mean())


@pytest.fixture(scope="module")
def trained():
    """A TopK SAE (n=128, k=4) on planted data with 96 features; a held-out eval split of the same data."""
    p = make_planted(d=32, n_features=96, n_tokens=8192 + 4096, seed=0)
    train, ev = p.x[:8192], p.x[8192:]
    cfg = SAEConfig(d_in=32, n_latents=128, k=4)
    tc = TrainConfig(lr=1e-2, warmup_steps=10, seed=0, dead_tokens=4096)
    from sae.train import train_sae

    sae = train_sae(cfg, tc, batches(train, 256, epochs=2, seed=0)).eval()
    return sae, [ev[i : i + 1024] for i in range(0, 4096, 1024)]


@pytest.mark.slow
def test_ez2_pruning_beats_random_at_every_G(trained, tmp_path):
    sae, ev = trained
    stats = latent_stats(sae, ev)
    curves = {m: pruning_curve(sae, lambda: iter(ev), GS, order_latents(stats, m, seed=0)) for m in ("ez2", "random")}
    for by_ez2, by_random in zip(curves["ez2"], curves["random"], strict=True):
        assert by_ez2["G"] == by_random["G"]
        assert by_ez2["fvu"] < by_random["fvu"] - 0.03, (by_ez2, by_random)
    assert [r["fvu"] for r in curves["ez2"]] == sorted((r["fvu"] for r in curves["ez2"]), reverse=True)
    assert all(r["l0"] <= r["k"] == 4 for r in curves["ez2"])
    fig = plot_pruning_curves(curves)
    fig.savefig(tmp_path / "curves.png")
    plot_importance(stats.mean_sq, fit_power_law(stats.mean_sq)).savefig(tmp_path / "importance.png")
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "importance.png").stat().st_size > 0


@pytest.mark.slow
def test_fast_curve_equals_evaluating_each_pruned_sae(trained):
    sae, ev = trained
    order = order_latents(latent_stats(sae, ev), "ez2")
    Gs = [3, 4, 5, 40, 128]  # G <= k forces k = G - 1
    fast = pruning_curve(sae, ev, Gs, order)
    x = torch.cat(ev)
    for row, G in zip(fast, Gs, strict=True):
        small = prune_sae(sae, order[:G])
        assert small.cfg.n_latents == G and small.cfg.k == row["k"] == min(4, G - 1)
        fvu, l0 = _evaluate(small, x)
        assert row["fvu"] == pytest.approx(fvu, rel=1e-5) and row["l0"] == pytest.approx(l0, rel=1e-9)


def test_batchtopk_curve_uses_threshold_rule():
    cfg = SAEConfig(d_in=10, n_latents=40, k=3, architecture="batchtopk")
    sae = SparseAutoencoder.from_config(cfg, seed=2)
    with torch.no_grad():
        sae.b_enc.fill_(-0.3)
        sae.threshold.fill_(0.4)
    x = torch.randn(200, 10, generator=torch.Generator().manual_seed(1))
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    rows = pruning_curve(sae.train(), [x[:120], x[120:]], [5, 20, 40], order)
    assert sae.training  # mode restored
    for row in rows:
        fvu, l0 = _evaluate(prune_sae(sae, order[: row["G"]]).eval(), x)
        assert row["fvu"] == pytest.approx(fvu, rel=1e-5) and row["l0"] == pytest.approx(l0, rel=1e-9)
    assert rows[0]["l0"] < rows[-1]["l0"]


def test_pruned_topk_competes_among_kept_latents_only():
    cfg = SAEConfig(d_in=10, n_latents=30, k=3)
    sae = SparseAutoencoder.from_config(cfg, seed=0).eval()
    x = torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([29, 3, 17, 8, 0, 22, 11])
    small = prune_sae(sae, keep)
    v, i = small.encode(x)
    assert int(i.max()) < 7
    pre = sae.pre_activations(sae.normalise(x))[1][:, keep]  # the kept latents' pre-activations
    want = pre.topk(3, dim=1).values.clamp_min(0)
    torch.testing.assert_close(v.sort(1, descending=True).values, want)
    torch.testing.assert_close(small.W_dec, sae.W_dec[keep])  # rows kept, in keep's order
    torch.testing.assert_close(small.W_enc, sae.W_enc[:, keep])
    assert torch.equal(small.b_dec, sae.b_dec) and small.cfg.input_scale == sae.cfg.input_scale
    with pytest.raises(ValueError, match="repeat"):
        prune_sae(sae, torch.tensor([1, 1, 2]))
    with pytest.raises(ValueError, match="at least 2"):
        prune_sae(sae, torch.tensor([4]))


def test_partition_kept_only_for_prefixes():
    cfg = SAEConfig(d_in=8, n_latents=64, k=4, partition=(8, 16, 32, 64), group_weights=(1.0, 2.0, 3.0, 4.0))
    sae = SparseAutoencoder.from_config(cfg, seed=0)
    p = prefix_sae(sae, 24)
    assert p.cfg.partition == (8, 16, 24) and p.cfg.group_weights == (1.0, 2.0, 3.0)
    assert prefix_sae(sae, 32).cfg.partition == (8, 16, 32)
    assert prefix_sae(sae, 8).cfg.partition is None  # one group left: an ordinary SAE
    assert pruned_config(cfg, torch.tensor([5, 0, 1, 2, 3, 4])).partition is None


def test_order_latents():
    stats = LatentStats(
        mean_sq=torch.tensor([0.1, 0.9, 0.0, 0.5, 0.3], dtype=torch.float64),
        freq=torch.tensor([0.2, 0.1, 0.0, 0.2, 0.4], dtype=torch.float64),
        tokens=100,
    )
    assert order_latents(stats, "ez2").tolist() == [1, 3, 4, 0, 2]
    assert order_latents(stats, "freq").tolist() == [4, 3, 0, 1, 2]  # tie at 0.2 broken by E[z^2]
    assert order_latents(stats, "prefix").tolist() == [0, 1, 2, 3, 4]
    r = order_latents(5, "random", seed=3)
    assert torch.equal(r, order_latents(stats, "random", seed=3)) and sorted(r.tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="measure must be one of"):
        order_latents(stats, "magnitude")
