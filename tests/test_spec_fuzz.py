"""Every field of every shipped spec, mutated one at a time: the spec is either valid or refused with an error
that names the mutated field. Never a traceback (any exception but SpecError fails the test)."""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.spec import SPEC_DIR, SpecError, spec_from_dict

SPECS = sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def _leaves(node: Any, path: tuple = ()) -> list[tuple]:
    """Paths to every field (a mapping's keys, recursively; a list is one field)."""
    if isinstance(node, dict):
        out = [path] if path else []
        for key, value in node.items():
            out += _leaves(value, (*path, key))
        return out
    return [path]


def _set(raw: dict, path: tuple, value: Any) -> dict:
    out = copy.deepcopy(raw)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**13, 10**13), st.sampled_from([0, 1, -1, 2, 64, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.inf, -math.inf, math.nan, 0.5, 1e-9]),
    st.text(max_size=12), st.sampled_from(["", " ", "auto", "none", "masked", "doubling:2", "resid_post.1", "s3://b/x"]),
    st.lists(st.one_of(st.integers(-4, 4096), st.none(), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)


def _raw(name: str) -> dict:
    return yaml.safe_load((SPEC_DIR / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", SPECS)
@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_one_mutated_field_is_valid_or_refused_by_name(name, data):
    raw = _raw(name)
    path = data.draw(st.sampled_from(_leaves(raw)), label="field")
    value = data.draw(VALUES, label="value")
    try:
        spec_from_dict(_set(raw, path, value), source=f"{name}.yaml")
    except SpecError as err:
        # the field, the section holding it or one of its elements (grid.n_latents.0) is named; an error about a
        # combination of fields (objective_granularity vs the grid's n_latents) names the mutated one among them
        named = [".".join(map(str, path[:i])) for i in range(len(path), 0, -1)]
        assert any(re.search(rf"(^|\s){re.escape(field)}[.:\s\[]", str(err)) for field in named) or \
            re.search(rf"\b{re.escape(str(path[-1]))}\b", str(err)), (path, value, str(err))
