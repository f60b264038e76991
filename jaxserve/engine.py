"""The host loop: add_request -> schedule -> step -> outputs, plus the engine's metrics.

`Engine.step()` runs one scheduler step through the runner (the device side: params, cache,
executables) and returns a `RequestOutput` snapshot for every request that got a token
(`finished` set on the last one).

Faults stay with their request: when processing one request raises (its detokenization, stop
checks, output), that request alone is finished with `finish_reason="error"` and the message in
`RequestOutput.error`, its pages are freed, and the others go on. When the step itself fails
(the runner raises), the requests of that step are finished the same way. `step()` does not
raise for either; the engine stays usable and nothing is left registered.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
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
from jaxserve.validation import check_number, check_request_id, check_token_ids, show

log = logging.getLogger(__name__)

# Steps the engine remembers for benchmarks (a long-running engine must not grow without bound).
STEP_LOG_LEN = 100_000
# Finished request ids remembered so that `abort` of one is a quiet no-op, not an unknown id.
FINISHED_IDS_REMEMBERED = 100_000


class UnknownRequestError(KeyError, ValueError):
    """`abort` of a request id the engine never had (or finished long ago)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One step, as benchmarks see it (times are time.perf_counter seconds)."""

    kind: str  # "mixed" | "decode"
    num_chunks: int
    num_decodes: int
    scheduled_tokens: int
    dispatched_s: float
    rows: int = 0  # rows the executable computed (its bucket's size): scheduled / rows is useful
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
        self._finished_ids: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._errors: list[RequestOutput] = []  # finished with "error", for the next step()
        # The most recent steps, for benchmarks (bounded: an engine may serve for days).
        self.step_log: collections.deque[StepRecord] = collections.deque(maxlen=step_log_len)
        # Counts (and in tests forbids) compiles while serving; warm-up is outside it.
        self._counter = CompileCounter(strict=strict_compiles)
        self._stats = {"steps": 0, "mixed_steps": 0, "decode_steps": 0, "scheduled_tokens": 0,
                       "slot_tokens": 0, "mixed_scheduled_tokens": 0, "mixed_slot_tokens": 0,
                       "preemptions": 0, "prefix_cache_query_tokens": 0,
                       "prefix_cache_hit_tokens": 0}

    @property
    def backend(self) -> str:
        return self.runner.backend

    # -- requests --------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids,
                    params: SamplingParams | dict | None = None, *, prompt: str | None = None,
                    arrival_time: float | None = None) -> None:
        """Registers a request, or raises ValueError naming the bad value and registers nothing.

        `prompt_token_ids`: a list, tuple or 1-D integer numpy array. `params`: SamplingParams,
        a dict of its fields, or None (the defaults). A request id may be reused once the
        request with that id has finished.
        """
        request_id = check_request_id(request_id)
        if request_id in self._requests:
            raise ValueError(f"request_id={request_id!r} is already running")
        params = SamplingParams.coerce(params)
        ids = self._validate_prompt(request_id, prompt_token_ids)
        self._validate_params(request_id, params)
        start = params.prompt_logprobs_start
        if params.prompt_logprobs is not None and start >= len(ids):
            raise ValueError(f"request {request_id!r}: prompt_logprobs_start={start} is past the "
                             f"prompt's last position {len(ids) - 1}")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"prompt={show(prompt)} must be a string or None")
        if arrival_time is not None:
            arrival_time = check_number("arrival_time", arrival_time)
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**32))
        detok = None
        if self.tokenizer is not None:
            from jaxserve.tokenizer import IncrementalDetokenizer
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids=ids)
        req = Request(
            request_id=request_id, prompt=prompt, prompt_ids=ids, params=params, seed=seed,
            metrics=RequestMetrics(arrival_time=arrival_time or time.perf_counter()),
            eos_ids=self.eos_ids, detokenizer=detok)
        # The logprob of position p comes from row p - 1: the prompt before the first position
        # asked for may come from the prefix cache, no further.
        seq = Sequence(request_id=request_id, prompt_ids=ids, arrival_index=next(self._arrivals),
                       payload=req, max_cached_tokens=max(start - 1, 0)
                       if req.wants_prompt_logprobs else None)
        self._requests[request_id] = seq
        try:
            self.scheduler.add(seq)
        except BaseException:
            del self._requests[request_id]  # all or nothing
            if seq in self.scheduler.waiting:
                self.scheduler.waiting.remove(seq)
            raise
        self._finished_ids.pop(request_id, None)

    def _validate_prompt(self, request_id: str, prompt_token_ids) -> list[int]:
        try:
            ids = check_token_ids("prompt_token_ids", prompt_token_ids)
        except ValueError as e:
            raise ValueError(f"request {request_id!r}: {e}") from None
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

    def _validate_params(self, request_id: str, params: SamplingParams) -> None:
        # The step computes at least one top logprob, but the limit is the configured one.
        limit = min(self.cfg.max_logprobs, self.num_top)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > limit:
                raise ValueError(f"request {request_id!r}: {name}={value} exceeds the engine's "
                                 f"max_logprobs={limit}")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"request {request_id!r}: stop={params.stop!r} needs a tokenizer; "
                             f"this model has none")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def abort(self, request_id: str) -> bool:
        """Stops a request (it gives no further output). True if it was running; False (a no-op)
        if it has already finished, as in vLLM, where an abort may race the last token; an id
        the engine never had raises `UnknownRequestError` (a KeyError and a ValueError)."""
        seq = self._requests.get(request_id) if isinstance(request_id, str) else None
        if seq is None:
            if isinstance(request_id, str) and request_id in self._finished_ids:
                return False
            raise UnknownRequestError(
                f"abort: no request with request_id={show(request_id)} (never added, or "
                f"finished more than {FINISHED_IDS_REMEMBERED} requests ago)")
        seq.payload.finish_reason = "abort"  # an in-flight step's token for it is dropped
        self._retire(seq)
        return True

    def _retire(self, seq: Sequence) -> None:
        """Unregisters a finished request and gives its pages back."""
        if seq.status != SeqStatus.FINISHED:
            self.scheduler.finish(seq)
        del self._requests[seq.request_id]
        self._finished_ids[seq.request_id] = None
        if len(self._finished_ids) > FINISHED_IDS_REMEMBERED:
            self._finished_ids.popitem(last=False)

    def _is_live(self, seq: Sequence) -> bool:
        return self._requests.get(seq.request_id) is seq

    def _fail(self, seq: Sequence, error: BaseException | str) -> None:
        """Finishes a live request with finish_reason="error"; its output goes out with the
        next step's results."""
        if not self._is_live(seq):
            return
        msg = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        if not isinstance(error, str):
            log.error("request %r failed: %s", seq.request_id, msg, exc_info=error)
        req: Request = seq.payload
        req.finish_reason = "error"
        req.metrics.finished_time = time.perf_counter()
        self._retire(seq)
        known = list(itertools.takewhile(lambda t: t != PENDING, seq.output_ids))
        # Built here, not by Request.output: that may be what failed.
        self._errors.append(RequestOutput(
            request_id=req.request_id, prompt=req.prompt, prompt_token_ids=list(req.prompt_ids),
            text=req.text if isinstance(req.text, str) else "", token_ids=known,
            finish_reason="error", logprobs=None, prompt_logprobs=None,
            metrics=dataclasses.replace(req.metrics, token_times=list(req.metrics.token_times)),
            finished=True, error=msg))

    def _fail_all(self, error: BaseException | str) -> None:
        """The scheduler's state cannot be trusted: every live request fails, and a fresh
        scheduler (all pages free) takes over."""
        for seq in list(self._requests.values()):
            self._fail(seq, error)
        self.scheduler = Scheduler(self.cfg)
        self._inflight = None

    # -- one step ------------------------------------------------------------------------------

    def pipelines(self, offline: bool = False) -> bool:
        """Whether `step(offline=offline)` reads back the previous step rather than its own."""
        pipelined = self.cfg.async_scheduling
        return offline if pipelined is None else pipelined

    def step(self, *, offline: bool = False) -> list[RequestOutput]:
        """Schedules and dispatches a step and returns the outputs of the step read back.

        Pipelined (`pipelines()`), this call dispatches step N+1 and then reads back step N: the
        host builds step N+1 while the device still runs step N, and tokens step N samples reach
        step N+1 on the device (`prev_index`), never via the host. Otherwise it reads back the
        step it dispatched, so requests added before the next call join the next step rather
        than the one after it. `offline=True` tells the engine that the caller adds no request
        until everything has finished (with `async_scheduling=None`, the step then pipelines).
        """
        with self._counter:
            try:
                sched = self.scheduler.schedule()
            except Exception as e:  # noqa: BLE001 - an internal fault: contain it
                self._fail_all(e)
                return self._take_errors()
            try:
                launched = self._launch(sched)
            except Exception as e:  # noqa: BLE001 - the step failed: so did its requests
                launched = None
                for seq in [c.seq for c in sched.chunks] + sched.decodes:
                    self._fail(seq, e)
            inflight, self._inflight = self._inflight, None
            results = self._collect(inflight) if inflight else []
            if launched is not None and not self.pipelines(offline):
                results += self._collect(launched)
                inflight, launched = launched, None
        self._inflight = launched
        if (launched is None and inflight is None and not self._errors
                and self.scheduler.has_unfinished()):
            self._fail_all("the scheduler made no progress with requests pending")
        return results + self._take_errors()

    def _take_errors(self) -> list[RequestOutput]:
        errors, self._errors = self._errors, []
        return errors

    def _launch(self, sched) -> _InFlight | None:
        self._stats["preemptions"] += len(sched.preempted)
        self._stats["prefix_cache_query_tokens"] += sched.query_tokens
        self._stats["prefix_cache_hit_tokens"] += sched.hit_tokens
        for seq in sched.preempted:
            seq.payload.metrics.num_preemptions += 1
        if sched.is_empty:
            return None
        mixed = bool(sched.chunks)
        exe, shape = self.runner.pick(sched.chunk_rows, len(sched.decodes), mixed)
        batch, plan = build_batch(sched, shape, self.cfg.max_chunk_seqs)
        now = time.perf_counter()
        for seq in [c.seq for c in sched.chunks] + sched.decodes:
            if seq.payload.metrics.first_scheduled_time is None:
                seq.payload.metrics.first_scheduled_time = now
        out = self.runner.run(exe, batch)
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
            dispatched_s=now, rows=shape.num_tokens))

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
        try:
            tokens = to_host(out.sample.tokens)  # the one transfer every step makes
            t = time.perf_counter()
            self.step_log.append(dataclasses.replace(inflight.record, tokens_back_s=t))
            if plan.chunk_rows:
                self._record_prompt_logprobs(out, plan)
            top = None
            if any(s.seq.payload.logprobs is not None for s in plan.sampled):
                top = tuple(to_host(a) for a in (
                    out.sample.logprobs, out.sample.top_ids, out.sample.top_logprobs))
        except Exception as e:  # noqa: BLE001 - the step's results are lost: so are its requests
            for seq in [s.seq for s in plan.sampled] + [r.seq for r in plan.chunk_rows]:
                self._fail(seq, e)
            return []
        results = []
        for s in plan.sampled:
            if not self._is_live(s.seq):
                continue  # finished by an earlier token while this step was in flight
            try:
                results.append(self._take_token(s, tokens, top, t))
            except Exception as e:  # noqa: BLE001 - this request's fault, not the others'
                self._fail(s.seq, e)
        return results

    def _take_token(self, s, tokens: np.ndarray, top, t: float) -> RequestOutput:
        """Step `s`'s sampled token into its request; the snapshot to hand out."""
        seq, req = s.seq, s.seq.payload
        token = int(tokens[s.index])
        seq.output_ids[s.out_index] = token
        m = req.metrics
        m.token_times.append(t)
        if m.first_token_time is None:
            m.first_token_time = t
        if req.logprobs is not None:
            lp, top_ids, top_lp = top
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
            del seq.output_ids[n_out:]  # drop a token sampled after the stop
        snapshot = req.output(seq.output_ids[:n_out], finished=reason is not None)
        if reason is not None:
            self._retire(seq)  # only once its last output exists
        return snapshot

    def _record_prompt_logprobs(self, out: StepOutput, plan: SlotPlan) -> None:
        lp = to_host(out.prompt_logprobs)
        top_ids = to_host(out.prompt_top_ids)
        top_lp = to_host(out.prompt_top_logprobs)
        for rows in plan.chunk_rows:
            try:
                self._record_chunk_prompt_logprobs(rows, lp, top_ids, top_lp)
            except Exception as e:  # noqa: BLE001 - this request's fault, not the others'
                self._fail(rows.seq, e)

    def _record_chunk_prompt_logprobs(self, rows, lp, top_ids, top_lp) -> None:
        seq, row0, start, length = rows.seq, rows.first_row, rows.first_position, rows.length
        req: Request = seq.payload
        k = req.params.prompt_logprobs
        n_prompt, first = len(seq.prompt_ids), req.params.prompt_logprobs_start
        # Row r predicts position start + r + 1; a recomputed chunk (after preemption)
        # finds its entries filled and leaves them.
        for r in range(row0, row0 + length):
            target_pos = start + (r - row0) + 1
            if (not first <= target_pos < n_prompt
                    or req.prompt_logprobs[target_pos] is not None):
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
        st["batch_invariant"] = self.runner.batch_invariant
        # Of the tokens admitted sequences held (a preempted one counts again when readmitted),
        # the share whose K/V came from the prefix cache; cached_pages: kept, held by nobody.
        st["prefix_cache_hit_rate"] = (
            st["prefix_cache_hit_tokens"] / st["prefix_cache_query_tokens"]
            if st["prefix_cache_query_tokens"] else 0.0)
        st["cached_pages"] = self.scheduler.allocator.num_cached
        return st
