"""safetensors + cfg.json round trip, atomic overwrite, and shape checks on load."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae.checkpoint import load_sae, save_sae
from sae.config import SAEConfig
from sae.model import SparseAutoencoder


def _sae(seed=0, **kw):
    cfg = SAEConfig(d_in=6, n_latents=20, k=3, architecture="batchtopk", partition=(5, 10, 20), **kw)
    sae = SparseAutoencoder.from_config(cfg, seed=seed)
    with torch.no_grad():
        sae.initialise_from_sample(torch.randn(64, 6, generator=torch.Generator().manual_seed(seed)) * 4)
        sae.b_enc.normal_(generator=torch.Generator().manual_seed(seed + 1))
        sae.threshold.fill_(0.375)
    return sae


def test_round_trip_is_exact(tmp_path):
    sae = _sae()
    path = save_sae(sae, tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["cfg.json", "sae.safetensors"]
    loaded = load_sae(path)
    assert loaded.cfg == sae.cfg and loaded.cfg.input_scale == sae.cfg.input_scale
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        a, b = getattr(sae, name).detach(), getattr(loaded, name).detach()
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert not loaded.training
    x = torch.randn(9, 6)
    assert torch.equal(sae.eval()(x), loaded(x))


def test_overwrite_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "ckpt"
    save_sae(_sae(seed=0), target)
    second = _sae(seed=5)
    save_sae(second, target)
    assert torch.equal(load_sae(target).W_dec, second.W_dec)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_shape_mismatch_names_tensor(tmp_path):
    path = save_sae(_sae(), tmp_path / "ckpt")
    tensors = load_file(str(path / "sae.safetensors"))
    tensors["W_dec"] = torch.zeros(21, 6)
    save_file(tensors, str(path / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"'W_dec' has shape \[21, 6\].*expects \[20, 6\]"):
        load_sae(path)


def test_cfg_mismatch_and_missing_tensor(tmp_path):
    path = save_sae(_sae(), tmp_path / "ckpt")
    cfg = json.loads((path / "cfg.json").read_text())
    cfg.update(d_in=7)
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'W_enc' has shape \[6, 20\].*expects \[7, 20\]"):
        load_sae(path)
    cfg.update(d_in=6)
    (path / "cfg.json").write_text(json.dumps(cfg))
    tensors = load_file(str(path / "sae.safetensors"))
    del tensors["b_enc"]
    save_file(tensors, str(path / "sae.safetensors"))
    with pytest.raises(ValueError, match="lacks tensor 'b_enc'"):
        load_sae(path)


def test_load_sae_refuses_a_pickle_or_a_missing_weights_file(tmp_path):
    path = save_sae(_sae(), tmp_path / "ckpt")
    torch.save({"W_enc": torch.zeros(6, 20)}, path / "sae.safetensors")  # a pickle dropped in its place
    with pytest.raises(ValueError, match=r"ckpt/sae.safetensors is not a safetensors file.*save_sae"):
        load_sae(path)
    (path / "sae.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no sae.safetensors in .*ckpt.*save_sae"):
        load_sae(path)
