"""Request generators: which requests arrive when (seconds after the run starts).

Random workloads draw token ids uniformly from the model's vocabulary with a seeded generator and
ignore EOS, so every request produces exactly the output length asked of it (vLLM's random
dataset does the same). A trace is a JSONL file of recorded requests, replayed as written.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from jaxserve.jsonl import parse_object
from jaxserve.sampling_params import SamplingParams

# "score" is the multiple-choice scoring job: pairs, not requests (score_workload.py).
WORKLOADS = ("offline", "online", "interference", "trace", "score")


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    id: str
    arrival_s: float  # seconds after the run starts, or after the anchor below
    prompt_token_ids: list[int]
    params: SamplingParams
    # If set, `arrival_s` counts from the moment every one of these requests has its first
    # token (interference: "during the streams' decodes", whatever each mode's prefill costs).
    after_first_tokens_of: tuple[str, ...] = ()

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def random_lengths(rng: np.random.Generator, n: int, mean: int, range_ratio: float) -> np.ndarray:
    """n integer lengths uniform in [mean·(1-r), mean·(1+r)], at least 1 (vLLM's random set)."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio={range_ratio!r} must be in [0, 1)")
    if mean < 1:
        raise ValueError(f"length {mean!r} must be >= 1")
    lo = max(1, math.floor(mean * (1 - range_ratio)))
    hi = max(lo, math.ceil(mean * (1 + range_ratio)))
    return rng.integers(lo, hi + 1, size=n)


def _random_request(rng, rid: str, arrival_s: float, prompt_len: int, output_len: int,
                    vocab_size: int, sampling: dict) -> BenchRequest:
    ids = rng.integers(0, vocab_size, size=int(prompt_len)).tolist()
    params = SamplingParams.from_dict(
        {**sampling, "max_tokens": int(output_len), "ignore_eos": True})
    return BenchRequest(rid, float(arrival_s), ids, params)


def offline(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
            vocab_size: int, seed: int, sampling: dict | None = None) -> list[BenchRequest]:
    """All requests at t=0: a batch job (throughput)."""
    return online(num_prompts, input_len, output_len, range_ratio, vocab_size, seed,
                  request_rate=math.inf, sampling=sampling)


def online(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
           vocab_size: int, seed: int, request_rate: float,
           sampling: dict | None = None) -> list[BenchRequest]:
    """Poisson arrivals at `request_rate` requests/s (inf: all at t=0); the first at t=0."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts={num_prompts!r} must be >= 1")
    if not request_rate > 0:
        raise ValueError(f"request_rate={request_rate!r} must be > 0 (inf = all at once)")
    rng = np.random.default_rng(seed)
    in_lens = random_lengths(rng, num_prompts, input_len, range_ratio)
    out_lens = random_lengths(rng, num_prompts, output_len, range_ratio)
    if math.isinf(request_rate):
        arrivals = np.zeros(num_prompts)
    else:
        gaps = rng.exponential(1.0 / request_rate, size=num_prompts)
        arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    return [_random_request(rng, f"req-{i}", arrivals[i], in_lens[i], out_lens[i], vocab_size,
                            _seeded(sampling, seed, i))
            for i in range(num_prompts)]


def interference(num_streams: int, stream_prompt_len: int, stream_output_len: int,
                 num_long: int, long_prompt_len: int, long_output_len: int,
                 long_arrivals_s: list[float], vocab_size: int, seed: int,
                 sampling: dict | None = None) -> list[BenchRequest]:
    """The seed's scenario: `num_streams` short prompts arrive at t=0, and `num_long` long
    prompts arrive `long_arrivals_s` after every stream has its first token, i.e. while the
    streams decode. Anchoring on the streams (not on the clock) keeps the scenario the same in
    every mode, though the stalling mode takes longer to prefill the streams themselves."""
    if len(long_arrivals_s) != num_long:
        raise ValueError(f"{len(long_arrivals_s)} arrival times for {num_long} long prompts")
    rng = np.random.default_rng(seed)
    reqs = [_random_request(rng, f"stream-{i}", 0.0, stream_prompt_len, stream_output_len,
                            vocab_size, _seeded(sampling, seed, i))
            for i in range(num_streams)]
    anchor = tuple(r.id for r in reqs)
    reqs += [dataclasses.replace(
        _random_request(rng, f"long-{i}", long_arrivals_s[i], long_prompt_len, long_output_len,
                        vocab_size, _seeded(sampling, seed, num_streams + i)),
        after_first_tokens_of=anchor) for i in range(num_long)]
    return reqs


def spread_arrivals(num: int, start_s: float, span_s: float) -> list[float]:
    """`num` times evenly inside (start, start + span), never at its ends."""
    return [start_s + span_s * (k + 1) / (num + 1) for k in range(num)]


def _seeded(sampling: dict | None, seed: int, index: int) -> dict:
    """Each request its own seed unless the caller fixed one, so a run repeats exactly."""
    sampling = dict(sampling or {})
    if sampling.get("seed") is None:
        sampling["seed"] = (seed * 1_000_003 + index) % 2**32
    return sampling


# -- traces ------------------------------------------------------------------------------------

def parse_trace(lines: list[str], vocab_size: int, sampling: dict | None = None
                ) -> tuple[list[BenchRequest], dict[int, str]]:
    """One request per JSONL line: {"arrival_s": float, "prompt_token_ids": [...],
    "max_tokens": int} plus an optional "id" and any SamplingParams field.

    Returns the good requests (by arrival) and {1-based line number: error} for the bad lines;
    blank lines are skipped. EOS is ignored unless a line says otherwise, so each request
    produces its recorded `max_tokens`.
    """
    defaults = {**(sampling or {}), "ignore_eos": True}
    good: list[BenchRequest] = []
    errors: dict[int, str] = {}
    seen: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            req = _trace_line(number, raw, vocab_size, defaults)
            if req.id in seen:
                raise ValueError(f'duplicate "id" {req.id!r}')
            seen.add(req.id)
            good.append(req)
        except (ValueError, TypeError) as e:
            errors[number] = str(e)
    return sorted(good, key=lambda r: r.arrival_s), errors


def read_trace(path: str, vocab_size: int, sampling: dict | None = None
               ) -> tuple[list[BenchRequest], dict[int, str]]:
    with open(path, encoding="utf-8") as f:
        return parse_trace(f.read().splitlines(), vocab_size, sampling)


def _trace_line(number: int, raw: str, vocab_size: int, defaults: dict) -> BenchRequest:
    obj = parse_object(raw)
    for key in ("arrival_s", "prompt_token_ids", "max_tokens"):
        if key not in obj:
            raise ValueError(f'missing "{key}"')
    arrival = obj["arrival_s"]
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not (
            math.isfinite(arrival) and arrival >= 0):
        raise ValueError(f'"arrival_s" must be a number >= 0, got {arrival!r}')
    ids = obj["prompt_token_ids"]
    if not isinstance(ids, list) or not ids or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError(f'"prompt_token_ids" must be a non-empty list of integers, got {ids!r}')
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    rid = obj.get("id", f"line-{number}")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise ValueError(f'"id" must be a string or an integer, got {rid!r}')
    fields = {k: v for k, v in obj.items() if k not in ("arrival_s", "prompt_token_ids", "id")}
    params = SamplingParams.from_dict({**defaults, **fields})
    return BenchRequest(str(rid), float(arrival), ids, params)


def write_trace(path: str, requests: list[BenchRequest]) -> None:
    """The inverse of `read_trace` (arrival, prompt, max_tokens, id): to replay a run elsewhere."""
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps({"id": r.id, "arrival_s": r.arrival_s,
                                "prompt_token_ids": r.prompt_token_ids,
                                "max_tokens": r.params.max_tokens}) + "\n")
