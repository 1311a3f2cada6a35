"""safetensors + cfg.json round trip, atomic overwrite, and shape checks on load; the trainer state as safetensors +
JSON (exact round trip); loaders that refuse anything else (a pickle above all) with the file named."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae.checkpoint import load_sae, load_trainer_state, save_sae, save_trainer_state
from sae.config import SAEConfig, TrainConfig
from sae.model import SparseAutoencoder
from sae.train import Trainer


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


def _same(a, b, where="state"):
    """Equal values of the same types (tensors: dtype, shape, bits), dict keys in the same order."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
        return
    assert type(a) is type(b) or (isinstance(a, dict) and type(b) is dict), (where, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where  # NaN == NaN here


def test_trainer_state_round_trip_keeps_every_value_and_type(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tc = TrainConfig(lr=1e-2, warmup_steps=2, dead_tokens=64)
    trainer = Trainer([(SAEConfig(d_in=6, n_latents=20, k=3, architecture="batchtopk"), tc),
                       (SAEConfig(d_in=6, n_latents=20, k=3, partition=(5, 20)), tc)])
    for _ in range(3):
        trainer.train_step(torch.randn(32, 6, generator=gen))
    trainer.failures = {1: "why"}  # int keys, as a failed member leaves them
    state = trainer.state_dict()
    save_trainer_state(state, tmp_path)
    _same(state, load_trainer_state(tmp_path))
    odd = {"inf": float("-inf"), "nan": float("nan"), "tuple": (1, 2.5, None), 3: "int key", "__dunder": True,
           "bf16": [{"x": torch.arange(4, dtype=torch.bfloat16)}], "scalar": torch.tensor(7, dtype=torch.int64)}
    save_trainer_state(odd, tmp_path, "odd")
    _same(odd, load_trainer_state(tmp_path, "odd"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.json", "odd.safetensors", "trainer.json",
                                                          "trainer.safetensors"]


def test_trainer_state_loader_refuses_anything_else_and_names_the_file(tmp_path):
    state = {"step": 3, "w": torch.ones(2)}
    save_trainer_state(state, tmp_path / "a")
    save_trainer_state(state, tmp_path / "b")
    tensors, meta = tmp_path / "a" / "trainer.safetensors", tmp_path / "a" / "trainer.json"
    good_tensors, good_meta = tensors.read_bytes(), meta.read_text()
    torch.save(state, tensors)  # a pickle in place of the safetensors file
    with pytest.raises(ValueError, match=r"a/trainer.safetensors is not a safetensors file.*delete the checkpoint"):
        load_trainer_state(tmp_path / "a")
    tensors.write_bytes(good_tensors)
    torch.save(state, meta)  # ... or of the JSON file
    with pytest.raises(ValueError, match=r"a/trainer.json is not valid JSON.*delete the checkpoint"):
        load_trainer_state(tmp_path / "a")
    meta.write_text(json.dumps({"state": {}}))
    with pytest.raises(ValueError, match=r"a/trainer.json is not a trainer state written by save_trainer_state"):
        load_trainer_state(tmp_path / "a")
    meta.write_text((tmp_path / "b" / "trainer.json").read_text())  # a pair from two different saves
    with pytest.raises(ValueError, match=r"come from different saves.*delete the checkpoint"):
        load_trainer_state(tmp_path / "a")
    meta.write_text(good_meta)
    _same(state, load_trainer_state(tmp_path / "a"))
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(state, legacy / "trainer.pt")  # a checkpoint from before: never unpickled
    with pytest.raises(ValueError, match=r"legacy/trainer.json \(trainer.pt there is a pickle.*never loaded\)"):
        load_trainer_state(legacy)
