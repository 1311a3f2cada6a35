"""SparseAutoencoder: encode/decode semantics, initialisation, and the sparse gradient path vs dense autograd."""

import math

import pytest
import torch
from synthetic import single_thread

from sae.config import SAEConfig
from sae.model import SparseAutoencoder, geometric_median


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def _sae(**kw) -> SparseAutoencoder:
    cfg = SAEConfig(**{"d_in": 16, "n_latents": 64, "k": 4, **kw})
    return SparseAutoencoder.from_config(cfg, seed=0)


def test_init_unit_rows_and_tied_encoder():
    sae = _sae()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert sae.threshold.item() == 0.0 and sae.threshold.dtype == torch.float32
    assert not sae.training  # built for inference; the Trainer switches modes around each step
    assert not torch.equal(_sae().W_dec, SparseAutoencoder(_sae().cfg).W_dec)  # seeded vs random


def test_topk_encode_decode_semantics():
    sae = _sae()
    with torch.no_grad():
        sae.b_enc.normal_()
    x = torch.randn(50, 16) * 4 + 2
    vals, idx = sae.encode(x)
    assert vals.shape == idx.shape == (50, 4) and idx.dtype == torch.long
    assert (vals >= 0).all() and (idx.sort(1).values.diff(dim=1) > 0).all()  # k distinct latents
    z = sae.encode_dense(x)
    assert ((z > 0).sum(1) <= 4).all()
    # the k kept are the largest ReLU pre-activations
    pre = torch.relu((x * sae.cfg.input_scale - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert torch.allclose(z.sum(1), pre.topk(4, dim=1).values.sum(1), atol=1e-5)
    assert torch.allclose(sae.decode(vals, idx), sae.decode_dense(z), atol=1e-5)
    assert torch.allclose(sae(x), sae.decode_dense(z), atol=1e-5)


def test_initialise_from_sample_sets_scale_and_geometric_median():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g) * 7 + 3
    x[:20] += 500.0  # outliers: the median must ignore them, the mean would not
    sae = _sae().initialise_from_sample(x)
    scaled = x * sae.cfg.input_scale
    assert scaled.norm(dim=1).mean().item() == pytest.approx(math.sqrt(16), rel=1e-5)
    assert sae.cfg.input_scale != 1.0 and sae.cfg.d_in == 16  # a new frozen cfg
    med = sae.b_dec.double()
    cost = lambda y: (scaled.double() - y).norm(dim=1).sum()  # noqa: E731
    assert cost(med) < cost(scaled.double().mean(0))
    for _ in range(5):  # a local minimum of the sum of distances
        assert cost(med) <= cost(med + 1e-2 * torch.randn(16, generator=g, dtype=torch.float64))
    assert (med - scaled.double().mean(0)).norm() > 1.0


def test_geometric_median_of_symmetric_points_is_centre():
    pts = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [0.0, 0.0]]) + 5
    assert torch.allclose(geometric_median(pts).float(), torch.tensor([5.0, 5.0]), atol=1e-4)


def test_raw_scale_round_trip():
    """decode returns raw-scale x: the same code decodes to (normalised decode) / input_scale."""
    sae = _sae()
    x = torch.randn(8, 16) * 10
    sae.initialise_from_sample(x)
    vals, idx = sae.encode(x)
    assert torch.allclose(sae.decode(vals, idx) * sae.cfg.input_scale, sae.decode_normalised(vals, idx), atol=1e-4)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_sparse_gradients_match_dense_autograd(architecture):
    """Fast path (dense encoder matmul, sparse decode and sparse W_enc/W_dec grads) == dense autograd reference."""
    torch.manual_seed(0)
    sae = _sae(k=5, architecture=architecture).double().train()  # train mode: BatchTopK's batch rule
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        sae.b_dec.normal_()
    x = torch.randn(24, 16, dtype=torch.float64) * 2
    vals, idx, _, _ = sae.encode_for_training(sae.normalise(x))
    loss = (sae.decode_normalised(vals, idx) - x).pow(2).mean()
    loss.backward()
    fast = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # dense reference, same selected latents
    kept = (vals.detach() > 0).double()  # BatchTopK pads rows with value-0 entries: not part of the code
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx) * kept).relu()
    ref = ((z @ sae.W_dec + sae.b_dec) - x).pow(2).mean()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for name, p in sae.named_parameters():
        assert p.grad.abs().max() > 0, name
        assert torch.allclose(fast[name], p.grad, rtol=1e-9, atol=1e-12), name


def test_remove_parallel_decoder_grad():
    sae = _sae()
    sae.W_dec.grad = torch.randn(64, 16)
    sae.remove_parallel_decoder_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.set_decoder_norm_to_unit()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)


def test_batchtopk_train_keeps_k_times_batch_and_eval_uses_threshold():
    sae = _sae(architecture="batchtopk", k=3)
    with torch.no_grad():
        sae.b_enc.fill_(0.5)
    x = torch.randn(40, 16)
    sae.train()
    vals, idx = sae.encode(x)
    assert (vals > 0).sum().item() == 3 * 40  # exactly k*B over the batch, rows differ
    assert (vals > 0).sum(1).unique().numel() > 1
    sae.update_threshold(vals, momentum=0.9)
    t = sae.threshold.item()
    assert t == pytest.approx(vals[vals > 0].min().item())
    sae.eval()
    vals_e, idx_e = sae.encode(x)
    z = sae.encode_dense(x)
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert torch.equal(z > 0, pre > t)
    assert (vals_e[vals_e > 0] > t).all()


def test_bad_input_shape_raises():
    with pytest.raises(ValueError, match="d_in=16"):
        _sae().encode(torch.randn(4, 15))


def test_evaluating_restores_the_mode_it_found_even_on_error():
    from sae.model import evaluating

    sae = SparseAutoencoder.from_config(SAEConfig(d_in=8, n_latents=16, k=2), seed=0)
    for mode in (True, False):
        sae.train(mode)
        with pytest.raises(RuntimeError), evaluating(sae):
            assert not sae.training
            raise RuntimeError("mid-evaluation")
        assert sae.training is mode
