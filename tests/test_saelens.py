"""SAELens export: the v6 on-disk format (file, tensor and cfg names SAELens reads), the input scale folded so raw
activations map to the same codes and raw reconstructions (checked against SAELens's TopK / JumpReLU forward,
re-implemented here in a few lines), and, where sae-lens is installed, `SAE.load_from_disk` on the export."""

import json

import pytest
import torch
from safetensors import safe_open

from sae.checkpoint import load_sae, save_sae
from sae.config import SAEConfig
from sae.model import SparseAutoencoder
from sae.saelens import CONFIG_FILE, WEIGHTS_FILE, hook_for_site, save_saelens

D, N, K = 12, 48, 5
RAW_SCALE = 37.0  # raw activations far from norm sqrt(d): a missing or inverted fold cannot pass
KINDS = {"topk": ("topk", None), "batchtopk": ("batchtopk", None), "matryoshka_topk": ("topk", (8, 24, 48)),
         "matryoshka_batchtopk": ("batchtopk", (12, 48))}
# The cfg.json keys sae-lens 6.54.12 reads: SAE.load_from_disk -> handle_config_defaulting (metadata.sae_lens_version
# >= 6 skips the legacy converter) -> SAEConfig.from_dict, whose `architecture` picks the config dataclass and keeps
# its fields (saes/sae.py SAEConfig; saes/topk_sae.py TopKSAEConfig adds k, rescale_acts_by_decoder_norm).
SAELENS_BASE_FIELDS = {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                       "normalize_activations", "reshape_activations", "metadata"}
SAELENS_V6_FIELDS = {"topk": SAELENS_BASE_FIELDS | {"k", "rescale_acts_by_decoder_norm"},
                     "jumprelu": SAELENS_BASE_FIELDS}
# metadata SAELens itself reads (HookedSAETransformer, the activation store, evals), beyond the version
SAELENS_METADATA = {"sae_lens_version", "model_name", "hook_name", "hook_head_index", "context_size", "prepend_bos",
                    "dataset_path", "seqpos_slice"}


def _sae(kind: str, seed: int = 0) -> SparseAutoencoder:
    arch, partition = KINDS[kind]
    sae = SparseAutoencoder.from_config(SAEConfig(d_in=D, n_latents=N, k=K, architecture=arch, partition=partition),
                                        seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.initialise_from_sample(torch.randn(256, D, generator=g) * RAW_SCALE + 3.0)
        sae.b_enc.normal_(0, 0.3, generator=g)
        sae.W_enc.add_(torch.randn(D, N, generator=g) * 0.2)
        sae.threshold.fill_(0.4)
    assert abs(sae.cfg.input_scale - 1.0) > 0.9
    return sae


def _raw(seed: int = 5, rows: int = 64) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed)) * RAW_SCALE + 3.0


def _export(sae, path, **kw):
    return save_saelens(sae, path, model_name="smollm2-135m", hook_name="blocks.3.hook_resid_post", hook_layer=3,
                        context_size=128, dataset="wiki-extracts", **kw)


