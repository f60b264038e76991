"""jaxserve-generate: offline generation (and prompt scoring) over a JSONL file of prompts.

  jaxserve-generate                                 # the demo model on a few built-in prompts
  jaxserve-generate --model=DIR --prompts=in.jsonl --output=out.jsonl --temperature=0

Each input line is {"prompt": "..."} or {"prompt_token_ids": [...]}, optionally with any
SamplingParams field ("max_tokens", "temperature", "stop", "logprobs", ...) overriding the flags.
A bad line (bad JSON, bad UTF-8, a bad value) is reported with its line number, recorded in the
output as {"line": N, "error": "..."}, and the rest still runs. Output lines are written as they
complete, in input order; Ctrl-C (SIGINT) or SIGTERM writes everything finished and exits (130 /
143); rerunning with the same --output resumes where it stopped. Flags and the input are checked
before the model loads: a bad one exits with 2 and a message, a model that fails to load with 1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import jax
from absl import app, flags
from tqdm.auto import tqdm

from jaxserve.cli import flags as jflags
from jaxserve.cli import output_file
from jaxserve.cli.prompt_file import PromptLine, parse_prompt_lines, read_lines
from jaxserve.metrics import format_table, summarize

flags.DEFINE_string("prompts", None, "JSONL prompt file (default: built-in demo prompts).")
flags.DEFINE_string("output", None, "JSONL output file (default: print completions). If it "
                    "exists, the run resumes: lines it already answers are skipped.")
flags.DEFINE_boolean("allow_nonfinite_weights", False,
                     "Load weights that hold NaN or Inf (debugging only; refused by default).")
jflags.define_engine_flags()
jflags.define_sampling_flags()
FLAGS = flags.FLAGS

DEMO_PROMPTS = ["import os\nimport sys\n\n\ndef ", "class ", "    def __init__(self, ",
                "# Copyright", "def read_file(path):\n    \"\"\"", "for i in range("]
EXIT_BAD_INPUT, EXIT_LOAD_FAILED = 2, 1


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """SIGINT / SIGTERM: while generating, the first one lets the current step finish (so its
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


def _fail(code: int, msg) -> None:
    print(f"jaxserve-generate: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _read_lines() -> list[bytes]:
    if FLAGS.prompts is None:
        return [json.dumps({"prompt": p}).encode() for p in DEMO_PROMPTS]
    return read_lines(FLAGS.prompts)


def _record(line: PromptLine, out) -> dict:
    rec = {"line": line.number, "prompt": line.prompt, "text": out.text,
           "token_ids": out.token_ids, "finish_reason": out.finish_reason}
    if out.finish_reason == "error":
        rec["error"] = out.error
    if out.logprobs is not None:
        rec["logprobs"] = [{str(k): v for k, v in d.items()} for d in out.logprobs]
    if out.prompt_logprobs is not None:
        rec["prompt_logprobs"] = [
            None if d is None else {str(k): v for k, v in d.items()} for d in out.prompt_logprobs]
    return rec


def _print_record(rec: dict) -> None:
    if "text" not in rec:
        return  # a bad line: reported on stderr
    print(f"----- line {rec['line']} ({rec['finish_reason']})")
    print((rec["prompt"] or "") + rec["text"])


def _prepare():
    """Everything that can be checked before the model loads: flags, input, earlier output."""
    from jaxserve.config import ModelConfig
    from jaxserve.llm import DEMO_MODEL_PATH
    from jaxserve.tokenizer import Tokenizer

    defaults = jflags.sampling_defaults(FLAGS)
    if FLAGS.output and os.path.isdir(FLAGS.output):
        raise ValueError(f"--output={FLAGS.output!r} is a directory")
    raw = _read_lines()
    path = FLAGS.model or DEMO_MODEL_PATH
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model={path!r}: no such folder")
    cfg = jflags.checked_engine_config(FLAGS, ModelConfig.from_pretrained(path))
    tokenizer = (Tokenizer.from_pretrained(path)
                 if os.path.isfile(os.path.join(path, "tokenizer.json")) else None)
    lines, errors = parse_prompt_lines(raw, defaults, tokenizer)
    done = {}
    if FLAGS.output:
        done = output_file.read_done(FLAGS.output, raw, {ln.number: ln.prompt for ln in lines})
    return cfg, raw, lines, errors, done


def main(argv) -> None:
    del argv
    signals = _Signals()
    try:
        _main(signals)
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        print(f"jaxserve-generate: interrupted by {name} before any output was due; nothing "
              f"written", file=sys.stderr)
        sys.exit(128 + e.signum)


def _main(signals: _Signals) -> None:
    try:
        cfg, raw, lines, errors, done = _prepare()
    except (ValueError, OSError) as e:
        _fail(EXIT_BAD_INPUT, e)
    todo = [ln for ln in lines if ln.number not in done]
    new_errors = {n: m for n, m in errors.items() if n not in done}
    for number, msg in sorted(new_errors.items()):
        print(f"line {number}: skipped: {msg}", file=sys.stderr)
    if done:
        print(f"resuming: {len(done)} line(s) already in {FLAGS.output}, {len(todo)} to run",
              file=sys.stderr)
    if not todo and not new_errors and done:
        print("nothing left to do", file=sys.stderr)
        return
    if FLAGS.distributed:
        jax.distributed.initialize()  # Cloud TPU pods: every worker runs this same command
    from jaxserve.llm import LLM  # after the checks: importing it is cheap, loading is not
    try:
        llm = LLM(FLAGS.model, checkpoint=FLAGS.checkpoint,
                  allow_nonfinite_weights=FLAGS.allow_nonfinite_weights,
                  **jflags.engine_options(FLAGS))
    except (ValueError, OSError) as e:
        _fail(EXIT_LOAD_FAILED, e)
    engine = llm.engine
    t0 = time.perf_counter()
    accepted: dict[str, PromptLine] = {}
    for line in todo:
        rid = f"line-{line.number}"
        try:
            engine.add_request(rid, line.token_ids, line.params, prompt=line.prompt)
            accepted[rid] = line
        except ValueError as e:
            new_errors[line.number] = str(e)
            print(f"line {line.number}: skipped: {e}", file=sys.stderr)
    writer = output_file.OrderedWriter(
        FLAGS.output, [ln.number for ln in accepted.values()] + list(new_errors),
        emit=_print_record, enabled=jax.process_index() == 0)
    finished = []
    signals.deferred = True
    try:
        for n, msg in new_errors.items():
            writer.add({"line": n, "error": msg})
        with tqdm(total=len(accepted), desc="generate", unit="req", file=sys.stderr) as bar:
            while engine.has_unfinished() and signals.signum is None:
                for out in engine.step():
                    if out.finished:
                        finished.append(out)
                        writer.add(_record(accepted[out.request_id], out))
                        bar.update(1)
    except Interrupted:
        pass  # a second signal, or one outside a step: what is finished is still written
    finally:
        writer.close()  # every finished record reaches the file, whatever happened
    if signals.signum is not None:
        where = f"in {FLAGS.output}" if FLAGS.output else "printed"
        print(f"jaxserve-generate: interrupted by {signal.Signals(signals.signum).name}: "
              f"{len(done) + writer.written} of {len(done) + len(accepted) + len(new_errors)} "
              f"lines done {where}; rerun the same command to resume", file=sys.stderr)
        sys.exit(128 + signals.signum)
    if FLAGS.output and writer.enabled and not output_file.is_sorted(FLAGS.output):
        output_file.sort_file(FLAGS.output)  # an interrupted run wrote some lines early
    wall = time.perf_counter() - t0
    print(_summary([o for o in finished if o.finish_reason != "error"], wall, engine.stats,
                   len(errors)))


def _summary(outputs, wall: float, stats: dict, num_errors: int) -> str:
    s = summarize(outputs, wall)
    rows = [
        ("Requests", f"{s['requests']}"), ("Bad lines skipped", f"{num_errors}"),
        ("Prompt tokens", f"{s['prompt_tokens']}"), ("Output tokens", f"{s['output_tokens']}"),
        ("Wall time (s)", f"{wall:.2f}"),
        ("Output tokens/s", f"{s['output_throughput_tok_s']:.1f}"),
        ("Total tokens/s", f"{s['total_throughput_tok_s']:.1f}"),
        ("TTFT median (ms)", f"{s['ttft_ms']['median']:.1f}"),
        ("TTFT P99 (ms)", f"{s['ttft_ms']['p99']:.1f}"),
        ("ITL median (ms)", f"{s['itl_ms']['median']:.1f}"),
        ("ITL P99 (ms)", f"{s['itl_ms']['p99']:.1f}"),
        ("Steps", f"{stats['steps']}"),
        ("Attention backend", f"{stats['attention_backend']}"),
        ("Executables compiled", f"{stats['executables_compiled']}"),
        ("Compiles after warm-up", f"{stats['compiles_after_warmup']}"),
        ("Start-up compile (s)", f"{stats['startup_compile_s']:.1f}"),
        ("Useful-token fraction", f"{stats['useful_token_fraction']:.3f}"),
        ("Preemptions", f"{stats['preemptions']}"),
    ]
    return format_table(rows, " jaxserve-generate ")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
