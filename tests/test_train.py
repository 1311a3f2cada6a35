"""Trainer: feature recovery on planted data, BatchTopK L0, errors, exact resume (through the safetensors + JSON
trainer-state files), multi-SAE streams, AuxK (dense and sparse paths, normalised form), Matryoshka per-prefix
training FVU."""

import copy
import itertools
import threading
import time

import pytest
import torch
from synthetic import batches, best_cosines, make_planted, single_thread

from sae.checkpoint import load_trainer_state, save_trainer_state
from sae.config import SAEConfig, TrainConfig
from sae.model import SparseAutoencoder, geometric_median
from sae.train import (
    AUXK_DENSE_MIN_DENSITY,
    METRIC_NAMES,
    Trainer,
    aux_rows,
    auxk_loss,
    native_bf16,
    prefetched,
    resolve_compute_dtype,
    train_sae,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def planted():
    return make_planted(n_features=64, mean_active=3.0)


def _fvu(sae, x):
    sae.eval()
    with torch.no_grad():
        return ((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


TC = TrainConfig(lr=1e-2, warmup_steps=10, dead_tokens=4096)


def test_topk_recovers_planted_features_and_fvu_falls(planted):
    log = []
    sae = train_sae(SAEConfig(d_in=32, n_latents=128, k=4), TC.model_copy(update={"total_tokens": 16384 * 6}),
                    batches(planted.x, 256, epochs=6), callback=lambda t, m: log.append((t, m[0])), log_every=16)
    cos = best_cosines(planted.features, sae.W_dec.detach())
    assert cos.mean() >= 0.9, cos
    assert log[-1][1]["fvu"] < 0.5 * log[0][1]["fvu"]
    assert [t for t, _ in log] == sorted({t for t, _ in log}) and log[-1][0] == 16384 * 6 // 256 * 256
    assert set(log[0][1]) == {"loss", "mse", "fvu", "l0", "aux_loss", "dead_fraction", "lr"}
    assert log[-1][1]["l0"] <= 4 and not sae.training
    assert torch.allclose(sae.W_dec.detach().norm(dim=1), torch.ones(128), atol=1e-5)
    held_out = make_planted(n_features=64, mean_active=3.0, n_tokens=2048, seed=1).x
    assert _fvu(sae, held_out) < 0.25  # raw in, raw out: the saved scale round-trips


def test_batchtopk_inference_l0_close_to_k(planted):
    k = 4
    # a 192-step run: momentum 0.9 so the EMA is not still lagging the (falling) cut-off when training ends
    tc = TC.model_copy(update={"threshold_momentum": 0.9, "total_tokens": 16384 * 3})
    sae = train_sae(SAEConfig(d_in=32, n_latents=128, k=k, architecture="batchtopk"), tc,
                    batches(planted.x, 256, epochs=3))
    assert sae.threshold.item() > 0
    sae.eval()
    held_out = make_planted(n_features=64, mean_active=3.0, n_tokens=4096, seed=1).x
    vals, _ = sae.encode(held_out)
    l0 = (vals > 0).sum(1).float().mean().item()
    assert abs(l0 - k) <= 0.1 * k, l0
    assert _fvu(sae, held_out) < 0.35


def test_first_batch_sets_input_scale_and_b_dec(planted):
    tc = TrainConfig(lr=1e-9, warmup_steps=0, geometric_median_samples=512)
    trainer = Trainer([(SAEConfig(d_in=32, n_latents=64, k=4), tc), (SAEConfig(d_in=32, n_latents=96, k=8), tc)])
    m = trainer.train_step(planted.x[:1024])[0]
    sae = trainer.saes[0]
    x = planted.x[:1024]  # lr ~ 0: the metrics describe the SAE as it is now
    assert m["fvu"] == pytest.approx(_fvu(sae, x), rel=1e-4)
    assert m["mse"] == pytest.approx(((sae(x) - x) * sae.cfg.input_scale).pow(2).mean().item(), rel=1e-4)
    assert m["l0"] == 4 and m["aux_loss"] == 0 and m["loss"] == pytest.approx(m["mse"])
    sample = planted.x[:512] * sae.cfg.input_scale
    assert sample.norm(dim=1).mean().item() == pytest.approx(32**0.5, rel=1e-5)
    assert torch.allclose(sae.b_dec.detach(), geometric_median(sample).float(), atol=1e-4)
    assert trainer.saes[1].cfg.input_scale == sae.cfg.input_scale
    assert torch.allclose(trainer.saes[1].b_dec.detach(), sae.b_dec.detach(), atol=1e-4)


def test_nan_input_raises_with_step(planted):
    trainer = Trainer([(SAEConfig(d_in=32, n_latents=64, k=4), TC)])
    trainer.train_step(planted.x[:64])
    bad = planted.x[64:128].clone()
    bad[3, 5] = float("nan")
    with pytest.raises(FloatingPointError, match="step 1"):
        trainer.train_step(bad)
    bad[3, 5] = float("inf")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        trainer.train_step(bad)
    with pytest.raises(ValueError, match="d_in=32"):
        trainer.train_step(planted.x[:8, :16])


def test_non_finite_loss_names_the_sae(planted):
    trainer = Trainer([(SAEConfig(d_in=32, n_latents=64, k=4), TC), (SAEConfig(d_in=32, n_latents=96, k=4), TC)])
    trainer.train_step(planted.x[:64])
    with torch.no_grad():
        trainer.saes[1].W_dec[:, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="SAE 1"):
        trainer.train_step(planted.x[64:128])


def test_isolated_failure_stops_only_that_sae_and_survives_resume(planted, tmp_path):
    members = [(SAEConfig(d_in=32, n_latents=64, k=4), TC), (SAEConfig(d_in=32, n_latents=96, k=4), TC)]
    trainer = Trainer(members, isolate_failures=True)
    trainer.train_step(planted.x[:64])
    with torch.no_grad():
        trainer.saes[1].W_dec[:, 0] = float("inf")
    before = _params(trainer)[1].clone()
    out = trainer.train_step(planted.x[64:128])
    assert out[1] == {} and set(out[0]) >= set(METRIC_NAMES)
    assert list(trainer.failures) == [1] and "SAE 1" in trainer.failures[1]
    trainer.train_step(planted.x[128:192])  # SAE 0 goes on; SAE 1 is no longer stepped
    assert trainer.step == 3 and torch.equal(_params(trainer)[1].nan_to_num(), before.nan_to_num())
    resumed = Trainer(members, isolate_failures=True)
    save_trainer_state(trainer.state_dict(), tmp_path)  # the failures dict (int keys) survives the JSON file
    resumed.load_state_dict(load_trainer_state(tmp_path))
    assert resumed.failures == trainer.failures and resumed.train_step(planted.x[:64])[1] == {}
    bad = planted.x[:64].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):  # a bad batch is every member's problem
        resumed.train_step(bad)


def test_parallel_members_equal_sequential(planted):
    members = [(SAEConfig(d_in=32, n_latents=64, k=4), TC),
               (SAEConfig(d_in=32, n_latents=96, k=6, partition=(24, 48, 96)), TC.model_copy(update={"seed": 3})),
               (SAEConfig(d_in=32, n_latents=128, k=4, architecture="batchtopk"), TC)]
    data = list(batches(planted.x[:2048], 128))
    sequential, threaded = Trainer(members), Trainer(members, parallel=2)
    sequential.fit(data)
    threaded.fit(data)
    threaded.close()
    for a, b in zip(_params(sequential), _params(threaded), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="parallel"):
        Trainer(members, parallel=0)


def _params(trainer):
    return [torch.cat([p.detach().flatten() for p in s.parameters()]) for s in trainer.saes]


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_state_dict_resume_is_exact(planted, arch, tmp_path):
    members = [(SAEConfig(d_in=32, n_latents=64, k=4, architecture=arch), TC.model_copy(update={"dead_tokens": 512})),
               (SAEConfig(d_in=32, n_latents=64, k=4, partition=(16, 64)), TC)]
    data = list(batches(planted.x[:4096], 128))
    straight = Trainer(members)
    straight.fit(data)
    first = Trainer(members)
    first.fit(data[:16])
    save_trainer_state(first.state_dict(), tmp_path)  # what a trial checkpoint holds: no pickle
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer.json", "trainer.safetensors"]  # no temp left
    resumed = Trainer(members)
    resumed.load_state_dict(load_trainer_state(tmp_path))
    resumed.fit(data[16:])
    assert resumed.step == straight.step == len(data) and resumed.tokens_seen == straight.tokens_seen
    for a, b in zip(_params(resumed), _params(straight), strict=True):
        assert torch.equal(a, b)
    assert resumed.saes[0].cfg == straight.saes[0].cfg  # input_scale restored
    assert resumed.saes[0].threshold.item() == straight.saes[0].threshold.item()
    assert not torch.equal(_params(first)[0], _params(straight)[0])


def test_several_saes_from_one_stream_equal_training_alone(planted):
    members = [(SAEConfig(d_in=32, n_latents=64, k=4), TC),
               (SAEConfig(d_in=32, n_latents=96, k=6, partition=(24, 48, 96), architecture="batchtopk"),
                TC.model_copy(update={"seed": 3}))]  # also: Matryoshka over the BatchTopK encoder
    reads = []

    def stream():
        for b in batches(planted.x[:2048], 128):
            reads.append(1)
            yield b

    together = Trainer(members)
    together.fit(stream())
    assert len(reads) == 16 and together.step == 16  # each batch read once, fed to both
    for i, member in enumerate(members):
        alone = Trainer([member])
        alone.fit(batches(planted.x[:2048], 128))
        assert torch.equal(_params(alone)[0], _params(together)[i])


def test_lr_schedule_warmup_and_decay(planted):
    tc = TrainConfig(lr=1e-3, warmup_steps=4, total_tokens=64 * 20, decay_fraction=0.5)
    trainer = Trainer([(SAEConfig(d_in=32, n_latents=64, k=4), tc)])
    lrs = [trainer.train_step(b)[0]["lr"] for b in batches(planted.x[: 64 * 20], 64)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4:11] == pytest.approx([1e-3] * 7)
    assert lrs[11:] == pytest.approx([1e-3 * (20 - s) / 10 for s in range(11, 20)])
    assert trainer.train_step(planted.x[:64]) == [{}]  # total_tokens reached: nothing more to train
    ends_at = Trainer([(SAEConfig(d_in=32, n_latents=64, k=4), tc.model_copy(update={"lr_end": 0.1}))])
    tail = [ends_at.train_step(b)[0]["lr"] for b in batches(planted.x[: 64 * 20], 64)][11:]
    assert tail == pytest.approx([1e-3 * (0.1 + 0.9 * (20 - s) / 10) for s in range(11, 20)])
    default = Trainer([(SAEConfig(d_in=32, n_latents=2**16, k=4), TrainConfig(warmup_steps=0))])
    assert default._members[0].base_lr == pytest.approx(1e-4)


def test_auxk_sends_gradient_to_dead_latents_only_when_enabled(planted):
    x = planted.x[:256]
    grads = {}
    for coef in (0.0, 1 / 32):
        trainer = Trainer([(SAEConfig(d_in=32, n_latents=64, k=4),
                            TrainConfig(lr=1e-2, warmup_steps=0, dead_tokens=1000, aux_coef=coef))])
        trainer.train_step(x)
        sae, member = trainer.saes[0], trainer._members[0]
        sae.train()
        fires = torch.zeros(64, dtype=torch.bool)
        fires[sae.encode(x[:8])[1].unique()] = True  # 8 tokens: at most 32 of 64 latents fire
        member.since_fired[:] = 0
        member.since_fired[~fires] = 10_000  # everything the next step will not select is dead
        m = trainer.train_step(x[:8])[0]
        assert m["dead_fraction"] == pytest.approx((~fires).float().mean().item())
        grads[coef] = sae.W_enc.grad[:, ~fires].abs().sum().item()
        if coef > 0:
            assert m["aux_loss"] > 0 and m["loss"] > m["mse"]
    assert (~fires).sum() > 0
    assert grads[0.0] == 0.0 and grads[1 / 32] > 0


def test_dead_fraction_tracks_unused_latents(planted):
    tc = TrainConfig(lr=1e-3, warmup_steps=0, dead_tokens=256, aux_coef=0.0)
    trainer = Trainer([(SAEConfig(d_in=32, n_latents=64, k=2), tc)])
    trainer.train_step(planted.x[:128])
    with torch.no_grad():
        trainer.saes[0].b_enc[:10] = -1e3  # these can never fire again
    for b in batches(planted.x[128:1152], 128):
        m = trainer.train_step(b)[0]
    assert m["dead_fraction"] >= 10 / 64
    assert (trainer._members[0].since_fired[:10] >= 256).all()


def test_bfloat16_compute_matches_float32(planted):
    cfg = SAEConfig(d_in=32, n_latents=128, k=4)
    fvus = []
    for cd in ("float32", "bfloat16"):
        sae = train_sae(cfg, TC.model_copy(update={"compute_dtype": cd}), batches(planted.x, 256, epochs=2))
        assert sae.W_enc.dtype == torch.float32  # fp32 master weights
        fvus.append(_fvu(copy.deepcopy(sae), planted.x[:2048]))
    assert abs(fvus[1] - fvus[0]) < 0.05 * fvus[0] + 0.01, fvus


def test_deferred_finiteness_checks_name_the_step_it_happened_at(planted):
    members = [(SAEConfig(d_in=32, n_latents=64, k=4), TC), (SAEConfig(d_in=32, n_latents=96, k=4), TC)]
    trainer = Trainer(members, isolate_failures=True, finite_check_every=4)  # as on a GPU, here on the CPU
    trainer.train_step(planted.x[:64], sync=False)
    with torch.no_grad():
        trainer.saes[1].W_dec[:, 0] = float("inf")
    trainer.train_step(planted.x[64:128], sync=False)  # step 1 goes bad: nothing is read yet
    trainer.train_step(planted.x[128:192], sync=False)
    assert trainer.failures == {}
    metrics = trainer.train_step(planted.x[192:256], sync=False)  # step 4: the flags are read
    assert isinstance(metrics[0]["fvu"], torch.Tensor)
    assert list(trainer.failures) == [1] and "step 1:" in trainer.failures[1] and "found at step 4" in trainer.failures[1]
    strict = Trainer(members[:1], finite_check_every=8)
    bad = planted.x[:64].clone()
    bad[0, 0] = float("nan")
    strict.train_step(planted.x[:64], sync=False)
    strict.train_step(bad, sync=False)
    with pytest.raises(FloatingPointError, match="step 1: input batch"):  # read at the next synced step
        strict.train_step(planted.x[:64])
    with pytest.raises(ValueError, match="finite_check_every"):
        Trainer(members, finite_check_every=0)


def test_auto_compute_dtype_follows_the_hardware_and_scoring_is_fp32(planted, monkeypatch):
    import sae.train as train_module

    assert resolve_compute_dtype("float32", "cpu") == "float32" and resolve_compute_dtype("bfloat16", "cpu") == "bfloat16"
    assert resolve_compute_dtype("auto", "cpu") == ("bfloat16" if native_bf16("cpu") else "float32")
    for native, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(train_module, "native_bf16", lambda device, native=native: native)
        trainer = Trainer([(SAEConfig(d_in=32, n_latents=64, k=4), TC.model_copy(update={"compute_dtype": "auto"}))])
        assert trainer.compute_dtypes == [want]
        assert trainer.saes[0].compute_dtype == (torch.bfloat16 if native else None)
        trainer.train_step(planted.x[:64])
        (sae,) = trainer.release()
        assert sae.compute_dtype is None and not sae.training  # evaluation encodes in fp32
        assert not train_module._ALLOCATOR_TUNED  # evaluation runs on glibc's own heap settings again


def test_batchtopk_threshold_update_needs_no_host_branch():
    sae = SparseAutoencoder.from_config(SAEConfig(d_in=8, n_latents=16, k=2, architecture="batchtopk"), seed=0)
    sae.update_threshold(torch.zeros(4, 2), 0.9)  # nothing positive: unchanged
    assert sae.threshold.item() == 0.0
    sae.update_threshold(torch.tensor([[0.5, 0.0], [2.0, 0.25]]), 0.9)  # the first update sets it
    assert sae.threshold.item() == 0.25
    sae.update_threshold(torch.tensor([[1.25, 0.0]]), 0.9)
    assert sae.threshold.item() == pytest.approx(0.9 * 0.25 + 0.1 * 1.25)
    sae.update_threshold(torch.zeros(1, 2), 0.9)
    assert sae.threshold.item() == pytest.approx(0.35)


def test_encoder_starts_as_a_scaled_copy_of_the_decoder():
    for norm in (0.3, 1.0):
        trainer = Trainer([(SAEConfig(d_in=32, n_latents=64, k=4), TC.model_copy(update={"encoder_init_norm": norm}))])
        sae = trainer.saes[0]
        assert torch.allclose(sae.W_enc.norm(dim=0), torch.full((64,), norm), atol=1e-5)
        assert torch.allclose(sae.W_enc.t() / norm, sae.W_dec, atol=1e-6)


def test_invalid_members():
    with pytest.raises(ValueError, match="members"):
        Trainer([])
    with pytest.raises(ValueError, match="d_in"):
        Trainer([(SAEConfig(d_in=8, n_latents=16, k=2), TC), (SAEConfig(d_in=9, n_latents=16, k=2), TC)])
    with pytest.raises(ValueError, match="SAEConfig.dtype"):
        Trainer([(SAEConfig(d_in=8, n_latents=16, k=2, dtype="bfloat16"), TC)])


def test_fit_stops_at_max_tokens(planted):
    trainer = Trainer([(SAEConfig(d_in=32, n_latents=64, k=4), TC)])
    calls = []
    trainer.fit(batches(planted.x, 100), max_tokens=1000, callback=lambda t, m: calls.append(t), log_every=3)
    assert trainer.tokens_seen == 1000 and calls == [300, 600, 900, 1000]


def test_auxk_starts_the_step_a_latent_turns_dead(planted):
    """The host-side bound that skips the dead-latent check must never delay AuxK by a step."""
    tc = TrainConfig(lr=1e-3, warmup_steps=0, dead_tokens=512)
    trainer = Trainer([(SAEConfig(d_in=32, n_latents=64, k=4), tc)])
    with torch.no_grad():
        trainer.saes[0].b_enc[:6] = -1e3  # these never fire: dead once 512 tokens have passed
    aux = [trainer.train_step(b)[0]["aux_loss"] for b in batches(planted.x[:128 * 6], 128)]
    assert aux[:4] == [0.0] * 4 and aux[4] > 0 and aux[5] > 0


def _aux_setup(compute_dtype: str):
    cfg = SAEConfig(d_in=32, n_latents=256, k=4)
    sae = Trainer([(cfg, TrainConfig(compute_dtype=compute_dtype))])._members[0].sae  # as the trainer builds it
    x = make_planted(n_features=64, n_tokens=512, seed=3).x
    sae.initialise_from_sample(x)
    x_n = sae.normalise(x)
    with torch.no_grad():
        vals, idx = sae.select(sae.pre_activations(x_n)[1])
        residual = x_n - sae.decode_normalised(vals, idx)
    xc, pre = sae.pre_activations(x_n)
    dead = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:96].sort().values
    return sae, xc, pre.detach(), residual, dead


@pytest.mark.parametrize("normalized", [False, True])
def test_dense_and_sparse_auxk_paths_agree(normalized):
    results = {}
    for dense in (False, True):
        sae, xc, pre, residual, dead = _aux_setup("float32")
        loss = auxk_loss(sae, 24, dead, pre, xc, residual, normalized=normalized, dense=dense)
        loss.backward()
        results[dense] = (loss.item(), {n: p.grad.clone() for n, p in sae.named_parameters()})
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)
    for name, g in results[False][1].items():
        assert torch.allclose(results[True][1][name], g, atol=1e-5, rtol=1e-5), name
        if name != "b_dec":  # only the dead latents' rows / columns get an AuxK gradient
            alive = torch.ones(256, dtype=torch.bool)
            alive[dead] = False
            rows = g if name != "W_enc" else g.t()
            assert rows[alive].abs().max() == 0 and rows[dead].abs().max() > 0, name
    # bf16 compute: the dense path's matmuls run in bf16 (the sparse path stays fp32), so they agree to bf16
    bf = {}
    for dense in (False, True):
        sae, xc, pre, residual, dead = _aux_setup("bfloat16")
        loss = auxk_loss(sae, 24, dead, pre, xc, residual, normalized=normalized, dense=dense)
        loss.backward()
        bf[dense] = (loss.item(), sae.W_enc.grad.clone())
    assert bf[True][0] == pytest.approx(bf[False][0], rel=1e-3)
    assert (bf[True][1] - bf[False][1]).norm() <= 2e-2 * bf[False][1].norm()