def read_saelens(path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = json.loads((path / CONFIG_FILE).read_text())
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        return cfg, {k: f.get_tensor(k) for k in f.keys()}


def saelens_forward(cfg: dict, w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens v6 TopKSAE / JumpReLUSAE encode + decode (normalize_activations 'none', no decoder-norm rescale)."""
    x = x.to(w["W_enc"].dtype)
    pre = (x - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        vals, idx = pre.topk(cfg["k"], dim=-1, sorted=False)
        z = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    else:
        z = pre.relu() * (pre > w["threshold"]).to(pre.dtype)
    return z, z @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_format_is_saelens_v6(tmp_path, kind):
    sae = _sae(kind)
    path = _export(sae, tmp_path / "sae_lens")
    assert sorted(p.name for p in path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg, w = read_saelens(path)
    arch = "topk" if sae.cfg.architecture == "topk" else "jumprelu"
    shapes = {"W_enc": (D, N), "W_dec": (N, D), "b_enc": (N,), "b_dec": (D,)}
    if arch == "jumprelu":
        shapes["threshold"] = (N,)
    assert {k: tuple(t.shape) for k, t in w.items()} == shapes  # load_state_dict is strict: no extra tensors
    assert all(t.dtype == torch.float32 for t in w.values())
    assert set(cfg) == SAELENS_V6_FIELDS[arch] and SAELENS_METADATA <= set(cfg["metadata"])
    assert cfg["architecture"] == arch and cfg["d_in"] == D and cfg["d_sae"] == N
    assert cfg["dtype"] == "float32" and cfg["device"] == "cpu"
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["reshape_activations"] == "none"
    if arch == "topk":
        assert cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
    else:
        assert "k" not in cfg and torch.all(w["threshold"] == 0.4)
    meta = cfg["metadata"]
    assert meta["sae_lens_version"].split(".")[0] == "6"  # below 6.0 SAELens applies its legacy converter
    assert meta["model_name"] == "smollm2-135m" and meta["hook_name"] == "blocks.3.hook_resid_post"
    assert meta["hook_layer"] == 3 and meta["context_size"] == 128 and meta["dataset_path"] == "wiki-extracts"
    assert meta["seqpos_slice"] == [1, None] and meta["prepend_bos"] is True
    assert meta["training_architecture"] == sae.cfg.architecture and meta["k"] == K
    assert meta.get("matryoshka_widths") == (list(sae.cfg.partition) if sae.cfg.is_matryoshka else None)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_raw_activations_give_our_codes_and_reconstructions(tmp_path, kind):
    sae = _sae(kind)
    cfg, w = read_saelens(_export(sae, tmp_path / "sae_lens"))
    x = _raw()
    z, x_hat = saelens_forward(cfg, w, x)
    ours = sae.encode_dense(x)
    assert torch.equal(z != 0, ours != 0)  # the same latents fire
    torch.testing.assert_close(z, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_hat, sae(x), rtol=1e-4, atol=1e-3 * RAW_SCALE)
    torch.testing.assert_close(z @ w["W_dec"] + w["b_dec"], sae.decode_dense(ours), rtol=1e-4, atol=1e-3 * RAW_SCALE)


def test_batchtopk_threshold_below_zero_exports_as_relu(tmp_path):
    sae = _sae("batchtopk")
    with torch.no_grad():
        sae.threshold.fill_(-1.0)  # never updated / negative: our rule keeps every positive pre-activation
    cfg, w = read_saelens(_export(sae, tmp_path / "sae_lens"))
    assert torch.all(w["threshold"] == 0)
    z, _ = saelens_forward(cfg, w, _raw())
    torch.testing.assert_close(z, sae.encode_dense(_raw()), rtol=1e-4, atol=1e-4)


def test_dtype_overwrite_and_checkpoint_round_trip(tmp_path):
    sae = _sae("topk")
    path = _export(sae, tmp_path / "sae_lens", dtype="bfloat16")
    cfg, w = read_saelens(path)
    assert cfg["dtype"] == "bfloat16" and all(t.dtype == torch.bfloat16 for t in w.values())
    _export(_sae("topk", seed=3), path)  # replaced in place, no temporary directories left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae_lens"]
    assert read_saelens(path)[0]["dtype"] == "float32"
    reloaded = load_sae(save_sae(sae, tmp_path / "sae"))  # exporting a loaded checkpoint gives the same export
    again = read_saelens(_export(reloaded, tmp_path / "again"))[1]
    assert all(torch.equal(t, read_saelens(_export(sae, path))[1][k]) for k, t in again.items())
    with pytest.raises(ValueError, match="dtype must be one of"):
        _export(sae, tmp_path / "bad", dtype="int8")


def test_hook_for_site():
    assert hook_for_site("resid_post.15") == ("blocks.15.hook_resid_post", 15)
    assert hook_for_site("resid_pre.0") == ("blocks.0.hook_resid_pre", 0)
    assert hook_for_site("mlp_out.7") == ("blocks.7.hook_mlp_out", 7)
    assert hook_for_site("attn_out.2") == ("blocks.2.hook_attn_out", 2)
    for bad in ("resid_mid.3", "resid_post", "resid_post.-1", "blocks.3.hook_resid_post"):
        with pytest.raises(ValueError, match="is not a site name"):
            hook_for_site(bad)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sae_lens_loads_the_export(tmp_path, kind):
    sae_lens = pytest.importorskip("sae_lens")
    sae = _sae(kind)
    path = _export(sae, tmp_path / "sae_lens")
    loaded = sae_lens.SAE.load_from_disk(str(path))
    arch = "topk" if sae.cfg.architecture == "topk" else "jumprelu"
    assert loaded.cfg.architecture() == arch and loaded.cfg.d_in == D and loaded.cfg.d_sae == N
    assert loaded.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert loaded.cfg.metadata.matryoshka_widths == (list(sae.cfg.partition) if sae.cfg.is_matryoshka else None)
    x = _raw()
    with torch.no_grad():
        z = loaded.encode(x)
        torch.testing.assert_close(z, sae.encode_dense(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded.decode(z), sae(x), rtol=1e-4, atol=1e-3 * RAW_SCALE)
        torch.testing.assert_close(loaded(x), sae(x), rtol=1e-4, atol=1e-3 * RAW_SCALE)
