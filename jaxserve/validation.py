"""Checks for values a user hands in (sampling fields, token ids, request ids, flags).

One place decides what counts as an integer, a number, a flag or a list of token ids, so every
boundary (`SamplingParams`, `Engine.add_request`, JSONL lines, command-line flags) refuses the
same things with the same words. Every message names the field and the bad value; errors are
`ValueError` (DESIGN.md: errors a user can cause). Booleans are not numbers here: `True` as
`max_tokens` or a token id is almost always a mistake, so it is refused.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

_MAX_REPR = 60  # long values (a whole prompt) are cut in messages


def show(value) -> str:
    """`repr(value)`, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[:_MAX_REPR - 3] + "..."


def _kind(value) -> str:
    return type(value).__name__


def is_integer(value) -> bool:
    """A Python or numpy integer, never a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value, *, low: int | None = None, high: int | None = None,
              what: str = "") -> int:
    """`value` as an int within [low, high] (either bound may be None)."""
    if not is_integer(value):
        raise ValueError(f"{name}={show(value)} must be an integer{what}, got {_kind(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}={value} must be an integer{what or _range(low, high)}")
    return value


def _range(low, high) -> str:
    if high is None:
        return f" >= {low}"
    if low is None:
        return f" <= {high}"
    return f" in [{low}, {high}]"


def check_optional_int(name: str, value, **kwargs) -> int | None:
    return None if value is None else check_int(name, value, **kwargs)


def check_number(name: str, value, what: str = "") -> float:
    """`value` as a finite float (an int is fine, a bool or a string is not)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={show(value)} must be a number{what}, got {_kind(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} must be a finite number{what}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={show(value)} must be true or false, got {_kind(value)}")
    return bool(value)


def check_token_ids(name: str, value, vocab_size: int | None = None) -> list[int]:
    """A sequence of token ids (list, tuple, 1-D integer numpy array) as a list of ints."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
            raise ValueError(f"{name} must be a 1-D array of integers, got an array of shape "
                             f"{value.shape} and dtype {value.dtype}")
        ids = value.tolist()
    elif isinstance(value, (list, tuple, range)):
        ids = list(value)
    else:
        raise ValueError(f"{name}={show(value)} must be a list of token ids, got {_kind(value)}")
    for i, t in enumerate(ids):
        if not is_integer(t):
            raise ValueError(f"{name}[{i}]={show(t)} is not a token id (an integer), "
                             f"got {_kind(t)}")
    ids = [int(t) for t in ids]
    if vocab_size is not None:
        for i, t in enumerate(ids):
            if not 0 <= t < vocab_size:
                raise ValueError(f"{name}[{i}]: token id {t} is outside the vocabulary "
                                 f"[0, {vocab_size})")
    return ids


def check_strings(name: str, value) -> tuple[str, ...] | None:
    """None, one string or a sequence of non-empty strings -> a tuple of strings (or None)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    elif not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}={show(value)} must be a string or a list of strings, "
                         f"got {_kind(value)}")
    for i, s in enumerate(value):
        if not isinstance(s, str):
            raise ValueError(f"{name}[{i}]={show(s)} must be a string, got {_kind(s)}")
        if not s:
            raise ValueError(f"{name}={show(tuple(value))} must not contain an empty string")
    return tuple(value)


def check_request_id(value) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"request_id={show(value)} must be a non-empty string, "
                         f"got {_kind(value)}")
    return value