def test_density_picks_the_auxk_path():
    sae, xc, pre, residual, dead = _aux_setup("float32")
    # aux_k / n_dead = 24/96 is above AUXK_DENSE_MIN_DENSITY: the default path is the dense one, bit for bit
    assert 24 / 96 >= AUXK_DENSE_MIN_DENSITY > 1 / 96
    for aux_k, dense in ((24, True), (1, False)):
        auto = auxk_loss(sae, aux_k, dead, pre, xc, residual)
        assert torch.equal(auto, auxk_loss(sae, aux_k, dead, pre, xc, residual, dense=dense))


def test_normalized_aux_is_mse_aux_over_residual_variance(planted):
    x = planted.x[:512]
    cfg = SAEConfig(d_in=32, n_latents=128, k=4, partition=(32, 128))
    aux, residual_var = {}, None
    for form in ("mse", "normalized"):
        trainer = Trainer([(cfg, TrainConfig(lr=1e-3, warmup_steps=0, dead_tokens=1000, aux_loss=form))])
        trainer.train_step(planted.x[512:1024])
        sae = trainer.saes[0]
        trainer._members[0].since_fired[64:] = 10_000  # half the latents dead
        with torch.no_grad():  # the residual the next step's AuxK reconstructs (Matryoshka: the whole dictionary's)
            x_n = sae.normalise(x)
            residual = x_n - sae.decode_normalised(*sae.encode(x))
            var = residual.var(dim=0, correction=0).mean().item()
        assert residual_var is None or var == pytest.approx(residual_var, rel=1e-6)
        residual_var = var
        aux[form] = trainer.train_step(x)[0]["aux_loss"]
    assert aux["mse"] > 0 and aux["normalized"] == pytest.approx(aux["mse"] / residual_var, rel=1e-5)


