"""The smoke spec as a dict with some fields replaced: how tests build specs that differ in one place."""

from __future__ import annotations

import yaml

from orchestrator.spec import SPEC_DIR


def smoke_dict(**over) -> dict:
    """sweeps/specs/smoke.yaml with `over` applied (a dict value is merged into the section it names)."""
    raw = yaml.safe_load((SPEC_DIR / "smoke.yaml").read_text())
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw
