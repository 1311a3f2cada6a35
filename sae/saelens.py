"""Export a trained SAE in SAELens's on-disk format (v6), so `sae_lens.SAE.load_from_disk` opens it.

Why a separate export: our checkpoint (`sae.checkpoint`) keeps W_dec and b_dec in the SAE's normalised space and
names `input_scale` in our own cfg.json, which SAELens cannot read. Here the scale is folded into the weights
(what SAELens's own `fold_activation_norm_scaling_factor` does), so the exported SAE takes raw activations and
returns raw reconstructions with `normalize_activations: "none"`:

    ours:     pre = (s x - b_dec) W_enc + b_enc         x_hat = (z W_dec + b_dec) / s
    SAELens:  pre = (x - b_dec/s) (s W_enc) + b_enc     x_hat = z (W_dec / s) + b_dec / s

The pre-activations, and so the latent codes z, are the same numbers in both (up to float rounding). Plain torch
and safetensors; sae_lens is not needed to write the export.

Architectures:
  topk       -> "topk" with the same k (`rescale_acts_by_decoder_norm: false`: our selection never rescales).
  batchtopk  -> "jumprelu" with a per-latent threshold equal to our inference threshold, as SAELens v6 saves its
                own BatchTopK SAEs. Exact: our inference rule keeps pre where pre > max(threshold, 0), and
                JumpReLU keeps ReLU(pre) where pre > threshold; the batch-level rule used in training is not
                part of either model. `metadata.k` keeps the trained average L0.
  Matryoshka -> the same export for its architecture (a Matryoshka SAE is an ordinary SAE at inference); the
                group boundaries go to `metadata.matryoshka_widths` (cumulative, ending at d_sae, as SAELens's
                Matryoshka config names them), so prefix i is latents [0, matryoshka_widths[i]).

Usage (a sweep writes this for every point, in the bundle's `sae_lens/`, logged to MLflow beside `sae/`, through
`sae.export.write_saelens`, which also names the hook and the model; `python -m sae.export` does it for any
earlier bundle or checkpoint):

    from sae.checkpoint import load_sae
    from sae.saelens import hook_for_site, save_saelens
    hook_name, layer = hook_for_site("resid_post.15")  # -> "blocks.15.hook_resid_post", 15
    save_saelens(load_sae("path/to/sae"), "path/to/sae_lens", model_name="HuggingFaceTB/SmolLM2-135M-Instruct",
                 hook_name=hook_name, hook_layer=layer, context_size=128, dataset="wiki-extracts")

    from sae_lens import SAE                     # in an environment with sae-lens >= 6
    sae = SAE.load_from_disk("path/to/sae_lens")  # raw activations in, raw reconstructions out

`model_name` should be a name SAELens / TransformerLens know: `sae.lm.hub_model_name` turns our embedded alias
("smollm2-135m") into its hub model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sae.checkpoint import write_dir_atomic
from sae.lm import SITE_KINDS, site_from_name
from sae.model import DTYPES

WEIGHTS_FILE = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
CONFIG_FILE = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
# metadata.sae_lens_version: SAELens reads a cfg.json below 6.0 (or without a version) with its legacy converter
FORMAT_VERSION = "6.0.0"
EXPORT_DTYPES = {**DTYPES, "float64": torch.float64}


def check_dtype(dtype: str) -> torch.dtype:
    """An export dtype's torch dtype; any other name raises ValueError listing the valid ones."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    return EXPORT_DTYPES[dtype]
SITE_HOOKS = {kind: f"hook_{kind}" for kind in SITE_KINDS}  # TransformerLens names its hooks after the same kinds


def hook_for_site(site: str) -> tuple[str, int]:
    """Our site name -> (TransformerLens hook name, layer): 'resid_post.15' -> ('blocks.15.hook_resid_post', 15)."""
    parsed = site_from_name(site)
    return f"blocks.{parsed.layer}.{SITE_HOOKS[parsed.kind]}", parsed.layer


def saelens_architecture(sae) -> str:
    """SAELens's inference architecture for our SAE: 'topk' or (BatchTopK, thresholded at inference) 'jumprelu'."""
    return {"topk": "topk", "batchtopk": "jumprelu"}[sae.cfg.architecture]