def test_matryoshka_prefix_fvu_metrics(planted):
    part = (8, 32, 128)
    tc = TC.model_copy(update={"total_tokens": 16384 * 3})
    trainer = Trainer([(SAEConfig(d_in=32, n_latents=128, k=4, partition=part), tc),
                       (SAEConfig(d_in=32, n_latents=128, k=4), tc)])
    log = []
    trainer.fit(batches(planted.x, 256, epochs=3), callback=lambda t, m: log.append(m), log_every=16)
    first, last = log[0][0], log[-1][0]
    assert set(last) == set(METRIC_NAMES) | {f"prefix_fvu/{m}" for m in part}
    assert set(log[-1][1]) == set(METRIC_NAMES)  # a vanilla SAE has no prefixes
    for m in (first, last):
        vals = [m[f"prefix_fvu/{b}"] for b in part]
        assert all(0 <= v <= 2 for v in vals), vals
        assert m["prefix_fvu/128"] == pytest.approx(m["fvu"], rel=1e-6)
    assert last["prefix_fvu/8"] >= last["prefix_fvu/32"] >= last["prefix_fvu/128"]  # nested: more latents, less error
    assert last["prefix_fvu/8"] < first["prefix_fvu/8"]  # the innermost prefix learns too


def test_sweep_spec_passes_aux_loss():
    from orchestrator.spec import SweepSpec, TrainSpec

    assert TrainSpec().aux_loss == TrainConfig().aux_loss == "mse"  # one default, TrainConfig's
    with pytest.raises(ValueError, match="aux_loss"):
        TrainSpec(aux_loss="l1")
    spec = SweepSpec(name="aux", train_tokens=4096, eval_tokens=1024, grid={"n_latents": [64], "k": [4]},
                     train={"aux_loss": "normalized"})
    assert spec.train_config(spec.trial_points()[0], "cpu").aux_loss == "normalized"


