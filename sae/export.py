"""Export a trained SAE for SAELens or EleutherAI's sparsify, from a trial bundle or a bare checkpoint.

    python -m sae.export PATH --to saelens|sparsify OUT [--model M --site S --context-size N --dataset D]
    python -m orchestrator.export RUN_ID --to saelens|sparsify OUT     # an MLflow run (downloads its bundle)

PATH is a trial bundle (a folder holding `sae/` and `result.json`: what a grid point leaves in its Tune checkpoint
and logs to its MLflow run) or a bare checkpoint (`cfg.json` + `sae.safetensors`, from `sae.checkpoint.save_sae`).
OUT is created, or replaced when it is an empty folder or an earlier export in the same format (anything else is
refused: a replaced folder is deleted). Both formats get the input scale folded into the weights
(`sae.saelens.fold_input_scale`), so raw activations go in and raw reconstructions come out.

saelens   SAELens v6's on-disk format, written by `sae.saelens.save_saelens` (see there for the fields and
          architectures). Its cfg names the model, hook and context size. A bundle's result.json records them
          (`resolved.model`, `.site`, `.context_length`, `.corpus`; bundles of sweeps older than this export do
          not), options override them, and a bare checkpoint needs --model, --site and --context-size. The model
          is written as `sae.lm.hub_model_name` gives it: an embedded alias becomes its hub model.
sparsify  the folder `SparseCoder.save_to_disk` writes and `SparseCoder.load_from_disk` reads: `cfg.json` (the
          SparseCoderConfig fields plus `d_in`) and `sae.safetensors` holding exactly `encoder.weight` [n, d],
          `encoder.bias` [n], `W_dec` [n, d] and `b_dec` [d] (sparsify loads the state dict strictly). sparsify
          encodes topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias)) and decodes acts @ W_dec + b_dec:
          ours with the scale folded (`W_enc` transposed). Only TopK SAEs: a Matryoshka TopK SAE exports as a
          plain TopK SAE (sparsify has no nested groups; the latents keep our order, so prefix i is still the
          first m_i latents, but the boundaries are not recorded); BatchTopK is refused, since its inference rule
          is a threshold and sparsify's activations (topk, groupmax) have none: export it to saelens. The cfg
          holds no model or hook: sparsify names a coder by its folder, the hookpoint (`layers.15` is the output
          of decoder layer 15, our `resid_post.15`, in a Llama-layout model).
          Read from eai-sparsify 1.3.3 (PyPI): sparsify/sparse_coder.py (load_from_disk, save_to_disk, encode,
          decode), sparsify/fused_encoder.py, sparsify/config.py; EleutherAI/sparsify's sparse_coder.py at commit
          001d98eb1a0a71e1d605dc3c0d55aa53a5b662e5 has the same load/encode/decode.

Plain torch and safetensors: neither sae-lens nor sparsify is needed to write an export. Reading an MLflow run
is orchestrator.export's part; it reuses this module's parser and export.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from safetensors.torch import save_file

from sae import saelens
from sae.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_config, load_sae, write_dir_atomic
from sae.lm import hub_model_name

Format = Literal["saelens", "sparsify"]
FORMATS: tuple[str, ...] = ("saelens", "sparsify")
RESULT_FILE = "result.json"  # a trial bundle's index (orchestrator.trial writes it, orchestrator.tracking logs it)
SAE_DIR = "sae"  # the checkpoint inside a bundle
SAELENS_DIR = "sae_lens"  # its SAELens export, written by the trial
# each SAELens metadata option -> the spec field that holds it (a bundle's result.json `resolved`, a sweep's spec)
SPEC_KEYS = {"model": "model", "site": "site", "context_size": "context_length", "dataset": "corpus"}
REQUIRED = ("model", "site", "context_size")  # dataset may stay unknown (SAELens reads a missing one as None)
OPTIONS = {"model": "--model", "site": "--site", "context_size": "--context-size", "dataset": "--dataset"}
RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id
SPARSIFY_CONFIG = "cfg.json"  # sparsify: SparseCoder.load_from_disk reads path / "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"  # ... and path / "sae.safetensors"
SPARSIFY_EXPANSION_FACTOR = 32  # SparseCoderConfig's default; unused when num_latents > 0, as in every export
EXPORT_FILES = {"saelens": {saelens.CONFIG_FILE, saelens.WEIGHTS_FILE}, "sparsify": {SPARSIFY_CONFIG, SPARSIFY_WEIGHTS}}


class MissingMetadata(ValueError):
    """A SAELens export lacks metadata that neither the source nor the caller gave; `missing` names it."""

    def __init__(self, missing: list[str], source: Path, why: str, names: Mapping[str, str] | None = None):
        self.missing, self.source, self.why = missing, source, why
        shown = ", ".join((names or {}).get(k, k) for k in missing)
        super().__init__(f"a SAELens export names the model, site and context size, and {source} {why}: "
                         f"give {shown}")


def spec_metadata(record: Mapping[str, Any]) -> dict[str, Any]:
    """The SAELens metadata a spec-like record holds (result.json's `resolved`, a sweep's spec), by option name."""
    return {opt: record[key] for opt, key in SPEC_KEYS.items() if record.get(key) is not None}


def write_saelens(sae, directory: str | os.PathLike, *, model: str, site: str, context_size: int,
                  dataset: str | None = None, dtype: str = "float32") -> Path:
    """`sae` in SAELens's format (`sae.saelens.save_saelens`), named the way SAELens names things: the site as
    its TransformerLens hook, the model as its hub name where `model` is one of our embedded aliases."""
    hook_name, layer = saelens.hook_for_site(site)
    hub = hub_model_name(model)
    return saelens.save_saelens(sae, directory, model_name=hub, hook_name=hook_name, hook_layer=layer,
                                context_size=context_size, dataset=dataset, dtype=dtype,
                                metadata={"model_alias": model} if hub != model else None)


def check_sparsify(cfg) -> None:
    """sparsify runs TopK only: refuse anything else (naming the architecture and the fix) before any work."""
    if cfg.architecture != "topk":
        raise ValueError(f"architecture {cfg.architecture!r}: sparsify's activations (topk, groupmax) cannot "
                         "express BatchTopK's inference threshold; export this SAE with --to saelens (JumpReLU)")


def sparsify_config(sae) -> dict[str, Any]:
    """sparsify's cfg.json: every SparseCoderConfig field (eai-sparsify 1.3.3) plus d_in, as save_to_disk writes."""
    cfg = sae.cfg
    check_sparsify(cfg)
    return {
        "activation": "topk", "expansion_factor": SPARSIFY_EXPANSION_FACTOR,
        "normalize_decoder": False,  # the folded decoder rows are not unit norm; sparsify's trainer must not make them so
        "num_latents": cfg.n_latents, "k": cfg.k, "multi_topk": False, "skip_connection": False, "transcode": False,
        "d_in": cfg.d_in,
    }


