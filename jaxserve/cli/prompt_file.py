"""Parsing a JSONL prompt file: every good line becomes a request, every bad one a message."""

from __future__ import annotations

import dataclasses

from jaxserve.jsonl import parse_object
from jaxserve.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class PromptLine:
    number: int  # 1-based line number in the file
    prompt: str | None
    token_ids: list[int]
    params: SamplingParams


def parse_prompt_lines(lines: list[str], sampling_defaults: dict, tokenizer
                       ) -> tuple[list[PromptLine], dict[int, str]]:
    """Returns the good lines and {line number: error} for the bad ones (blank lines skipped)."""
    good, errors = [], {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            good.append(_parse_line(number, raw, sampling_defaults, tokenizer))
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
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise ValueError(f'"prompt_token_ids" must be a list of integers, got {ids!r}')
    return PromptLine(number, None, ids, params)
