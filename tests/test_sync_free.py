"""The sync-free training step (what an accelerator runs: fixed shapes, no host reads between reports) gives the
numbers of the CPU's default step up to float rounding: COO matmuls vs index_add_, AuxK over the dead latents'
indices vs masked over all latents, BatchTopK trimmed vs at full width. Whether it really issues no host sync is
checked on a GPU by benchmarks/cuda_step.py (torch.cuda.set_sync_debug_mode)."""

import pytest
import torch
from synthetic import batches, make_planted, single_thread

from sae.config import SAEConfig, TrainConfig
from sae.model import coo_mm
from sae.train import Trainer, auxk_loss, auxk_loss_masked


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def test_sync_free_coo_mm_equals_the_sparse_matmul():
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 50, (900,), generator=g)
    cols = torch.randint(0, 40, (900,), generator=g)  # repeated (row, col) pairs add up, as in a COO tensor
    vals, dense = torch.randn(900, generator=g), torch.randn(40, 7, generator=g)
    expected = coo_mm(rows, cols, vals, dense, 50)
    assert torch.allclose(coo_mm(rows, cols, vals, dense, 50, sync_free=True), expected, atol=1e-5)
    from sae import model

    chunk, model.COO_MM_CHUNK_ELEMS = model.COO_MM_CHUNK_ELEMS, 7 * 64  # several chunks of 64 entries
    try:
        assert torch.allclose(coo_mm(rows, cols, vals, dense, 50, sync_free=True), expected, atol=1e-5)
    finally:
        model.COO_MM_CHUNK_ELEMS = chunk


def _aux_case(n_dead: int):
    cfg = SAEConfig(d_in=32, n_latents=256, k=4)
    sae = Trainer([(cfg, TrainConfig(compute_dtype="float32"))])._members[0].sae  # the paths differ in bf16 only
    x = make_planted(n_features=64, n_tokens=512, seed=3).x
    sae.initialise_from_sample(x)
    x_n = sae.normalise(x)
    with torch.no_grad():
        residual = x_n - sae.decode_normalised(*sae.select(sae.pre_activations(x_n)[1]))
    xc, pre = sae.pre_activations(x_n)
    dead_idx = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:n_dead].sort().values
    mask = torch.zeros(256, dtype=torch.bool).index_fill_(0, dead_idx, True)
    return sae, xc, pre.detach(), residual, dead_idx, mask


@pytest.mark.parametrize("n_dead", [96, 10])  # more dead latents than aux_k, and fewer
@pytest.mark.parametrize("normalized", [False, True])
def test_masked_auxk_equals_auxk_over_the_dead_indices(n_dead, normalized):
    out = {}
    for masked in (False, True):
        sae, xc, pre, residual, dead_idx, mask = _aux_case(n_dead)
        loss = (auxk_loss_masked(sae, 24, mask, pre, xc, residual, normalized=normalized) if masked
                else auxk_loss(sae, 24, dead_idx, pre, xc, residual, normalized=normalized))
        loss.backward()
        out[masked] = loss.item(), {n: p.grad.clone() for n, p in sae.named_parameters()}
    assert out[True][0] > 0 and out[True][0] == pytest.approx(out[False][0], rel=1e-5)
    for name, grad in out[False][1].items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(out[True][1][name], grad, atol=1e-5, rtol=1e-4), name


def test_masked_auxk_with_no_dead_latent_is_zero_with_zero_gradients():
    sae, xc, pre, residual, _, mask = _aux_case(10)
    loss = auxk_loss_masked(sae, 24, torch.zeros_like(mask), pre, xc, residual)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in sae.parameters())


