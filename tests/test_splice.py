"""sae/splice.py: the fast path (only the layers after the site) equals the full spliced forward on tiny random
models of each supported family; batched scoring; paired bootstrap intervals over contexts."""

from __future__ import annotations

import math

import pytest
import torch

from sae.lm import OutputHead, find_output_head, splice_metrics, wrap_model
from sae.splice import ContextLosses, SpliceScorer, bootstrap_scores, paired_bootstrap

V, T, N_LAYERS, BATCH = 96, 12, 3, 4


def _config(arch: str):
    from transformers import CohereConfig, Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig

    common = {"vocab_size": V, "initializer_range": 0.2}
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=64, **common)
    if arch == "gemma2":  # a short sliding window, so the alternating layers get different masks
        return Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=4,
                            final_logit_softcapping=2.0, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=N_LAYERS, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0,
                          **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=64, **common)
    if arch == "cohere":  # multiplies its logits by logit_scale: a tail the fast path does not rebuild
        return CohereConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=2,
                            num_key_value_heads=1, max_position_embeddings=64, eos_token_id=0, **common)
    raise ValueError(arch)


def _tiny(arch: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return wrap_model(AutoModelForCausalLM.from_config(_config(arch)), name=f"tiny-{arch}")


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def _noisy(scale: float = 0.1):
    """x * 0.9 + noise, the same noise for the same input shape (so both paths see one reconstruction)."""
    def rec(x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        return x * 0.9 + scale * x.std() * noise
    return rec


def _reference(lm, ids: torch.Tensor, site: str, replace) -> tuple[float, float]:
    """Mean CE and KL over all tokens from the full spliced forward, batch by batch as the scorer cuts them."""
    parts = [splice_metrics(lm, ids[i : i + BATCH], site, replace) for i in range(0, ids.shape[0], BATCH)]
    return (torch.cat([p["ce"] for p in parts]).double().mean().item(),
            torch.cat([p["kl"] for p in parts]).double().mean().item())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run faster on one thread, and do not fight the other test processes for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["llama", "gemma2", "gpt2", "gpt_neox"])
def tiny(request):
    return _tiny(request.param)


@pytest.mark.filterwarnings("ignore:zero-ablating.*does not raise the LM loss")  # random weights: no CE gap needed
@pytest.mark.parametrize("site", ["resid_post.0", "resid_pre.1", f"resid_post.{N_LAYERS - 1}", "mlp_out.1"])
def test_fast_path_equals_full_forward(tiny, site):
    ids = _ids(10)
    scorer = SpliceScorer(tiny, ids, site, batch_size=BATCH, n_boot=50)
    assert scorer.path == ("full" if site.startswith("mlp_out") else "fast"), scorer.fallback_reason
    assert scorer.ce_clean == pytest.approx(_reference(tiny, ids, site, None)[0], abs=1e-5)
    ce_zero, kl_zero = _reference(tiny, ids, site, "zero")
    assert (scorer.ce_zero, scorer.kl_zero) == pytest.approx((ce_zero, kl_zero), abs=1e-5)
    got = scorer(_noisy())
    ce, kl = _reference(tiny, ids, site, _noisy())
    assert kl > 1e-4 and abs(ce - scorer.ce_clean) > 1e-4  # the reconstruction is not trivially the clean run
    assert (got["ce_sae"], got["kl_sae"]) == pytest.approx((ce, kl), abs=1e-5)


def test_wrap_model_and_output_head():
    lm = _tiny("gemma2")
    assert (lm.n_layers, lm.d_model, lm.dtype, lm.device.type) == (N_LAYERS, 32, torch.float32, "cpu")
    head = find_output_head(lm)
    assert head.norm is lm.model.model.norm and head.softcap == 2.0
    h = head.norm(torch.randn(5, 32, generator=torch.Generator().manual_seed(0)) * 10)
    uncapped = OutputHead(head.norm, head.unembed, None).logits(h)
    assert uncapped.abs().max() > 2.0 and head.logits(h).abs().max() < 2.0  # the cap is active in this config


def test_unrebuildable_tail_falls_back_to_full_forward():
    lm = _tiny("cohere")
    ids = _ids(6)
    with pytest.warns(UserWarning, match="full forward per reconstruction"):
        scorer = SpliceScorer(lm, ids, "resid_post.0", batch_size=BATCH, n_boot=50)
    assert scorer.path == "full" and "does not reproduce" in scorer.fallback_reason
    got = scorer(_noisy())
    assert (got["ce_sae"], got["kl_sae"]) == pytest.approx(_reference(lm, ids, "resid_post.0", _noisy()), abs=1e-5)


@pytest.mark.filterwarnings("ignore:zero-ablating.*does not raise the LM loss")
@pytest.mark.parametrize("arch", ["trained-llama", "gpt2"])
def test_score_many_equals_one_by_one(arch, request):
    lm = request.getfixturevalue("trained") if arch == "trained-llama" else _tiny(arch)
    ids = _counting(10, seed=8)
    # two reconstructions per stacked forward, so three of them need two groups per batch
    scorer = SpliceScorer(lm, ids, "resid_post.0", batch_size=BATCH, max_batch_tokens=2 * BATCH * T, n_boot=100)
    recs = [_noisy(0.1), _noisy(1.0), torch.zeros_like]
    many = scorer.score_many(recs)
    assert len(many) == 3 and scorer.last is not None
    for rec, got in zip(recs, many, strict=True):
        one = scorer(rec)
        assert set(got) == {"ce_sae", "kl_sae", "ce_score", "kl_score", "ce_score_lo", "ce_score_hi",
                            "kl_score_lo", "kl_score_hi"}
        for key, value in one.items():
            assert got[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key


def _trained_llama(steps: int = 60):
    """A tiny Llama taught `next = token + 1 (mod V)` with 20% random tokens, so the clean loss is well below the
    zero-ablated one and per-context losses vary: what makes a CE score and its interval meaningful."""
    lm = _tiny("llama")
    model = lm.model.train().requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for step in range(steps):
        ids = _counting(32, seed=100 + step)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return wrap_model(model, name="tiny-llama-counting")


def _counting(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, V, (n, 1), generator=gen) + torch.arange(T)) % V
    noise = torch.rand(n, T, generator=gen) < 0.2
    return torch.where(noise, torch.randint(0, V, (n, T), generator=gen), ids)


@pytest.fixture(scope="module")
def trained():
    return _trained_llama()


def test_bootstrap_interval_contains_estimate_and_shrinks(trained):
    widths = {}
    for n in (8, 64):
        scorer = SpliceScorer(trained, _counting(n, seed=5), "resid_post.0", batch_size=16, n_boot=400)
        assert scorer.ce_zero > scorer.ce_clean + 0.5, (scorer.ce_clean, scorer.ce_zero)
        got = scorer(_noisy(0.5))
        for name in ("ce_score", "kl_score"):
            assert got[f"{name}_lo"] < got[name] < got[f"{name}_hi"], (n, name, got)
        assert 0.0 < got["ce_score"] < 1.0
        widths[n] = got["ce_score_hi"] - got["ce_score_lo"]
        assert scorer(_noisy(0.5)) == got  # fixed seed: the same interval every call
    assert widths[64] < 0.6 * widths[8], widths


def test_paired_difference(trained):
    scorer = SpliceScorer(trained, _counting(32, seed=6), "resid_post.0", batch_size=16, n_boot=400)
    same = scorer.paired_difference(_noisy(0.5), _noisy(0.5))
    assert same == {"ce_score_diff": 0.0, "ce_score_diff_lo": 0.0, "ce_score_diff_hi": 0.0,
                    "kl_score_diff": 0.0, "kl_score_diff_lo": 0.0, "kl_score_diff_hi": 0.0}
    better, worse = scorer(_noisy(0.2)), scorer(_noisy(1.5))
    diff = scorer.paired_difference(_noisy(0.2), _noisy(1.5))
    assert diff["ce_score_diff"] == pytest.approx(better["ce_score"] - worse["ce_score"], abs=1e-9)
    assert 0.0 < diff["ce_score_diff_lo"] < diff["ce_score_diff"] < diff["ce_score_diff_hi"]
    assert 0.0 < diff["kl_score_diff_lo"] < diff["kl_score_diff"]


def test_bootstrap_helpers_on_known_losses():
    """Per-context losses with a known ratio: clean 1, zero 3, SAE 1.5 +- noise -> ce_score near 0.75."""
    gen = torch.Generator().manual_seed(0)
    n = 200
    clean = ContextLosses(ce=1.0 + 0.1 * torch.rand(n, generator=gen, dtype=torch.float64),
                          kl=torch.zeros(n, dtype=torch.float64))
    zero = ContextLosses(ce=clean.ce + 2.0, kl=torch.full((n,), 2.0, dtype=torch.float64))
    run = ContextLosses(ce=clean.ce + 0.5 + 0.2 * torch.randn(n, generator=gen, dtype=torch.float64),
                        kl=0.5 + 0.1 * torch.rand(n, generator=gen, dtype=torch.float64))
    got = bootstrap_scores(run, clean, zero, n_boot=500, seed=3)
    assert got["ce_score_lo"] < got["ce_score"] < got["ce_score_hi"]
    assert 0.72 < got["ce_score_lo"] and got["ce_score_hi"] < 0.78
    assert bootstrap_scores(run, clean, zero, n_boot=500, seed=3) == got
    flat = ContextLosses(ce=clean.ce, kl=zero.kl)  # no CE gap: scores and bounds are NaN, not a crash
    assert math.isnan(bootstrap_scores(run, clean, flat, n_boot=50)["ce_score_hi"])
    d = paired_bootstrap(run, clean, clean, zero, n_boot=200)
    assert d["ce_score_diff"] == pytest.approx(got["ce_score"] - 1.0)


@pytest.mark.filterwarnings("ignore:zero-ablating.*does not raise the LM loss")
def test_bad_inputs(tiny):
    scorer = SpliceScorer(tiny, _ids(4), "resid_post.0", n_boot=10)
    with pytest.raises(ValueError, match=r"reconstructs\[0\] must be a callable"):
        scorer.score_many(["ones"])
    with pytest.raises(ValueError, match="n_boot must be >= 1"):
        SpliceScorer(tiny, _ids(4), "resid_post.0", n_boot=0)
    with pytest.raises(ValueError, match=r"input_ids must be \[N, T\]"):
        SpliceScorer(tiny, torch.ones(4, dtype=torch.long), "resid_post.0")
