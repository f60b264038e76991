"""Parsing a JSONL prompt file: every good line becomes a request, every bad one a message.

The file is read as bytes and each line decoded on its own, so one line of invalid UTF-8 is one
bad line, not a failed run.
"""

from __future__ import annotations

import dataclasses
import os

from jaxserve.jsonl import parse_object
from jaxserve.sampling_params import SamplingParams
from jaxserve.validation import check_token_ids


@dataclasses.dataclass(frozen=True)
class PromptLine:
    number: int  # 1-based line number in the file
    prompt: str | None
    token_ids: list[int]
    params: SamplingParams


def read_lines(path: str, flag: str = "--prompts") -> list[bytes]:
    """The file's lines as bytes (a FileNotFoundError or IsADirectoryError names the flag and
    the path)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag}={path!r}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag}={path!r} is a directory, not a JSONL file")
    with open(path, "rb") as f:
        return f.read().splitlines()


def decode_line(raw: bytes | str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                         ) from None


def parse_prompt_lines(lines: list[str | bytes], sampling_defaults: dict, tokenizer
                       ) -> tuple[list[PromptLine], dict[int, str]]:
    """Returns the good lines and {line number: error} for the bad ones (blank lines skipped)."""
    good, errors = [], {}
    for number, raw in enumerate(lines, start=1):
        try:
            text = decode_line(raw)
            if not text.strip():
                continue
            good.append(_parse_line(number, text, sampling_defaults, tokenizer))
        except (ValueError, TypeError) as e:
            errors[number] = str(e)
    return good, errors


def _parse_line(number: int, raw: str, defaults: dict, tokenizer) -> PromptLine:
    obj = parse_object(raw)
    has_text, has_ids = "prompt" in obj, "prompt_token_ids" in obj
    if has_text == has_ids:
        raise ValueError('give exactly one of "prompt" or "prompt_token_ids"')
    fields = {k: v for k, v in obj.items() if k not in ("prompt", "prompt_token_ids", "id")}
    params = SamplingParams.from_dict({**defaults, **fields})
    if has_text:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f'"prompt" must be a string, got {prompt!r}')
        if tokenizer is None:
            raise ValueError('this model has no tokenizer: use "prompt_token_ids"')
        return PromptLine(number, prompt, tokenizer.encode(prompt), params)
    ids = obj["prompt_token_ids"]
    if not isinstance(ids, list):
        raise ValueError(f'"prompt_token_ids" must be a list of integers, got {ids!r}')
    return PromptLine(number, None, check_token_ids("prompt_token_ids", ids), params)