def sparsify_tensors(sae, dtype: str = "float32") -> dict[str, Any]:
    """The state dict sparsify loads, input scale folded: our W_enc [d, n] is its encoder.weight [n, d] transposed."""
    f = saelens.fold_input_scale(sae)
    return saelens.cast_finite({"encoder.weight": f["W_enc"].T, "encoder.bias": f["b_enc"], "W_dec": f["W_dec"],
                                "b_dec": f["b_dec"]}, dtype, sae, "sparsify")


def write_sparsify(sae, directory: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """`sae` as a sparsify SparseCoder folder (cfg.json + sae.safetensors), created or atomically replaced."""
    text = json.dumps(sparsify_config(sae), indent=2) + "\n"
    tensors = sparsify_tensors(sae, dtype)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / SPARSIFY_WEIGHTS), metadata={"format": "pt"})
        (tmp / SPARSIFY_CONFIG).write_text(text)

    return write_dir_atomic(Path(directory), write)


def locate(source: str | os.PathLike) -> tuple[Path, dict[str, Any], str]:
    """(checkpoint folder, the SAELens metadata the source records, what the source is) for a bundle or a bare
    checkpoint; a path that does not exist, or holds neither, raises ValueError saying what to give instead."""
    path = Path(source)
    if not path.exists():
        if RUN_ID.fullmatch(str(source)):
            raise ValueError(f"PATH {source!r} is not a local path but looks like an MLflow run id: export a run "
                             f"with `python -m orchestrator.export {source} --to saelens|sparsify OUT`")
        raise ValueError(f"PATH {str(source)!r} does not exist: give a trial bundle (a folder with sae/ and "
                         "result.json) or an SAE checkpoint folder (cfg.json + sae.safetensors)")
    if (path / SAE_DIR / CONFIG_FILE).is_file():
        result = path / RESULT_FILE
        if not result.is_file():
            return path / SAE_DIR, {}, "is a bundle without result.json"
        try:
            resolved = json.loads(result.read_text()).get("resolved") or {}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"{result} is not a trial bundle's result.json ({e}): give the bundle's sae/ folder "
                             "and the metadata options instead") from e
        return path / SAE_DIR, spec_metadata(resolved), "is a bundle whose result.json does not record them " \
                                                        "(a sweep from before they were recorded)"
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return path, {}, "is a bare checkpoint"
    raise ValueError(f"PATH {str(path)!r} is neither a trial bundle (sae/ and result.json) nor an SAE checkpoint "
                     f"({CONFIG_FILE} + {WEIGHTS_FILE})")


