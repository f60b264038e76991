"""What a finished (or streaming) request gives back: `RequestOutput` and its `RequestMetrics`."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock times (time.perf_counter seconds) of one request."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)  # one per output token
    finished_time: float | None = None
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive output tokens (len = output tokens - 1)."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    # "stop" | "length" | "abort" | "error" (processing it raised: `error` says why); None while
    # still running.
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None  # per output token; the sampled token + top-k
    # vLLM's layout: one entry per prompt token, None for the first (it has no prefix).
    prompt_logprobs: list[dict[int, float] | None] | None
    metrics: RequestMetrics
    finished: bool = False
    error: str | None = None  # with finish_reason="error": what went wrong
