"""What the JSONL binaries (jaxserve-generate, jaxserve-score) share: running the lines of an
input file as engine requests, writing each line's record as it completes (in input order, see
`output_file`), resuming, and SIGINT / SIGTERM.

A line is a `LineJob`: one or more engine requests (a long document is scored in several
windows) and a function that turns their finished outputs into the line's record. A line whose
request the engine refuses is recorded as `{"line": N, "error": "..."}` like a malformed one.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from typing import Callable

import jax
from tqdm.auto import tqdm

from jaxserve.cli import output_file
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams

EXIT_BAD_INPUT, EXIT_LOAD_FAILED = 2, 1


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Signals:
    """SIGINT / SIGTERM: while running, the first one lets the current step finish (so its
    results are written); otherwise, or on a second one, it interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self.deferred = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        self.signum = signum
        if not (self.deferred and first):
            raise Interrupted(signum)


def fail(program: str, code: int, msg) -> None:
    print(f"{program}: error: {msg}", file=sys.stderr)
    sys.exit(code)


def main_with_signals(program: str, body: Callable[[Signals], None]) -> None:
    """Runs `body` with the signal handlers installed; a signal before any output was due
    exits 128 + its number with a message."""
    signals = Signals()
    try:
        body(signals)
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        print(f"{program}: interrupted by {name} before any output was due; nothing written",
              file=sys.stderr)
        sys.exit(128 + e.signum)


@dataclasses.dataclass(frozen=True)
class LineJob:
    number: int  # 1-based input line
    requests: list[tuple[list[int], SamplingParams, str | None]]  # (token ids, params, prompt)
    record: Callable[[list[RequestOutput]], dict]  # the finished outputs -> the line's record


@dataclasses.dataclass
class Plan:
    """What a run has to do once its input is checked and its model loaded."""

    todo: list  # the input lines still to run
    new_errors: dict[int, str]  # bad lines not yet recorded in the output
    num_errors: int  # bad lines in the whole input
    num_done: int  # lines already in the output (a resumed run)
    llm: object  # jaxserve.llm.LLM


def start(program: str, fv, prepare: Callable[[], tuple]) -> Plan | None:
    """Checks the input (`prepare() -> (lines, bad-line errors, done)`; a bad flag or file
    exits 2 before anything loads), reports the plan, then loads the model. None: nothing is
    left to do (said)."""
    try:
        lines, errors, done = prepare()
    except (ValueError, OSError) as e:
        fail(program, EXIT_BAD_INPUT, e)
    todo = [ln for ln in lines if ln.number not in done]
    new_errors = {n: m for n, m in errors.items() if n not in done}
    if not report_plan(fv.output, new_errors, done, len(todo)):
        return None
    return Plan(todo, new_errors, len(errors), len(done), load_llm(program, fv))


def report_plan(output: str | None, errors: dict[int, str], done: dict, num_todo: int) -> bool:
    """Says which lines are skipped and what a resumed run has left; False: nothing to do."""
    for number, msg in sorted(errors.items()):
        print(f"line {number}: skipped: {msg}", file=sys.stderr)
    if done:
        print(f"resuming: {len(done)} line(s) already in {output}, {num_todo} to run",
              file=sys.stderr)
    if not num_todo and not errors and done:
        print("nothing left to do", file=sys.stderr)
        return False
    return True


def load_llm(program: str, fv):
    """The LLM the flags describe (after `jax.distributed.initialize()` with --distributed); a
    model that fails to load exits 1 with the message."""
    if fv.distributed:
        jax.distributed.initialize()  # Cloud TPU pods: every worker runs this same command
    from jaxserve.cli import flags as jflags
    from jaxserve.llm import LLM  # after the checks: importing it is cheap, loading is not

    try:
        return LLM(fv.model, checkpoint=fv.checkpoint,
                   allow_nonfinite_weights=fv.allow_nonfinite_weights,
                   **jflags.engine_options(fv))
    except (ValueError, OSError) as e:
        fail(program, EXIT_LOAD_FAILED, e)


def engine_rows(stats: dict) -> list[tuple[str, str]]:
    """The engine's rows of a CLI's summary table (both CLIs end with them)."""
    return [("Steps", f"{stats['steps']}"),
            ("Batch-invariant (bit-reproducible)", "yes" if stats["batch_invariant"] else "no"),
            ("Executables compiled", f"{stats['executables_compiled']}"),
            ("Compiles after warm-up", f"{stats['compiles_after_warmup']}")]


def run_jobs(program: str, engine, jobs: list[LineJob], errors: dict[int, str], *,
             output: str | None, signals: Signals, num_done: int, desc: str,
             emit: Callable[[dict], None] | None = None) -> list[RequestOutput]:
    """Runs every job's requests; writes each line's record (and each of `errors` as
    `{"line": N, "error": ...}`) as it completes. On SIGINT / SIGTERM: writes what finished,
    says how to resume and exits 128 + the signal. Returns every finished output."""
    errors = dict(errors)
    accepted: dict[str, tuple[LineJob, int]] = {}  # request id -> (its job, its index there)
    for job in jobs:
        ids = ([f"line-{job.number}"] if len(job.requests) == 1
               else [f"line-{job.number}.{k}" for k in range(len(job.requests))])
        added = []
        try:
            for rid, (tokens, params, prompt) in zip(ids, job.requests):
                engine.add_request(rid, tokens, params, prompt=prompt)
                added.append(rid)
        except ValueError as e:
            for rid in added:
                engine.abort(rid)
            errors[job.number] = str(e)
            print(f"line {job.number}: skipped: {e}", file=sys.stderr)
            continue
        accepted.update({rid: (job, k) for k, rid in enumerate(ids)})
    jobs_run = {job.number: job for job, _ in accepted.values()}
    empty = [job.number for job in jobs if not job.requests]
    writer = output_file.OrderedWriter(output, list(jobs_run) + list(errors) + empty, emit=emit,
                                       enabled=jax.process_index() == 0)
    outs: dict[int, list[RequestOutput | None]] = {
        n: [None] * len(job.requests) for n, job in jobs_run.items()}
    left = {n: len(job.requests) for n, job in jobs_run.items()}
    finished = []
    signals.deferred = True
    try:
        for n, msg in errors.items():
            writer.add({"line": n, "error": msg})
        for job in jobs:
            if not job.requests:  # nothing to compute (an empty document)
                writer.add(job.record([]))
        with tqdm(total=len(jobs_run), desc=desc, unit="line", file=sys.stderr) as bar:
            while engine.has_unfinished() and signals.signum is None:
                for out in engine.step(offline=True):  # every line is in: nothing arrives
                    if not out.finished:
                        continue
                    finished.append(out)
                    job, k = accepted[out.request_id]
                    outs[job.number][k] = out
                    left[job.number] -= 1
                    if not left[job.number]:
                        writer.add(job.record(outs.pop(job.number)))
                        bar.update(1)
    except Interrupted:
        pass  # a second signal, or one outside a step: what is finished is still written
    finally:
        writer.close()  # every finished record reaches the file, whatever happened
    if signals.signum is not None:
        where = f"in {output}" if output else "printed"
        total = num_done + len(jobs_run) + len(errors) + len(empty)
        print(f"{program}: interrupted by {signal.Signals(signals.signum).name}: "
              f"{num_done + writer.written} of {total} lines done {where}; rerun the same "
              f"command to resume", file=sys.stderr)
        sys.exit(128 + signals.signum)
    if output and writer.enabled and not output_file.is_sorted(output):
        output_file.sort_file(output)  # an interrupted run wrote some lines early
    return finished
