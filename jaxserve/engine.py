"""The host loop: add_request -> schedule -> step -> outputs, plus the engine's metrics.

`Engine.step()` runs one scheduler step through the runner (the device side: params, cache,
executables) and returns a `RequestOutput` snapshot for every request that got a token
(`finished` set on the last one).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time

import numpy as np

from jaxserve.attention import AttentionShape
from jaxserve.batching import PENDING, SlotPlan, build_batch
from jaxserve.compile_guard import CompileCounter
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.outputs import RequestMetrics, RequestOutput
from jaxserve.request import Request
from jaxserve.runner import Runner
from jaxserve.sampling_params import SamplingParams
from jaxserve.sharding import to_host
from jaxserve.scheduler import Scheduler, SeqStatus, Sequence
from jaxserve.step import StepOutput

# Steps the engine remembers for benchmarks (a long-running engine must not grow without bound).
STEP_LOG_LEN = 100_000


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One step, as benchmarks see it (times are time.perf_counter seconds)."""

    kind: str  # "mixed" | "decode"
    num_chunks: int
    num_decodes: int
    scheduled_tokens: int
    dispatched_s: float
    tokens_back_s: float = float("nan")


@dataclasses.dataclass(frozen=True)
class _InFlight:
    out: StepOutput
    plan: SlotPlan
    record: StepRecord


