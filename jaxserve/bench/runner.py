"""Drives an `Engine` on the real clock and times every step.

A request is added once `time.perf_counter()` passes its arrival, with that arrival as its
`arrival_time` (so a request that comes while a step runs is charged the wait, as a server's
would be), and the engine is stepped while anything is in flight or waiting. An anchored request
(`after_first_tokens_of`) arrives `arrival_s` after its anchors all have their first token.

Step timing. Pipelined (`Engine.pipelines`; by default once every request is in), `Engine.step()`
dispatches step k and then reads back step k-1, so the device runs the steps back to back while the host plans the next one. The call that
launched step k returns when step k-1's tokens are back, i.e. when the device starts step k; the
next call returns when step k's tokens are back. So step k takes from the end of the call that
launched it to the end of the next call, and its tokens are that next call's outputs. Otherwise
a step takes the whole call that launched it (the host's planning included) and its tokens are
that call's outputs. Whether step k was mixed (it had
prompt chunks) or decode-only, and how many tokens it scheduled, comes from the deltas of
`engine.stats` across the call that launched it.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from tqdm.auto import tqdm

from jaxserve.bench.workloads import BenchRequest
from jaxserve.outputs import RequestOutput


@dataclasses.dataclass(frozen=True)
class StepTiming:
    kind: str  # "mixed" (prompt chunks, maybe decodes) | "decode" (decode-only executable)
    start_s: float  # seconds after the run starts
    end_s: float
    scheduled_tokens: int  # real tokens computed (prompt-chunk tokens + decode tokens)
    slot_tokens: int  # tokens the executable computed, padding included
    sampled: int  # tokens that came back (decodes + prompts' first tokens)
    decode_tokens: int  # of those, decode tokens (a request's 2nd token on)
    decode_context_tokens: int  # sum of the decode tokens' context lengths (K/V read)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclasses.dataclass
class RunResult:
    requests: list[BenchRequest]
    outputs: dict[str, RequestOutput]  # request id -> its final output
    steps: list[StepTiming]
    t0: float  # perf_counter at the run's start; every *_s above is relative to it
    wall_s: float  # start -> last token
    stats: dict  # engine.stats deltas over the run (counts), and the engine's totals

    def ordered_outputs(self) -> list[RequestOutput]:
        return [self.outputs[r.id] for r in self.requests]


_COUNTS = ("steps", "mixed_steps", "decode_steps", "scheduled_tokens", "slot_tokens",
           "mixed_scheduled_tokens", "mixed_slot_tokens", "preemptions")


def run(engine, requests: list[BenchRequest], *, desc: str = "bench", progress: bool = True,
        clock=time.perf_counter, sleep=time.sleep) -> RunResult:
    """Replays `requests` against `engine` on the real clock; returns every output and step."""
    ids = [r.id for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("request ids must be unique within a run")
    unanchored = {r.id for r in requests if not r.after_first_tokens_of}
    for r in requests:
        bad = [a for a in r.after_first_tokens_of if a not in unanchored]
        if bad:
            raise ValueError(f"request {r.id!r} is anchored on {bad[0]!r}, which is not an "
                             "unanchored request of this run")
    before = engine.stats
    outputs: dict[str, RequestOutput] = {}
    first_token: dict[str, float] = {}
    steps: list[StepTiming] = []
    launched: dict | None = None  # the step in flight: its kind, counts and start
    waiting = sorted(requests, key=lambda r: r.arrival_s)
    bar = tqdm(total=len(requests), desc=desc, unit="req", file=sys.stderr, disable=not progress,
               leave=True)
    t0 = clock()
    last_token = t0

    def due(r: BenchRequest) -> float | None:
        """Absolute arrival time; None while its anchor requests still lack a first token."""
        if not r.after_first_tokens_of:
            return t0 + r.arrival_s
        if any(a not in first_token for a in r.after_first_tokens_of):
            return None
        return max(first_token[a] for a in r.after_first_tokens_of) + r.arrival_s

    with bar:
        while waiting or engine.has_unfinished():
            now = clock()
            times = [(due(r), r) for r in waiting]
            ready = sorted((t, i) for i, (t, _) in enumerate(times) if t is not None and t <= now)
            for t, i in ready:
                r = times[i][1]
                engine.add_request(r.id, r.prompt_token_ids, r.params, arrival_time=t)
            if ready:
                added = {i for _, i in ready}
                waiting = [r for i, (_, r) in enumerate(times) if i not in added]
            if not engine.has_unfinished():
                if not waiting:
                    break
                known = [t for t, _ in times if t is not None]
                sleep(max(0.0, min(known) - clock()))
                continue
            # Once every request is in, nothing can arrive: the engine may pipeline.
            pipelined = engine.pipelines(offline=not waiting)
            st0 = engine.stats
            start = clock()
            outs = engine.step(offline=not waiting)
            end = clock()
            st1 = engine.stats
            if launched is not None:
                steps.append(_finish_step(launched, outs, end - t0))
                launched = None
            if st1["steps"] > st0["steps"]:
                launched = {
                    "kind": "mixed" if st1["mixed_steps"] > st0["mixed_steps"] else "decode",
                    "start_s": (end if pipelined else start) - t0,
                    "scheduled_tokens": st1["scheduled_tokens"] - st0["scheduled_tokens"],
                    "slot_tokens": st1["slot_tokens"] - st0["slot_tokens"]}
                if not pipelined:  # read back in the call that launched it
                    steps.append(_finish_step(launched, outs, end - t0))
                    launched = None
            for out in outs:
                first_token.setdefault(out.request_id, out.metrics.first_token_time)
                last_token = max(last_token, out.metrics.token_times[-1])
                if out.finished:
                    outputs[out.request_id] = out
                    bar.update(1)
    after = engine.stats
    stats = dict(after)
    stats.update({k: after[k] - before[k] for k in _COUNTS})
    stats["useful_token_fraction"] = (
        stats["scheduled_tokens"] / stats["slot_tokens"] if stats["slot_tokens"] else 0.0)
    stats["mixed_useful_token_fraction"] = (
        stats["mixed_scheduled_tokens"] / stats["mixed_slot_tokens"]
        if stats["mixed_slot_tokens"] else 0.0)
    missing = [i for i in ids if i not in outputs]
    assert not missing, f"requests never finished: {missing[:5]}"
    ordered = sorted(requests, key=lambda r: outputs[r.id].metrics.arrival_time)
    return RunResult(requests=ordered, outputs=outputs, steps=steps, t0=t0,
                     wall_s=last_token - t0, stats=stats)


def _finish_step(launched: dict, outs: list[RequestOutput], end_s: float) -> StepTiming:
    decodes = [o for o in outs if len(o.token_ids) > 1]
    # The token a decode samples is the request's n-th; the step attended over prompt + n-1.
    context = sum(len(o.prompt_token_ids) + len(o.token_ids) - 1 for o in decodes)
    return StepTiming(end_s=end_s, sampled=len(outs), decode_tokens=len(decodes),
                      decode_context_tokens=context, **launched)


def warm_up(engine, vocab_size: int, prompt_len: int, max_tokens: int = 8) -> dict:
    """Throw-away requests through both executables; returns the timings of the last one.

    The first pass pays the one-time costs (first touch of the buffers, thread pools); the second
    is the calibration: {"prefill_s": its time to first token, "decode_step_s": its median
    inter-token gap}.
    """
    from jaxserve.sampling_params import SamplingParams

    prompt = [(7 * i + 1) % vocab_size for i in range(prompt_len)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=0)
    for _ in range(2):
        res = run(engine, [BenchRequest("warmup", 0.0, prompt, params)], progress=False)
    m = res.outputs["warmup"].metrics
    itls = sorted(m.itls)
    return {"prefill_s": m.ttft, "decode_step_s": itls[len(itls) // 2] if itls else m.ttft}
