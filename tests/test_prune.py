"""Ordering, subset pruning and pruning curves, on an SAE trained on planted synthetic data."""

import pytest
import torch
from synthetic import batches, make_planted

from sae.config import SAEConfig, TrainConfig
from sae.importance import LatentStats, fit_power_law, latent_stats
from sae.model import SparseAutoencoder, sparse_decode
from sae.plots import plot_importance, plot_pruning_curves
from sae.prune import (
    RULES,
    nested_masked_residuals,
    nested_reselect_codes,
    order_latents,
    prefix_sae,
    prune_sae,
    pruned_config,
    reduced_code,
)

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


@torch.no_grad()
def _rule_curve(sae, x, order, Gs, rule):
    """[(fvu, l0)] of the reduced SAEs keeping order[:G], scored by `rule` through reduced_code."""
    _, pre = sae.pre_activations(sae.normalise(x))
    vals, idx = sae.select(pre)
    out = []
    for g in Gs:
        v, i = reduced_code(sae, pre, vals, idx, order[:g], rule)
        out.append(_fvu_l0(x, sae.decode(v, i), v))
    return out


def _fvu_l0(x, x_hat, v):
    err = float(((x.double() - x_hat.double()) ** 2).sum())
    var = float(((x.double() - x.double().mean(0)) ** 2).sum())
    return err / var, float((v > 0).sum(1).double().mean())


@pytest.mark.slow
def test_ez2_pruning_beats_random_at_every_G_under_both_rules(trained, tmp_path):
    sae, ev = trained
    x = torch.cat(ev)
    stats = latent_stats(sae, ev)
    for rule in RULES:
        by_ez2 = _rule_curve(sae, x, order_latents(stats, "ez2"), GS, rule)
        by_random = _rule_curve(sae, x, order_latents(stats, "random", seed=0), GS, rule)
        for (f_ez2, _), (f_rand, _) in zip(by_ez2, by_random, strict=True):
            assert f_ez2 < f_rand - 0.03, (rule, by_ez2, by_random)
        assert [f for f, _ in by_ez2] == sorted((f for f, _ in by_ez2), reverse=True)
    fig = plot_pruning_curves({"ez2": [{"G": g, "fvu": f} for g, (f, _) in zip(GS, by_ez2, strict=True)]})
    fig.savefig(tmp_path / "curves.png")
    plot_importance(stats.mean_sq, fit_power_law(stats.mean_sq)).savefig(tmp_path / "importance.png")
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "importance.png").stat().st_size > 0


@pytest.mark.slow
def test_reselect_rule_equals_the_standalone_pruned_sae(trained):
    sae, ev = trained
    x = torch.cat(ev)
    order = order_latents(latent_stats(sae, ev), "ez2")
    Gs = [3, 4, 5, 40, 128]  # G <= k forces k = G - 1
    for (fvu, l0), G in zip(_rule_curve(sae, x, order, Gs, "reselect"), Gs, strict=True):
        small = prune_sae(sae, order[:G])
        assert small.cfg.n_latents == G and small.cfg.k == min(4, G - 1)
        assert (fvu, l0) == pytest.approx(_evaluate(small, x), rel=1e-5)


def test_two_rules_give_the_expected_L0():
    """A known answer: with k = 4 and the full top-4 of every token inside latents 0..3 of 8, keeping latents
    {0, 1} leaves 2 per token under `masked` (L0 = 2) and re-selects min(k, G-1) = 1 under `reselect`; keeping
    {4, 5, 6} gives L0 = 0 (masked: none of the full picks survive) and 2 (reselect picks among 4..6)."""
    cfg = SAEConfig(d_in=8, n_latents=8, k=4)
    sae = SparseAutoencoder.from_config(cfg, seed=0).eval()
    pre = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3, -1.0]]).repeat(5, 1)
    vals, idx = sae.select(pre)
    cases = {(0, 1): (2.0, 1.0), (4, 5, 6): (0.0, 2.0)}
    for keep, (l0_masked, l0_reselect) in cases.items():
        kept = torch.tensor(keep)
        got = {r: float((reduced_code(sae, pre, vals, idx, kept, r)[0] > 0).sum(1).double().mean()) for r in RULES}
        assert got == {"masked": l0_masked, "reselect": l0_reselect}, keep
        v, i = reduced_code(sae, pre, vals, idx, kept, "reselect")
        assert set(i.unique().tolist()) <= set(keep)  # indices stay in the full dictionary's numbering
    with pytest.raises(ValueError, match="rule must be one of"):
        reduced_code(sae, pre, vals, idx, torch.tensor([0, 1]), "median")


