"""`SamplingParams`: how one request is decoded (vLLM's names and defaults)."""

from __future__ import annotations

import dataclasses

from jaxserve.validation import (check_bool, check_int, check_number, check_optional_int,
                                 check_strings, check_token_ids, show)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Every field is checked (type and range) at construction; a message names the field and
    its value. Numbers may be Python or numpy numbers, never bools; sequences are normalised to
    tuples (`stop="x"` becomes `("x",)`)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None  # None: drawn from the engine's seeded generator
    stop: tuple[str, ...] | str | None = None  # stop strings (excluded from the text)
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top logprobs per output token (the sampled one always)
    prompt_logprobs: int | None = None  # top logprobs per prompt token (its own always)
    # The first prompt position whose logprob is returned (earlier ones are None). Only the
    # positions asked for produce logits, and the prompt before `start - 1` may come from the
    # prefix cache: scoring asks only for its continuation this way.
    prompt_logprobs_start: int = 0

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        put("max_tokens", check_int("max_tokens", self.max_tokens, low=1))
        temperature = check_number("temperature", self.temperature, " >= 0 (0 = greedy)")
        if temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        put("temperature", temperature)
        put("top_k", check_int("top_k", self.top_k, low=0, what=" >= 0 (0 = off)"))
        top_p = check_number("top_p", self.top_p, " in (0, 1]")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        put("top_p", top_p)
        min_p = check_number("min_p", self.min_p, " in [0, 1]")
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p={self.min_p!r} must be in [0, 1]")
        put("min_p", min_p)
        put("seed", check_optional_int("seed", self.seed, low=0, high=2**32 - 1,
                                       what=" in [0, 2**32) or None (drawn)"))
        put("stop", check_strings("stop", self.stop))
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, (str, bytes)):
                raise ValueError(f"stop_token_ids={show(self.stop_token_ids)} must be a list "
                                 f"of token ids")
            ids = check_token_ids("stop_token_ids", self.stop_token_ids)
            bad = [t for t in ids if t < 0]
            if bad:
                raise ValueError(f"stop_token_ids: token id {bad[0]} is negative")
            put("stop_token_ids", tuple(ids))
        put("ignore_eos", check_bool("ignore_eos", self.ignore_eos))
        for name in ("logprobs", "prompt_logprobs"):
            put(name, check_optional_int(name, getattr(self, name), low=0,
                                         what=" >= 0 or None"))
        put("prompt_logprobs_start", check_int("prompt_logprobs_start",
                                               self.prompt_logprobs_start, low=0))

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        if not isinstance(d, dict):
            raise ValueError(f"sampling params must be a SamplingParams or a dict of its "
                             f"fields, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields, key=str)
        if unknown:
            raise ValueError(f"unknown sampling field(s) {unknown}; known: {sorted(fields)}")
        return cls(**d)

    @classmethod
    def coerce(cls, params) -> "SamplingParams":
        """None -> the defaults; a dict of fields -> SamplingParams; anything else is refused."""
        if params is None:
            return cls()
        if isinstance(params, cls):
            return params
        return cls.from_dict(params)
