"""sae/lm.py on the embedded SmolLM2-135M (real weights) and on tiny random GPT-2 / GPT-NeoX / Gemma-2 models."""

from __future__ import annotations

import math

import pytest
import torch

from sae.assets import file_sha256
from sae.corpus import load_corpus, tokenize_contexts
from sae.lm import (
    describe_model,
    harvest_activations,
    load_lm,
    parse_site,
    resolve_revision,
    splice_metrics,
)
from sae.splice import SpliceScorer


@pytest.fixture(scope="module")
def lm():
    return load_lm("smollm2-135m")


@pytest.fixture(scope="module")
def contexts(lm):
    ds = load_corpus("wiki-extracts")
    return tokenize_contexts(ds, lm.tokenizer, context_length=64, max_tokens=63 * 4, split="eval").input_ids


def test_embedded_model_identity(lm):
    assert (lm.n_layers, lm.d_model) == (30, 576)
    assert lm.revision.startswith("sha256:") and len(lm.revision) == 7 + 64
    assert resolve_revision("smollm2-135m") == lm.revision
    info = describe_model("smollm2-135m")
    assert (info.n_layers, info.d_model, info.revision) == (30, 576, lm.revision)


def test_file_hash_is_cached(tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"abc")
    assert file_sha256(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    from sae.assets import _sha256_cached

    hits = _sha256_cached.cache_info().hits
    file_sha256(p)
    assert _sha256_cached.cache_info().hits == hits + 1


def test_resid_post_equals_hidden_states(lm, contexts):
    ids = contexts[:2]
    hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in (0, 15, 28):  # hidden_states[-1] is after the final norm, so the last layer is not comparable
        got = harvest_activations(lm, ids, f"resid_post.{layer}")
        torch.testing.assert_close(got, hs[layer + 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(harvest_activations(lm, ids, "resid_pre.15"), hs[15], rtol=1e-5, atol=1e-5)


def test_harvest_runs_no_later_layer(lm, contexts):
    calls = {"later": 0, "head": 0}
    hooks = [lm.layers[16].register_forward_hook(lambda *a: calls.__setitem__("later", calls["later"] + 1)),
             lm.model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))]
    try:
        harvest_activations(lm, contexts[:1], "resid_post.15")
        harvest_activations(lm, contexts[:1], "mlp_out.15")
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"later": 0, "head": 0}


def test_perplexity_and_splice_scores(lm, contexts):
    clean = splice_metrics(lm, contexts, "resid_post.15", None)
    ppl = math.exp(clean["ce"].mean().item())
    assert 1.0 < ppl < 50.0, ppl
    assert clean["kl"].abs().max().item() == 0.0
    scorer = SpliceScorer(lm, contexts, "resid_post.15")
    assert scorer.path == "fast", scorer.fallback_reason  # only layers 16.. rerun per reconstruction
    ident = scorer(lambda x: x)
    assert ident["ce_score"] == pytest.approx(1.0, abs=1e-6)
    assert ident["kl_score"] == pytest.approx(1.0, abs=1e-6)
    assert (ident["ce_score_lo"], ident["ce_score_hi"]) == pytest.approx((1.0, 1.0), abs=1e-6)
    zero = scorer(torch.zeros_like)
    assert zero["ce_score"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl_score"] == pytest.approx(0.0, abs=1e-6)
    assert scorer.ce_zero > scorer.ce_clean + 1.0

    def noisy(x: torch.Tensor) -> torch.Tensor:  # a lossy reconstruction lies in between
        return x + 0.5 * x.std() * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))

    got = scorer(noisy)
    assert 0.0 < got["ce_score"] < 1.0 and got["kl_sae"] > 0
    assert got["ce_score_lo"] < got["ce_score"] < got["ce_score_hi"]
    full = SpliceScorer(lm, contexts, "resid_post.15", fast=False)(noisy)  # the full spliced forward agrees
    assert (full["ce_sae"], full["kl_sae"]) == pytest.approx((got["ce_sae"], got["kl_sae"]), abs=1e-5)


def test_splice_keeps_bos(lm, contexts):
    seen = []
    clean_logits = lm.model(input_ids=contexts[:1]).logits
    clean = splice_metrics(lm, contexts[:1], "resid_post.3", None, clean_logits=clean_logits)
    noisy = splice_metrics(lm, contexts[:1], "resid_post.3", lambda x: seen.append(x.shape) or x * 0 + 5.0,
                           clean_logits=clean_logits)
    assert seen == [(contexts.shape[1] - 1, lm.d_model)]  # every position but BOS, flattened
    torch.testing.assert_close(noisy["ce"][:, 0], clean["ce"][:, 0])  # BOS position predicts from clean state
    assert (noisy["ce"][:, 1:] - clean["ce"][:, 1:]).abs().mean() > 0.1


def test_bad_inputs(lm):
    with pytest.raises(ValueError, match=r"resid_mid.3.*valid sites.*resid_post.*0\.\.29"):
        parse_site("resid_mid.3", lm)
    with pytest.raises(ValueError, match=r"out of range.*30 layers"):
        parse_site("resid_post.30", lm)
    with pytest.raises(ValueError, match="not a known site"):
        harvest_activations(lm, torch.ones(1, 4, dtype=torch.long), "resid_post")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_lm("smollm2-135m", dtype="float64")
    with pytest.raises(ValueError, match="does not exist"):
        load_lm("/nonexistent/model.gguf")
    with pytest.raises(ValueError, match="replace must be"):
        splice_metrics(lm, torch.ones(1, 4, dtype=torch.long), "resid_post.0", "ones")


def _tiny(arch: str):
    from transformers import Gemma2Config, GPT2Config, GPTNeoXConfig

    v = 49152
    if arch == "gpt2":
        return GPT2Config(vocab_size=v, n_embd=32, n_layer=3, n_head=2, n_positions=64)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=v, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=64)
    return Gemma2Config(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "gemma2"])
def test_sites_found_for_other_layouts(arch, lm, tmp_path):
    """Random-weight models of each layout (built locally, no hub): sites land where they should, i.e.
    resid_post - resid_pre = attn_out + mlp_out, and resid_post.L = hidden_states[L + 1]."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_tiny(arch)).save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    tiny = load_lm(str(tmp_path))
    assert tiny.n_layers == 3 and tiny.revision.startswith("sha256:")
    ids = torch.randint(3, 1000, (2, 12))
    hs = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in range(2):
        torch.testing.assert_close(harvest_activations(tiny, ids, f"resid_post.{layer}"), hs[layer + 1])
    got = {k: harvest_activations(tiny, ids, f"{k}.1") for k in ("resid_pre", "resid_post", "attn_out", "mlp_out")}
    torch.testing.assert_close(got["resid_post"] - got["resid_pre"], got["attn_out"] + got["mlp_out"],
                               rtol=1e-4, atol=1e-5)
    spliced = splice_metrics(tiny, ids, "resid_post.1", lambda x: x)  # identity splice = the clean run
    assert spliced["kl"].abs().max().item() < 1e-6