def test_aux_tokens_window_moves_over_the_batch_and_covers_it():
    assert aux_rows(512, None, 7) == slice(None) and aux_rows(512, 512, 7) == slice(None)
    seen = torch.zeros(512, dtype=torch.int32)
    windows = [aux_rows(512, 128, step) for step in range(8)]
    for w in windows:
        assert w.stop - w.start == 128 and 0 <= w.start and w.stop <= 512
        seen[w] += 1
    assert (seen > 0).all() and len({w.start for w in windows}) > 1


def test_aux_tokens_scores_auxk_on_the_window_only(planted):
    """With aux_tokens, AuxK's loss is the whole-batch AuxK of the window's rows; the main loss is untouched."""
    x = planted.x[:256]
    out = {}
    for aux_tokens in (None, 64):
        tc = TrainConfig(lr=1e-3, warmup_steps=0, dead_tokens=1000, aux_tokens=aux_tokens)
        trainer = Trainer([(SAEConfig(d_in=32, n_latents=128, k=4), tc)])
        trainer.train_step(planted.x[256:512])
        trainer._members[0].since_fired[64:] = 10_000  # half the latents dead
        sae = trainer.saes[0]
        with torch.no_grad():  # what the next step's AuxK sees, computed by hand on the window's rows
            rows = aux_rows(256, aux_tokens, trainer.step)
            x_n = sae.normalise(x)
            xc, pre = sae.pre_activations(x_n)
            residual = x_n - sae.decode_normalised(*sae.encode(x))
            dead = torch.arange(64, 128)
            expected = auxk_loss(sae, trainer._members[0].aux_k, dead, pre[rows], xc[rows], residual[rows]).item()
        out[aux_tokens] = trainer.train_step(x)[0]
        assert out[aux_tokens]["aux_loss"] == pytest.approx(expected, rel=1e-4)
    assert out[64]["aux_loss"] != pytest.approx(out[None]["aux_loss"], rel=1e-4)  # the window is not the batch
    assert out[64]["mse"] == pytest.approx(out[None]["mse"], rel=1e-6)


