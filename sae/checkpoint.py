"""SAE checkpoints as a directory: `sae.safetensors` + `cfg.json` (no pickle).

Tensor names and layouts follow SAELens / sparsify: W_enc [d_in, n], b_enc [n], W_dec [n, d_in], b_dec [d_in],
plus `threshold` (scalar, BatchTopK inference threshold). W_dec and b_dec live in the SAE's normalised space;
cfg.json's `input_scale` maps raw activations into it, so a loaded SAE maps raw to raw.

Writes go to a hidden temp directory beside the target, which is then renamed into place; an existing
checkpoint is first renamed aside and removed only after the new one is in place, so the path never holds a
half-written checkpoint (a crash in between leaves the old one under `.NAME.old-*`).

A trainer's resumable state (`save_trainer_state`: weights, Adam moments, counters) is likewise safetensors +
JSON, never a pickle: a checkpoint directory may come from elsewhere, and unpickling runs code.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    tensors = {}
    for name in TENSOR_NAMES:
        t = getattr(sae, name)
        tensors[name] = t.detach().to("cpu").contiguous().clone()
    want = expected_shapes(sae.cfg)
    for name, t in tensors.items():
        if tuple(t.shape) != want[name]:
            raise ValueError(f"SAE tensor {name} has shape {list(t.shape)} but its cfg implies {list(want[name])}")

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(sae.cfg.model_dump_json(indent=2) + "\n")

    return write_dir_atomic(target, write)


def write_dir_atomic(target: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a fresh hidden directory beside `target`, then rename it to `target` (an existing one
    is renamed aside first and removed once the new one is in place): `target` never holds a partial write."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        write(tmp)
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


TRAINER_FORMAT = "sae-frontier/trainer-state"
TRAINER_FORMAT_VERSION = 1
_TENSOR, _TUPLE, _ITEMS, _FLOAT = "__tensor__", "__tuple__", "__items__", "__float__"
_RETRAIN = "delete the checkpoint directory that holds it to train from scratch"


def trainer_state_paths(directory: str | os.PathLike, name: str = "trainer") -> tuple[Path, Path]:
    """The two files of a trainer state: NAME.safetensors (every tensor) and NAME.json (everything else)."""
    directory = Path(directory)
    return directory / f"{name}.safetensors", directory / f"{name}.json"


def save_trainer_state(state: dict, directory: str | os.PathLike, name: str = "trainer") -> tuple[Path, Path]:
    """Write a `Trainer.state_dict()` (or any tree of dicts, lists, tuples, tensors and JSON scalars) as
    NAME.safetensors + NAME.json in `directory` (created if needed); returns both paths.

    Tensors go to safetensors under their dotted path (`members.0.optimizer.state.1.exp_avg`); the JSON holds the
    tree with tensor references, tuples and non-string dict keys tagged so `load_trainer_state` rebuilds the
    same types. Each file is written under a temporary name and renamed into place, tensors first; both carry
    one random id, so a pair from two different saves is refused on load instead of mixed.
    """
    tensors_path, json_path = trainer_state_paths(directory, name)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "", tensors)
    save_id = uuid.uuid4().hex
    doc = {"format": TRAINER_FORMAT, "version": TRAINER_FORMAT_VERSION, "id": save_id,
           "tensors_file": tensors_path.name, "state": tree}
    _replace_atomic(tensors_path, lambda tmp: save_file(tensors, str(tmp), metadata={
        "format": "pt", "trainer_state_id": save_id}))
    _replace_atomic(json_path, lambda tmp: tmp.write_text(json.dumps(doc, allow_nan=False) + "\n"))
    return tensors_path, json_path


def load_trainer_state(directory: str | os.PathLike, name: str = "trainer") -> dict:
    """Read a state written by `save_trainer_state` (tensors on the CPU; `Trainer.load_state_dict` copies them to
    its devices). Anything that is not that pair of safetensors + JSON files raises ValueError naming the file."""
    tensors_path, json_path = trainer_state_paths(directory, name)
    if not json_path.is_file():
        legacy = Path(directory) / f"{name}.pt"
        why = f" ({legacy.name} there is a pickle from an older version, which is never loaded)" if legacy.exists() else ""
        raise ValueError(f"no trainer state {json_path}{why}: {_RETRAIN}")
    try:
        doc = json.loads(json_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{json_path} is not valid JSON ({e}): {_RETRAIN}") from e
    if not isinstance(doc, dict) or doc.get("format") != TRAINER_FORMAT or "state" not in doc:
        raise ValueError(f"{json_path} is not a trainer state written by save_trainer_state: {_RETRAIN}")
    if doc.get("version") != TRAINER_FORMAT_VERSION:
        raise ValueError(f"{json_path} has trainer-state version {doc.get('version')!r}, this code reads "
                         f"{TRAINER_FORMAT_VERSION}: {_RETRAIN}")
    if not tensors_path.is_file():
        raise ValueError(f"no {tensors_path.name} beside {json_path}: {_RETRAIN}")
    try:
        with safe_open(str(tensors_path), framework="pt", device="cpu") as f:
            save_id = (f.metadata() or {}).get("trainer_state_id")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{tensors_path} is not a safetensors file ({e}): {_RETRAIN}") from e
    if save_id != doc.get("id"):
        raise ValueError(f"{tensors_path} and {json_path} come from different saves (an interrupted write?): "
                         f"{_RETRAIN}")
    used: set[str] = set()
    try:
        state = _decode(doc["state"], tensors, used)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{json_path} does not match {tensors_path.name}: {e}: {_RETRAIN}") from e
    if unused := sorted(set(tensors) - used):
        raise ValueError(f"{tensors_path} holds tensors {unused[:5]} that {json_path.name} never names: {_RETRAIN}")
    if not isinstance(state, dict):
        raise ValueError(f"{json_path} does not hold a state dict: {_RETRAIN}")
    return state


def _replace_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON form of `obj`, moving its tensors into `tensors` under dotted keys."""
    if isinstance(obj, torch.Tensor):
        if key in tensors:
            raise ValueError(f"two tensors of the trainer state flatten to the key {key!r}")
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {_TENSOR: key}
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {_FLOAT: repr(obj)}
    dotted = f"{key}." if key else ""
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, f"{dotted}{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{dotted}{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{dotted}{k}", tensors) for k, v in obj.items()}
        if not all(k is None or isinstance(k, bool | int | float | str) for k in obj):
            raise TypeError(f"trainer state at {key!r} has a dict key that is not a JSON scalar")
        return {_ITEMS: [[k, _encode(v, f"{dotted}{k}", tensors)] for k, v in obj.items()]}
    raise TypeError(f"trainer state at {key!r} holds a {type(obj).__name__}, which has no safetensors/JSON form")


def _decode(node: Any, tensors: dict[str, torch.Tensor], used: set[str]) -> Any:
    """Inverse of `_encode`."""
    if isinstance(node, list):
        return [_decode(v, tensors, used) for v in node]
    if not isinstance(node, dict):
        return node
    tags = [k for k in node if k.startswith("__")]
    if not tags:
        return {k: _decode(v, tensors, used) for k, v in node.items()}
    if len(node) != 1 or tags[0] not in (_TENSOR, _TUPLE, _ITEMS, _FLOAT):
        raise ValueError(f"unknown entry {sorted(node)}")
    tag, value = tags[0], node[tags[0]]
    if tag == _TENSOR:
        if value not in tensors:
            raise KeyError(f"tensor {value!r} is missing")
        used.add(value)
        return tensors[value]
    if tag == _TUPLE:
        return tuple(_decode(v, tensors, used) for v in value)
    if tag == _ITEMS:
        return {k: _decode(v, tensors, used) for k, v in value}
    return float(value)
