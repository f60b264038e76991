"""The engine's per-request state: sampling parameters, outputs so far, stop checks, metrics."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxserve.outputs import RequestMetrics, RequestOutput
from jaxserve.sampling_params import SamplingParams


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # the resolved seed (params.seed, or one drawn by the engine)
    metrics: RequestMetrics
    eos_ids: frozenset[int]
    detokenizer: Any = None  # an IncrementalDetokenizer when the model has a tokenizer
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    pending_global_slot: int = -1  # where the step in flight samples this request's next token

    def __post_init__(self):
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(self.prompt_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None

    def append_token(self, token: int, num_output: int, seq_len: int, max_model_len: int
                     ) -> str | None:
        """Takes the newly sampled `token` into the text; returns the finish reason, if any."""
        p = self.params
        if self.detokenizer is not None:
            self.text += self.detokenizer.add(token)
            if p.stop:
                hit = _first_stop(self.text, p.stop)
                if hit is not None:
                    self.text = self.text[:hit]
                    return "stop"
        reason = None
        if (not p.ignore_eos and token in self.eos_ids) or (
                p.stop_token_ids and token in p.stop_token_ids):
            reason = "stop"
        elif num_output >= p.max_tokens or seq_len >= max_model_len:
            reason = "length"
        if reason is not None and self.detokenizer is not None:
            self.text += self.detokenizer.flush()  # an unfinished character shows as U+FFFD
        return reason

    def output(self, token_ids: list[int], finished: bool, error: str | None = None
               ) -> RequestOutput:
        """A snapshot: nothing in it changes when the engine runs on (the lists are copies; the
        logprob dicts are never modified once made)."""
        copy = lambda xs: None if xs is None else list(xs)  # noqa: E731
        metrics = dataclasses.replace(self.metrics, token_times=list(self.metrics.token_times))
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=list(self.prompt_ids), text=self.text, token_ids=list(token_ids),
            finish_reason=self.finish_reason, logprobs=copy(self.logprobs),
            prompt_logprobs=copy(self.prompt_logprobs), metrics=metrics, finished=finished,
            error=error)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