class Engine:
    def __init__(self, model_cfg: ModelConfig, params, engine_cfg: EngineConfig = EngineConfig(),
                 tokenizer=None, *, strict_compiles: bool = False,
                 step_log_len: int = STEP_LOG_LEN):
        cfg = engine_cfg.resolve(model_cfg)
        self.model_cfg, self.cfg, self.tokenizer = model_cfg, cfg, tokenizer
        self.runner = Runner(model_cfg, params, cfg)
        self.num_top = self.runner.num_top
        self.scheduler = Scheduler(cfg)
        self.eos_ids = frozenset(model_cfg.eos_token_ids) | frozenset(
            getattr(tokenizer, "eos_token_ids", ()) or ())
        self._rng = np.random.default_rng(cfg.seed)
        self._arrivals = itertools.count()
        self._requests: dict[str, Sequence] = {}
        self._inflight: _InFlight | None = None
        # The most recent steps, for benchmarks (bounded: an engine may serve for days).
        self.step_log: collections.deque[StepRecord] = collections.deque(maxlen=step_log_len)
        # Counts (and in tests forbids) compiles while serving; warm-up is outside it.
        self._counter = CompileCounter(strict=strict_compiles)
        self._stats = {"steps": 0, "mixed_steps": 0, "decode_steps": 0, "scheduled_tokens": 0,
                       "slot_tokens": 0, "mixed_scheduled_tokens": 0, "mixed_slot_tokens": 0,
                       "preemptions": 0}

    @property
    def backend(self) -> str:
        return self.runner.backend

    # -- requests --------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids, params: SamplingParams | None = None,
                    *, prompt: str | None = None, arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        ids = self._validate_prompt(request_id, prompt_token_ids)
        self._validate_params(params)
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**32))
        detok = None
        if self.tokenizer is not None:
            from jaxserve.tokenizer import IncrementalDetokenizer
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids=ids)
        req = Request(
            request_id=request_id, prompt=prompt, prompt_ids=ids, params=params, seed=seed,
            metrics=RequestMetrics(arrival_time=arrival_time or time.perf_counter()),
            eos_ids=self.eos_ids, detokenizer=detok)
        seq = Sequence(request_id=request_id, prompt_ids=ids, arrival_index=next(self._arrivals),
                       payload=req)
        self._requests[request_id] = seq
        self.scheduler.add(seq)

    def _validate_prompt(self, request_id: str, prompt_token_ids) -> list[int]:
        if request_id in self._requests:
            raise ValueError(f"request_id={request_id!r} is already running")
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.model_cfg.vocab_size]
        if bad:
            raise ValueError(f"request {request_id!r}: token id {bad[0]} is outside the "
                             f"vocabulary [0, {self.model_cfg.vocab_size})")
        if len(ids) >= self.cfg.max_model_len:
            raise ValueError(
                f"request {request_id!r}: prompt of {len(ids)} tokens leaves no room to generate "
                f"within max_model_len={self.cfg.max_model_len}")
        return ids

    def _validate_params(self, params: SamplingParams) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.num_top:
                raise ValueError(f"{name}={value} exceeds the engine's max_logprobs="
                                 f"{self.num_top}")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop={params.stop!r} needs a tokenizer; this model has none")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def abort(self, request_id: str) -> None:
        seq = self._requests.pop(request_id)
        seq.payload.finish_reason = "abort"  # an in-flight step's token for it is dropped
        if seq.status != SeqStatus.FINISHED:
            self.scheduler.finish(seq)

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedules and dispatches step N+1, then reads back step N and returns its outputs.

        Dispatch is asynchronous, so the host builds step N+1 while the device still runs step N;
        tokens step N samples reach step N+1 on the device (`prev_index`), never via the host.
        """
        with self._counter:
            launched = self._launch()
            results = self._collect(self._inflight) if self._inflight else []
        self._inflight = launched
        if launched is None and not results and self.scheduler.has_unfinished():
            raise RuntimeError("scheduler made no progress with requests pending")
        return results

    def _launch(self) -> _InFlight | None:
        sched = self.scheduler.schedule()
        self._stats["preemptions"] += len(sched.preempted)
        for seq in sched.preempted:
            seq.payload.metrics.num_preemptions += 1
        if sched.is_empty:
            return None
        mixed = bool(sched.chunks)
        shape = self.runner.shape(mixed)
        batch, plan = build_batch(sched, shape, self.runner.num_global_seqs)
        now = time.perf_counter()
        for seq in [c.seq for c in sched.chunks] + sched.decodes:
            if seq.payload.metrics.first_scheduled_time is None:
                seq.payload.metrics.first_scheduled_time = now
        out = self.runner.run(batch, mixed)
        self._count(mixed, sched.num_tokens, shape)
        for work in sched.chunks:
            work.seq.num_computed += work.length
        for seq in sched.decodes:
            seq.num_computed += 1
        for s in plan.sampled:
            seq, req = s.seq, s.seq.payload
            seq.output_ids.append(PENDING)
            req.pending_global_slot = s.global_index
            # A length limit is known before the token is: stop scheduling the sequence now.
            if (len(seq.output_ids) >= req.params.max_tokens
                    or seq.num_tokens >= self.cfg.max_model_len):
                self.scheduler.finish(seq)
        return _InFlight(out, plan, StepRecord(
            kind="mixed" if mixed else "decode", num_chunks=len(sched.chunks),
            num_decodes=len(sched.decodes), scheduled_tokens=sched.num_tokens,
            dispatched_s=now))

    def _count(self, mixed: bool, scheduled: int, shape: AttentionShape) -> None:
        st = self._stats
        st["steps"] += 1
        st["mixed_steps" if mixed else "decode_steps"] += 1
        st["scheduled_tokens"] += scheduled
        st["slot_tokens"] += shape.num_tokens
        if mixed:
            st["mixed_scheduled_tokens"] += scheduled
            st["mixed_slot_tokens"] += shape.num_tokens

    def _collect(self, inflight: _InFlight) -> list[RequestOutput]:
        out, plan = inflight.out, inflight.plan
        tokens = to_host(out.sample.tokens)  # the one transfer every step makes
        t = time.perf_counter()
        self.step_log.append(dataclasses.replace(inflight.record, tokens_back_s=t))
        if plan.chunk_rows:
            self._record_prompt_logprobs(out, plan)
        if any(s.seq.payload.logprobs is not None for s in plan.sampled):
            lp, top_ids, top_lp = (to_host(a) for a in (
                out.sample.logprobs, out.sample.top_ids, out.sample.top_logprobs))
        results = []
        for s in plan.sampled:
            seq, req = s.seq, s.seq.payload
            if req.finish_reason is not None:
                continue  # finished by an earlier token while this step was in flight
            token = int(tokens[s.index])
            seq.output_ids[s.out_index] = token
            m = req.metrics
            m.token_times.append(t)
            if m.first_token_time is None:
                m.first_token_time = t
            if req.logprobs is not None:
                k = req.params.logprobs
                entry = {int(i): float(v) for i, v in zip(top_ids[s.index, :k],
                                                           top_lp[s.index, :k])}
                entry[token] = float(lp[s.index])
                req.logprobs.append(entry)
            n_out = s.out_index + 1
            reason = req.append_token(token, n_out, len(seq.prompt_ids) + n_out,
                                      self.cfg.max_model_len)
            if reason is not None:
                req.finish_reason = reason
                m.finished_time = t
                if seq.status != SeqStatus.FINISHED:
                    self.scheduler.finish(seq)
                del seq.output_ids[n_out:]  # drop a token sampled after the stop
                del self._requests[seq.request_id]
            results.append(req.output(seq.output_ids[:n_out], finished=reason is not None))
        return results

    def _record_prompt_logprobs(self, out: StepOutput, plan: SlotPlan) -> None:
        lp = to_host(out.prompt_logprobs)
        top_ids = to_host(out.prompt_top_ids)
        top_lp = to_host(out.prompt_top_logprobs)
        for rows in plan.chunk_rows:
            seq, row0, start, length = rows.seq, rows.first_row, rows.first_position, rows.length
            req: Request = seq.payload
            k = req.params.prompt_logprobs
            n_prompt = len(seq.prompt_ids)
            # Row r predicts position start + r + 1; a recomputed chunk (after preemption)
            # finds its entries filled and leaves them.
            for r in range(row0, row0 + length):
                target_pos = start + (r - row0) + 1
                if target_pos >= n_prompt or req.prompt_logprobs[target_pos] is not None:
                    continue
                entry = {int(i): float(v) for i, v in zip(top_ids[r, :k], top_lp[r, :k])}
                entry[seq.prompt_ids[target_pos]] = float(lp[r])
                req.prompt_logprobs[target_pos] = entry

    # -- metrics -----------------------------------------------------------------------------

    @property
    def stats(self) -> dict:
        st = dict(self._stats)
        st["executables_compiled"] = self.runner.executables_compiled
        st["compiles_after_warmup"] = self._counter.count
        st["startup_compile_s"] = self.runner.startup_compile_s
        st["useful_token_fraction"] = (
            st["scheduled_tokens"] / st["slot_tokens"] if st["slot_tokens"] else 0.0)
        st["mixed_useful_token_fraction"] = (
            st["mixed_scheduled_tokens"] / st["mixed_slot_tokens"]
            if st["mixed_slot_tokens"] else 0.0)
        st["attention_backend"] = self.backend
        return st
