"""SAE checkpoints as a directory: `sae.safetensors` + `cfg.json` (no pickle).

Tensor names and layouts follow SAELens / sparsify: W_enc [d_in, n], b_enc [n], W_dec [n, d_in], b_dec [d_in],
plus `threshold` (scalar, BatchTopK inference threshold). W_dec and b_dec live in the SAE's normalised space;
cfg.json's `input_scale` maps raw activations into it, so a loaded SAE maps raw to raw.

Writes go to a hidden temp directory beside the target, which is then renamed into place; an existing
checkpoint is first renamed aside and removed only after the new one is in place, so the path never holds a
half-written checkpoint (a crash in between leaves the old one under `.NAME.old-*`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sae.config import SAEConfig

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"
TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


def expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    d, n = cfg.d_in, cfg.n_latents
    return {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,), "threshold": ()}


def save_sae(sae, directory: str | os.PathLike) -> Path:
    """Write `sae` to `directory` (created or atomically replaced); returns the directory path."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name in TENSOR_NAMES:
        t = getattr(sae, name)
        tensors[name] = t.detach().to("cpu").contiguous().clone()
    want = expected_shapes(sae.cfg)
    for name, t in tensors.items():
        if tuple(t.shape) != want[name]:
            raise ValueError(f"SAE tensor {name} has shape {list(t.shape)} but its cfg implies {list(want[name])}")
    tag = uuid.uuid4().hex[:12]
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(sae.cfg.model_dump_json(indent=2) + "\n")
        if target.exists():
            old = target.parent / f".{target.name}.old-{tag}"
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_config(directory: str | os.PathLike) -> SAEConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"no {CONFIG_FILE} in {directory}: not an SAE checkpoint written by save_sae")
    try:
        return SAEConfig.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def load_sae(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a checkpoint written by `save_sae` (eval mode). Shapes that disagree with cfg.json raise ValueError."""
    from sae.model import SparseAutoencoder

    directory = Path(directory)
    cfg = load_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"no {WEIGHTS_FILE} in {directory}: save the SAE with sae.checkpoint.save_sae (weights are "
                         "read from safetensors only, never from a pickled .pt/.bin file)")
    want = expected_shapes(cfg)
    tensors: dict[str, torch.Tensor] = {}
    try:
        f = safe_open(str(weights), framework="pt", device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{weights} is not a safetensors file ({e}): replace it with one written by "
                         "sae.checkpoint.save_sae (a pickle in its place is refused: loading one can run code)") from e
    with f:
        present = set(f.keys())
        for name in TENSOR_NAMES:
            if name not in present:
                if name == "threshold":
                    continue  # checkpoints from other tools may lack it; the model's init (0) is kept
                raise ValueError(f"checkpoint {weights} lacks tensor {name!r} (has {sorted(present)})")
            shape = tuple(f.get_slice(name).get_shape())
            if shape != want[name]:
                raise ValueError(
                    f"checkpoint {weights}: tensor {name!r} has shape {list(shape)} but cfg.json "
                    f"(d_in={cfg.d_in}, n_latents={cfg.n_latents}) expects {list(want[name])}"
                )
            tensors[name] = f.get_tensor(name)
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG stream
        sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        for name, t in tensors.items():
            getattr(sae, name).copy_(t)
    return sae.to(device).eval()
