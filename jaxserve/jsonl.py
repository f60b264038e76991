"""One JSON object per line: the shared first step of reading prompt files and traces."""

from __future__ import annotations

import json


def parse_object(raw: str) -> dict:
    """A line -> its JSON object, or a ValueError that says what is wrong with it."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj
