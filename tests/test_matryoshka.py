"""Matryoshka partitions, the nested prefix loss (vs a dense reference), and prefix quality after training."""

import pytest
import torch
from synthetic import batches, make_planted, single_thread

from sae.config import SAEConfig, TrainConfig
from sae.matryoshka import (
    group_partials,
    matryoshka_loss,
    partition_label,
    prefix_reconstructions,
    resolve_partition,
)
from sae.model import SparseAutoencoder
from sae.train import Trainer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.mark.parametrize(
    ("spec", "n", "expected"),
    [
        (None, 64, None),
        ("none", 64, None),
        ("doubling:4", 64, (8, 16, 32, 64)),
        ("doubling:1", 64, (64,)),
        ({"scheme": "doubling", "smallest": 16}, 64, (16, 32, 64)),
        ({"scheme": "doubling", "smallest": 12}, 64, (12, 24, 48, 64)),
        ("uniform:4", 64, (16, 32, 48, 64)),
        ("fractions:saebench", 1024, (32, 96, 224, 480, 1024)),
        ("fractions:bussmann", 1024, (64, 128, 256, 512, 1024)),
        ({"scheme": "fractions", "fractions": [0.25, 0.75]}, 64, (16, 64)),
        ([8, 32, 64], 64, (8, 32, 64)),
        ("8,32,64", 64, (8, 32, 64)),
    ],
)
def test_resolve_partition(spec, n, expected):
    got = resolve_partition(spec, n)
    assert got == expected
    if got is not None:
        SAEConfig(d_in=8, n_latents=n, k=2, partition=got)  # always a valid config


def test_partition_errors_list_schemes():
    with pytest.raises(ValueError, match="partition.*doubling"):
        resolve_partition("doubling:3", 30)  # 30 not divisible by 4
    with pytest.raises(ValueError, match="end at n_latents"):
        resolve_partition([8, 16], 64)


def test_partition_label():
    assert partition_label(None) == "none"
    assert partition_label("Doubling:4") == "doubling:4"
    assert partition_label([512, 1024, 2048]) == "512,1024,2048"
    assert partition_label({"scheme": "doubling", "smallest": 16}) == "doubling:smallest=16"
    assert partition_label({"scheme": "fractions", "fractions": [0.5, 0.5]}) == "fractions:fractions=[0.5,0.5]"


def _tiny(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(40, 12, generator=g, dtype=torch.float64)
    vals = torch.rand(30, 6, generator=g, dtype=torch.float64)
    vals[0, :3] = 0.0  # inactive entries must not matter
    idx = torch.stack([torch.randperm(40, generator=g)[:6] for _ in range(30)])
    return W, vals, idx


def test_group_partials_and_prefixes_match_dense():
    W, vals, idx = _tiny()
    b = torch.randn(12, dtype=torch.float64)
    part = (5, 10, 20, 40)
    z = torch.zeros(30, 40, dtype=torch.float64).scatter(1, idx, vals)
    P = group_partials(vals, idx, W, part)
    lo = 0
    for g, hi in enumerate(part):
        assert torch.allclose(P[:, g], z[:, lo:hi] @ W[lo:hi])
        lo = hi
    R = prefix_reconstructions(vals, idx, W, b, part)
    for g, m in enumerate(part):
        assert torch.allclose(R[:, g], z[:, :m] @ W[:m] + b)


def test_matryoshka_loss_value_and_gradients_match_dense_autograd():
    W, vals, idx = _tiny(1)
    x = torch.randn(30, 12, dtype=torch.float64)
    part, w = (5, 10, 20, 40), (0.1, 0.2, 0.3, 0.4)
    W1, v1, b1 = W.clone().requires_grad_(), vals.clone().requires_grad_(), torch.zeros(12, dtype=torch.float64)
    b1.requires_grad_()
    loss, recon, per = matryoshka_loss(x, v1, idx, W1, b1, part, w)
    loss.backward()
    W2, v2, b2 = W.clone().requires_grad_(), vals.clone().requires_grad_(), torch.zeros(12, dtype=torch.float64)
    b2.requires_grad_()
    z = torch.zeros(30, 40, dtype=torch.float64).scatter(1, idx, v2)
    ref_per = torch.stack([((z[:, :m] @ W2[:m] + b2) - x).pow(2).mean() for m in part])
    ref = (torch.tensor(w, dtype=torch.float64) * ref_per).sum()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(per, ref_per.detach()) and torch.allclose(recon, z @ W + b1.detach())
    for a, r in ((W1, W2), (v1, v2), (b1, b2)):
        assert r.grad.abs().max() > 0
        assert torch.allclose(a.grad, r.grad, rtol=1e-10, atol=1e-13)


def _prefix_fvu(sae: SparseAutoencoder, x: torch.Tensor, part) -> torch.Tensor:
    sae.eval()
    with torch.no_grad():
        vals, idx = sae.encode(x)
        xn = sae.normalise(x)
        R = prefix_reconstructions(vals, idx, sae.W_dec, sae.b_dec, part)
        return (R - xn[:, None]).pow(2).sum((0, 2)) / (xn - xn.mean(0)).pow(2).sum()


def test_matryoshka_prefixes_order_and_beat_unordered_vanilla():
    data = make_planted(n_features=64, mean_active=3.0)
    part = (8, 16, 32, 64, 128)
    tc = TrainConfig(lr=1e-2, warmup_steps=10, total_tokens=16384 * 5, dead_tokens=4096)
    vanilla = SAEConfig(d_in=32, n_latents=128, k=4)
    matry = vanilla.model_copy(update={"partition": part})
    trainer = Trainer([(vanilla, tc), (matry, tc)])
    trainer.fit(batches(data.x, 256, epochs=5))
    x_eval = make_planted(n_features=64, mean_active=3.0, n_tokens=4096, seed=1).x  # same features, new tokens
    v_fvu = _prefix_fvu(trainer.saes[0], x_eval, part)
    m_fvu = _prefix_fvu(trainer.saes[1], x_eval, part)
    assert (m_fvu.diff() < 0).all(), m_fvu  # every larger prefix reconstructs better
    assert m_fvu[0] < v_fvu[0] - 0.1, (m_fvu, v_fvu)  # the ordered small prefix beats an arbitrary one
    assert m_fvu[-1] < 0.3 and v_fvu[-1] < 0.3  # both are real SAEs at full size