@torch.no_grad()
def fold_input_scale(sae) -> dict[str, torch.Tensor]:
    """W_enc, b_enc, W_dec, b_dec (our layouts, float64 on the CPU) with `input_scale` folded in, so raw activations
    go in and raw reconstructions come out (the module docstring's algebra). Every export starts from these."""
    s = float(sae.cfg.input_scale)
    W_enc, b_enc = sae.W_enc.detach().double().cpu(), sae.b_enc.detach().double().cpu()
    W_dec, b_dec = sae.W_dec.detach().double().cpu(), sae.b_dec.detach().double().cpu()
    return {"W_enc": W_enc * s, "W_dec": W_dec / s, "b_enc": b_enc, "b_dec": b_dec / s}


def cast_finite(tensors: dict[str, torch.Tensor], dtype: str, sae, fmt: str) -> dict[str, torch.Tensor]:
    """`tensors` cast to `dtype` (contiguous, CPU); a NaN/Inf after the cast raises ValueError naming the tensor."""
    torch_dtype = check_dtype(dtype)
    out = {k: v.to(torch_dtype).cpu().contiguous() for k, v in tensors.items()}
    for name, t in out.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"{fmt} export: tensor {name} holds NaN/Inf after folding input_scale="
                             f"{sae.cfg.input_scale} and casting to {dtype}; export a finite SAE")
    return out


@torch.no_grad()
def saelens_tensors(sae, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """The weights SAELens loads, with `input_scale` folded in (computed in float64, then cast to `dtype`)."""
    out = fold_input_scale(sae)
    if saelens_architecture(sae) == "jumprelu":
        thr = float(sae.threshold.clamp_min(0))  # our rule keeps pre > max(threshold, 0)
        out["threshold"] = torch.full_like(out["b_enc"], thr)
    return cast_finite(out, dtype, sae, "SAELens")


def saelens_config(sae, *, model_name: str, hook_name: str, hook_layer: int, context_size: int,
                   dataset: str | None, dtype: str = "float32", device: str = "cpu", prepend_bos: bool = True,
                   seqpos_slice: tuple[int | None, ...] = (1, None),
                   metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """SAELens v6's cfg.json for the export: the config fields of its inference class plus `metadata`.

    `seqpos_slice` (1, None) says the SAE never saw the BOS position (our harvest drops it); `hook_layer` is
    kept in metadata for tools that still read it (SAELens v6 derives the layer from `hook_name`).
    """
    cfg = sae.cfg
    arch = saelens_architecture(sae)
    check_dtype(dtype)
    meta: dict[str, Any] = {
        "sae_lens_version": FORMAT_VERSION, "sae_lens_training_version": None,
        "model_name": model_name, "hook_name": hook_name, "hook_layer": int(hook_layer), "hook_head_index": None,
        "context_size": int(context_size), "dataset_path": dataset, "prepend_bos": prepend_bos,
        "seqpos_slice": list(seqpos_slice), "training_architecture": cfg.architecture, "k": cfg.k,
        "input_scale_folded": cfg.input_scale, "exported_by": "sae-frontier (sae.saelens)",
    }
    if cfg.is_matryoshka:
        meta["matryoshka_widths"] = list(cfg.partition)
    meta.update(metadata or {})
    out: dict[str, Any] = {
        "architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.n_latents, "dtype": dtype, "device": device,
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
    }
    if arch == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    out["metadata"] = meta
    return out


def save_saelens(sae, directory: str | os.PathLike, *, model_name: str, hook_name: str, hook_layer: int,
                 context_size: int, dataset: str | None, dtype: str = "float32", device: str = "cpu",
                 prepend_bos: bool = True, seqpos_slice: tuple[int | None, ...] = (1, None),
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """Write `sae` as `directory`/sae_weights.safetensors + cfg.json (created or atomically replaced).

    `directory` must not be our own checkpoint: both formats name their config cfg.json. Extra `metadata` keys
    are added to (and may override) the cfg's metadata; SAELens keeps unknown metadata keys as they are.
    """
    config = saelens_config(sae, model_name=model_name, hook_name=hook_name, hook_layer=hook_layer,
                            context_size=context_size, dataset=dataset, dtype=dtype, device=device,
                            prepend_bos=prepend_bos, seqpos_slice=seqpos_slice, metadata=metadata)
    tensors = saelens_tensors(sae, dtype)
    text = json.dumps(config, indent=2, allow_nan=False) + "\n"

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(text)

    return write_dir_atomic(Path(directory), write)