@pytest.mark.parametrize("cfg", [
    SAEConfig(d_in=32, n_latents=128, k=4),
    SAEConfig(d_in=32, n_latents=128, k=4, architecture="batchtopk"),
    SAEConfig(d_in=32, n_latents=128, k=4, partition=(16, 48, 128)),
], ids=["topk", "batchtopk", "matryoshka"])
def test_sync_free_training_matches_the_default_step(cfg):
    """Ten steps, half the latents held dead from the third on (AuxK runs): the same metrics and weights both ways."""
    x = make_planted(n_features=64, n_tokens=2560).x
    tc = TrainConfig(lr=3e-3, warmup_steps=0, dead_tokens=1000, aux_tokens=128, compute_dtype="float32")
    runs = {}
    for sync_free in (False, True):
        trainer = Trainer([(cfg, tc)], sync_free=sync_free)
        assert trainer.saes[0].sync_free is sync_free
        if sync_free:  # the dead latents' index list is a host read: the sync-free step must not ask for it
            trainer._members[0].dead_latents = lambda: pytest.fail("sync-free step read the dead latents' indices")
        metrics = []
        for step, batch in enumerate(batches(x, 256, epochs=1)):
            if step >= 2:  # kept dead: AuxK runs on every later step
                trainer._members[0].since_fired[64:] = 10_000
            metrics.append(trainer.train_step(batch))
        runs[sync_free] = metrics, trainer.saes[0]
    (base, sae_base), (free, sae_free) = runs[False], runs[True]
    assert all(m[0]["aux_loss"] > 0 for m in base[2:])  # AuxK did run
    for a, b in zip(base, free, strict=True):
        for key, value in a[0].items():
            assert b[0][key] == pytest.approx(value, rel=2e-4, abs=1e-6), key
    for name, p in sae_base.named_parameters():
        assert torch.allclose(dict(sae_free.named_parameters())[name], p, atol=2e-5, rtol=1e-4), name
    assert Trainer([(cfg, tc)]).saes[0].sync_free is False  # a CPU member defaults to the host-read path


def test_sync_free_auxk_stops_once_a_sync_shows_no_latent_dead():
    """The host's bound on the dead counters only grows between syncs; each deferred finiteness read re-reads it,
    so AuxK (masked over all latents, costly) stops running while no latent is actually dead."""
    x = make_planted(n_features=64, n_tokens=2048).x
    tc = TrainConfig(lr=3e-3, warmup_steps=0, dead_tokens=600, compute_dtype="float32")
    trainer = Trainer([(SAEConfig(d_in=32, n_latents=64, k=4), tc)], sync_free=True, finite_check_every=4)
    member = trainer._members[0]
    steps = batches(x, 256, epochs=1)
    for _ in range(3):  # 768 tokens: past dead_tokens, so the bound alone no longer rules dead latents out
        trainer.train_step(next(steps), sync=False)
    assert member.dead_mask() is not None
    trainer.train_step(next(steps), sync=False)  # the 4th step reads the flags, and the counters with them
    assert int(member.since_fired.max()) < tc.dead_tokens  # every latent fired recently
    assert member.dead_mask() is None


def test_the_prepared_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    """benchmarks/cuda_step.py is run on a lent GPU with no time to debug it there: its --quick CPU run must work
    and write every number it promises."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "cuda_step.py"
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "cuda_step.json").read_text())
    training = result["training"]
    feed = training.pop("feed_from_host")
    assert feed["pageable_tokens_per_s"] > 0 and feed["pinned_tokens_per_s"] > 0
    assert set(training) == {"topk_fp32", "topk_bf16", "batchtopk_bf16", "matryoshka_bf16", "topk_dead25_bf16"}
    for row in training.values():
        assert row["sync_free_tokens_per_s"] > 0 and row["host_reads_tokens_per_s"] > 0
        assert row["sync_free_syncs_per_step"] is None  # counted on CUDA only
    assert "aten::topk" in Path(result["profile"]["profile"]).read_text()
    assert set(result["feed_from_store"]) == {"feed_only_tokens_per_s", "step_fed_in_line_tokens_per_s",
                                              "step_fed_prefetched_tokens_per_s"}
    assert all(v > 0 for v in result["feed_from_store"].values())
    checks = result["splice_and_evaluate"]
    assert checks["splice_path"] == "fast"
    assert checks["splice_ce_diff"] < 1e-4 and checks["splice_kl_diff"] < 1e-4
    for kind in ("matryoshka_topk", "batchtopk"):
        row = checks[f"evaluate_{kind}"]
        assert 0 < row["full_fvu"] < 1 and 0 < row["kl_score"] <= 1 and row["syncs"] is None, kind
    speeds = result["splice_speed"]
    assert len(speeds) == 2 and all(v["seconds"] > 0 and v["path"] in ("fast", "full") for v in speeds.values())