def test_batchtopk_rules_agree_under_the_threshold():
    """BatchTopK's inference rule is a per-latent threshold: restricting it to kept latents is the masked code."""
    cfg = SAEConfig(d_in=10, n_latents=40, k=3, architecture="batchtopk")
    sae = SparseAutoencoder.from_config(cfg, seed=2).eval()
    with torch.no_grad():
        sae.b_enc.fill_(-0.3)
        sae.threshold.fill_(0.4)
    x = torch.randn(200, 10, generator=torch.Generator().manual_seed(1))
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    masked = _rule_curve(sae, x, order, [5, 20, 40], "masked")
    reselect = _rule_curve(sae, x, order, [5, 20, 40], "reselect")
    for a, b in zip(masked, reselect, strict=True):
        assert a == pytest.approx(b, rel=1e-6)
    assert reselect[0] == pytest.approx(_evaluate(prune_sae(sae, order[:5]).eval(), x), rel=1e-5)
    assert masked[0][1] < masked[-1][1]


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


def test_nested_reselect_codes_equal_one_search_per_G():
    """The band-by-band search gives each G the code reduced_code finds by searching all of order[:G], G <= k
    included (k becomes G - 1); sets that are not prefixes of one order are refused."""
    cfg = SAEConfig(d_in=16, n_latents=256, k=8)
    sae = SparseAutoencoder.from_config(cfg, seed=3).eval()
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(4))
    order = torch.randperm(256, generator=torch.Generator().manual_seed(5))
    gs = [2, 5, 9, 40, 41, 200, 255]
    with torch.no_grad():
        _, pre = sae.pre_activations(sae.normalise(x))
        vals, idx = sae.select(pre)
        nested = nested_reselect_codes(sae, pre, [order[:g] for g in gs], vals.dtype)
        for g, (v, i) in zip(gs, nested, strict=True):
            ev, ei = reduced_code(sae, pre, vals, idx, order[:g], "reselect")
            assert v.shape == ev.shape == (300, min(8, g - 1))
            dense = [torch.zeros(300, 256).scatter_(1, ii, vv) for vv, ii in ((v, i), (ev, ei))]
            assert torch.equal(dense[0], dense[1]), g
    with pytest.raises(ValueError, match="must extend the one before it"):
        nested_reselect_codes(sae, pre, [order[:9], order[1:20]], vals.dtype)
    with pytest.raises(ValueError, match="must extend the one before it"):
        nested_reselect_codes(sae, pre, [order[:9], order[:9]], vals.dtype)


@pytest.mark.parametrize("fixed_shapes", [False, True])  # the CPU's gathered bands, and an accelerator's in place
def test_nested_masked_residuals_equal_decoding_each_masked_code(fixed_shapes):
    """Band by band from the full residual, each G's masked residual equals x - decode(masked code) to float32
    rounding, for a TopK and a BatchTopK SAE (whose codes carry zero padding); a G = n set's is the full residual,
    and sets that are not prefixes of one order are refused."""
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(4))
    order = torch.randperm(256, generator=torch.Generator().manual_seed(5))
    gs = [1, 5, 9, 40, 41, 200, 256]
    for arch in ("topk", "batchtopk"):
        sae = SparseAutoencoder.from_config(SAEConfig(d_in=16, n_latents=256, k=8, architecture=arch), seed=3).eval()
        with torch.no_grad():
            xc_n, pre = sae.pre_activations(sae.normalise(x))
            vals, idx = sae.select(pre)
            full = xc_n - sparse_decode(vals, idx, sae.W_dec)
            got = nested_masked_residuals(sae.W_dec, full, vals, idx, [order[:g] for g in gs], 256,
                                          fixed_shapes=fixed_shapes)
            for g, residual in zip(gs, got, strict=True):
                v, i = reduced_code(sae, pre, vals, idx, order[:g], "masked")
                expect = xc_n - sparse_decode(v, i, sae.W_dec)
                assert torch.allclose(residual, expect, atol=1e-5), (arch, g)
            assert torch.equal(got[-1], full)
    with pytest.raises(ValueError, match="prefix of one order"):
        nested_masked_residuals(sae.W_dec, full, vals, idx, [order[:9], order[1:40]], 256)
