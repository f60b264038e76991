"""jaxserve-generate: offline generation (and prompt scoring) over a JSONL file of prompts.

  jaxserve-generate                                 # the demo model on a few built-in prompts
  jaxserve-generate --model=DIR --prompts=in.jsonl --output=out.jsonl --temperature=0

Each input line is {"prompt": "..."} or {"prompt_token_ids": [...]}, optionally with any
SamplingParams field ("max_tokens", "temperature", "stop", "logprobs", ...) overriding the flags.
A bad line is reported with its line number and the rest still runs; the output has one line per
input line, in order.
"""

from __future__ import annotations

import json
import sys
import time

import jax
from absl import app, flags

from jaxserve.cli import flags as jflags
from jaxserve.cli.prompt_file import PromptLine, parse_prompt_lines
from jaxserve.llm import LLM, run_to_completion
from jaxserve.metrics import format_table, summarize

flags.DEFINE_string("prompts", None, "JSONL prompt file (default: built-in demo prompts).")
flags.DEFINE_string("output", None, "JSONL output file (default: print completions).")
jflags.define_engine_flags()
jflags.define_sampling_flags()
FLAGS = flags.FLAGS

DEMO_PROMPTS = ["import os\nimport sys\n\n\ndef ", "class ", "    def __init__(self, ",
                "# Copyright", "def read_file(path):\n    \"\"\"", "for i in range("]


def _read_lines() -> list[str]:
    if FLAGS.prompts is None:
        return [json.dumps({"prompt": p}) for p in DEMO_PROMPTS]
    with open(FLAGS.prompts, encoding="utf-8") as f:
        return f.read().splitlines()


def _record(line: PromptLine, out) -> dict:
    rec = {"line": line.number, "prompt": line.prompt, "text": out.text,
           "token_ids": out.token_ids, "finish_reason": out.finish_reason}
    if out.logprobs is not None:
        rec["logprobs"] = [{str(k): v for k, v in d.items()} for d in out.logprobs]
    if out.prompt_logprobs is not None:
        rec["prompt_logprobs"] = [
            None if d is None else {str(k): v for k, v in d.items()} for d in out.prompt_logprobs]
    return rec


def main(argv) -> None:
    del argv
    if FLAGS.distributed:
        jax.distributed.initialize()  # Cloud TPU pods: every worker runs this same command
    llm = LLM(FLAGS.model, checkpoint=FLAGS.checkpoint, **jflags.engine_options(FLAGS))
    engine = llm.engine
    lines, errors = parse_prompt_lines(_read_lines(), jflags.sampling_defaults(FLAGS),
                                       llm.tokenizer)
    t0 = time.perf_counter()
    accepted: dict[str, PromptLine] = {}
    for line in lines:
        rid = f"line-{line.number}"
        try:
            engine.add_request(rid, line.token_ids, line.params, prompt=line.prompt)
            accepted[rid] = line
        except ValueError as e:
            errors[line.number] = str(e)
    for number, msg in sorted(errors.items()):
        print(f"line {number}: skipped: {msg}", file=sys.stderr)
    done = run_to_completion(engine, len(accepted), file=sys.stderr)
    wall = time.perf_counter() - t0
    records = [_record(accepted[rid], out) for rid, out in done.items()]
    records += [{"line": n, "error": msg} for n, msg in errors.items()]
    records.sort(key=lambda r: r["line"])
    if jax.process_index() != 0:
        return  # every host ran the same steps; one writes the results
    if FLAGS.output:
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    else:
        for rec in records:
            if "error" in rec:
                continue
            print(f"----- line {rec['line']} ({rec['finish_reason']})")
            print((rec["prompt"] or "") + rec["text"])
    print(_summary(list(done.values()), wall, engine.stats, len(errors)))


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
