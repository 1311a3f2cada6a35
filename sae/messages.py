"""How error messages list names (columns, files, labels, sites, specs...).

A message that printed every name of a wide input (a JSON object read as one row of 6,239 columns) ran to
111,612 characters and hid its own point; every list in an error goes through `name_list`, so none is longer
than `MAX_NAMES` names plus a count of the rest.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MAX_NAMES = 20


def name_list(names: Iterable[Any], limit: int = MAX_NAMES) -> str:
    """`['a', 'b']`, or the first `limit` names then `… and N more`: `['a', ..., 't', … and 6219 more]`."""
    items = list(names)
    shown = ", ".join(repr(x) for x in items[:limit])
    rest = len(items) - limit
    return f"[{shown}, … and {rest} more]" if rest > 0 else f"[{shown}]"
