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
import time

from absl import app, flags

from jaxserve.cli import flags as jflags
from jaxserve.cli import line_runner, output_file
from jaxserve.cli.line_runner import LineJob, Signals
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
PROGRAM = "jaxserve-generate"


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
    jflags.checked_engine_config(FLAGS, ModelConfig.from_pretrained(path))  # refuses bad flags
    tokenizer = (Tokenizer.from_pretrained(path)
                 if os.path.isfile(os.path.join(path, "tokenizer.json")) else None)
    lines, errors = parse_prompt_lines(raw, defaults, tokenizer)
    done = {}
    if FLAGS.output:
        done = output_file.read_done(FLAGS.output, raw, {ln.number: ln.prompt for ln in lines})
    return lines, errors, done


def main(argv) -> None:
    del argv
    line_runner.main_with_signals(PROGRAM, _main)


def _main(signals: Signals) -> None:
    plan = line_runner.start(PROGRAM, FLAGS, _prepare)
    if plan is None:
        return
    t0 = time.perf_counter()
    jobs = [LineJob(ln.number, [(ln.token_ids, ln.params, ln.prompt)],
                    lambda outs, ln=ln: _record(ln, outs[0])) for ln in plan.todo]
    finished = line_runner.run_jobs(PROGRAM, plan.llm.engine, jobs, plan.new_errors,
                                    output=FLAGS.output, signals=signals,
                                    num_done=plan.num_done, desc="generate",
                                    emit=_print_record)
    wall = time.perf_counter() - t0
    print(_summary([o for o in finished if o.finish_reason != "error"], wall,
                   plan.llm.engine.stats, plan.num_errors))


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
        ("Attention backend", f"{stats['attention_backend']}"),
        *line_runner.engine_rows(stats),
        ("Start-up compile (s)", f"{stats['startup_compile_s']:.1f}"),
        ("Useful-token fraction", f"{stats['useful_token_fraction']:.3f}"),
        ("Preemptions", f"{stats['preemptions']}"),
    ]
    return format_table(rows, " jaxserve-generate ")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