def check_out(out: str | os.PathLike, to: str, protect: tuple[Path, ...] = ()) -> Path:
    """OUT may be new, an empty folder, or an earlier export in format `to` (replaced); it may not be, or hold,
    any `protect` path (the source). Anything else raises ValueError before any work."""
    target = Path(out)
    where = target.resolve()
    for p in protect:
        if where == p.resolve() or where in p.resolve().parents:
            raise ValueError(f"OUT {str(out)!r} is or holds the source {str(p)!r}, which the export would replace: "
                             "choose another folder")
    if not target.exists():
        return target
    if not target.is_dir():
        raise ValueError(f"OUT {str(out)!r} exists and is not a folder: choose a new folder")
    names = {p.name for p in target.iterdir()}
    if names and not (names == EXPORT_FILES[to] and _is_format(target, to)):
        raise ValueError(f"OUT {str(out)!r} holds files that are not an earlier {to} export ({sorted(names)[:5]}): "
                         "choose a new or empty folder (an export replaces OUT whole)")
    return target


def _is_format(folder: Path, to: str) -> bool:
    """Whether folder's cfg.json is the `to` format's (sparsify's files are named like our own checkpoint's)."""
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    keys = {"saelens": "d_sae", "sparsify": "num_latents"}
    return isinstance(cfg, dict) and keys[to] in cfg and "input_scale" not in cfg


def export(source: str | os.PathLike, to: Format, out: str | os.PathLike, *, dtype: str = "float32",
           defaults: Mapping[str, Any] | None = None, **metadata: Any) -> Path:
    """Export the SAE of `source` (a trial bundle or a checkpoint folder) to `out` in format `to`; returns `out`.

    metadata (SAELens only): model, site, context_size, dataset; each given one overrides what the bundle
    records, which overrides `defaults` (orchestrator.export: the sweep's spec). Every check (format, OUT, the
    architecture, missing metadata, the site) runs before the weights are read or anything is written.
    """
    if to not in FORMATS:
        raise ValueError(f"to must be one of {list(FORMATS)}, got {to!r}")
    saelens.check_dtype(dtype)
    if unknown := sorted(set(metadata) - set(SPEC_KEYS)):
        raise TypeError(f"export() got unknown metadata {unknown}; it takes {list(SPEC_KEYS)}")
    sae_dir, recorded, what = locate(source)
    target = check_out(out, to, (Path(source), sae_dir))
    cfg = load_config(sae_dir)
    if to == "sparsify":
        check_sparsify(cfg)
        return write_sparsify(load_sae(sae_dir), target, dtype=dtype)
    given = {k: v for k, v in metadata.items() if v is not None}
    merged = {**(defaults or {}), **recorded, **given}
    if missing := [k for k in REQUIRED if merged.get(k) is None]:
        raise MissingMetadata(missing, Path(source), what)
    if not isinstance(merged["context_size"], int) or merged["context_size"] < 1:
        raise ValueError(f"context_size must be a positive integer, got {merged['context_size']!r}")
    saelens.hook_for_site(merged["site"])  # a site SAELens cannot name fails here, before the weights are read
    return write_saelens(load_sae(sae_dir), target, dtype=dtype, **merged)


SOURCE_HELP = "a trial bundle (sae/ + result.json) or an SAE checkpoint folder (cfg.json + sae.safetensors)"


def build_parser(prog: str, description: str, source_help: str = SOURCE_HELP) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("source", metavar="PATH", help=source_help)
    p.add_argument("--to", required=True, choices=FORMATS, help="the format to write")
    p.add_argument("out", metavar="OUT", help="the folder to write (new, empty, or an earlier export to replace)")
    p.add_argument("--model", default=None, help="SAELens: the model (default: the bundle's; an embedded alias "
                                                 "is written as its hub name)")
    p.add_argument("--site", default=None, help="SAELens: the site, e.g. resid_post.15 (default: the bundle's)")
    p.add_argument("--context-size", type=_positive_int, default=None,
                   help="SAELens: tokens per context the SAE was trained on (default: the bundle's)")
    p.add_argument("--dataset", default=None, help="SAELens: the corpus (default: the bundle's, else none)")
    p.add_argument("--dtype", default="float32", choices=sorted(saelens.EXPORT_DTYPES), help="the exported weights' dtype")
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


Resolve = Callable[[argparse.Namespace, contextlib.ExitStack], tuple[str, dict[str, Any]]]


def cli(argv: list[str] | None, *, prog: str, description: str, source_help: str = SOURCE_HELP,
        add_arguments: Callable[[argparse.ArgumentParser], None] | None = None, resolve: Resolve | None = None) -> int:
    """Parse, export, print where it went; bad input exits 2 with one line. `resolve(args, stack)` turns the PATH
    argument into (local source, default metadata) — orchestrator.export downloads a run there."""
    parser = build_parser(prog, description, source_help)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    options = {k: getattr(args, k) for k in SPEC_KEYS}
    try:
        with contextlib.ExitStack() as stack:
            source, defaults = resolve(args, stack) if resolve is not None else (args.source, {})
            out = export(source, args.to, args.out, dtype=args.dtype, defaults=defaults, **options)
    except MissingMetadata as err:
        print(f"error: {MissingMetadata(err.missing, Path(args.source), err.why, OPTIONS)}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.to})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(argv, prog="python -m sae.export",
               description="Export a trial bundle or an SAE checkpoint for SAELens or sparsify (input scale folded).")


if __name__ == "__main__":
    sys.exit(main())