def test_aux_tokens_must_be_positive():
    with pytest.raises(ValueError, match=r"aux_tokens\n  Input should be greater than or equal to 1"):
        TrainConfig(aux_tokens=0)


def test_prefetched_runs_ahead_in_a_thread_keeps_order_raises_in_place_and_stops_on_close():
    """A GPU trial's feed (orchestrator.trial): the batches come in order, a failure in the producer surfaces at
    the batch it replaced, and a consumer that stops early (a failed step, a finished budget) stops the producer."""
    assert list(prefetched(iter(range(50)), 3)) == list(range(50))
    assert list(prefetched(range(5), 0)) == list(range(5))

    def failing():
        yield 1
        yield 2
        raise ValueError("shard 3 is corrupt")

    got = []
    with pytest.raises(ValueError, match="shard 3 is corrupt"):
        for x in prefetched(failing(), 2):
            got.append(x)
    assert got == [1, 2]

    class Unreadable:
        def __iter__(self):
            raise OSError("store unreachable")

    with pytest.raises(OSError, match="store unreachable"):  # raised here, not a consumer waiting forever
        next(prefetched(Unreadable(), 2))

    produced, closed, producers = [], threading.Event(), set()

    def endless():
        try:
            for i in itertools.count():
                producers.add(threading.get_ident())
                produced.append(i)
                yield i
        finally:
            closed.set()

    it = prefetched(endless(), 2)
    assert next(it) == 0
    deadline = time.monotonic() + 10
    while len(produced) < 4 and time.monotonic() < deadline:  # the producer fills the queue while we wait
        time.sleep(0.01)
    assert len(produced) >= 4 and threading.get_ident() not in producers
    time.sleep(0.1)
    assert len(produced) <= 1 + 2 + 1  # never more than depth ahead (+ one produced item waiting for a slot)
    assert [next(it) for _ in range(3)] == [1, 2, 3]
    it.close()
    assert closed.is_set() and not any(t.name == "prefetch" for t in threading.enumerate())
