"""The whole benchmark as one function: measure the machine, build the workload, run it in each
mode (chunked, and with `compare_chunking` unchunked too) on a warmed-up engine, and assemble the
report. The CLI maps flags onto `BenchOptions`; the tests call `run_benchmark` directly.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import sys
from typing import Callable

from jaxserve.bench import report as rep
from jaxserve.bench import roofline, runner, workloads
from jaxserve.bench.score_workload import ScoreJob
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.metrics import goodput

PEERS = (None, "hf", "vllm")


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """Every benchmark setting and its default (the CLI's flags take theirs from here)."""

    workload: str = "offline"
    num_prompts: int = 16
    input_len: int = 256
    output_len: int = 64
    range_ratio: float = 0.0
    request_rate: float = math.inf  # online: Poisson rate, requests/s (inf: all at once)
    num_streams: int = 8  # interference: short prompts decoding from the start ...
    stream_prompt_len: int = 32  # ... each this long, producing --output_len tokens
    num_long_prompts: int = 4  # ... while this many long prompts arrive
    long_prompt_len: int = 1536  # 6 chunks of the default 256
    long_output_len: int = 16
    long_prompt_interval_s: float = 0.0  # 0: spread over the streams' decodes (calibrated)
    trace_file: str | None = None
    score_job: ScoreJob = dataclasses.field(default_factory=ScoreJob)  # workload=score
    compare_chunking: bool = False
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    seed: int = 0  # of the random workloads
    peer: str | None = None  # "hf" | "vllm"
    vllm_python: str | None = None  # peer=vllm: the venv's python (None: $JAXSERVE_VLLM_PYTHON...)
    matmul_n: int = 0  # 0: the platform's default GEMM size
    copy_bytes: int = 0  # 0: the platform's default copy size
    progress: bool = True

    def __post_init__(self):
        if self.workload not in workloads.WORKLOADS:
            raise ValueError(f"workload={self.workload!r} must be one of {workloads.WORKLOADS}")
        if self.workload == "trace" and not self.trace_file:
            raise ValueError("workload=trace needs a trace_file")
        if self.peer not in PEERS:
            raise ValueError(f"peer={self.peer!r} must be one of {PEERS[1:]} or unset")
        if self.workload == "score" and self.compare_chunking:
            raise ValueError("workload=score compares the prefix cache on and off, not "
                             "chunking; drop --compare_chunking")
        if self.workload == "score" and self.peer == "hf":
            raise ValueError("workload=score has no Hugging Face peer; use --peer=vllm")
        for name in ("num_prompts", "input_len", "output_len", "num_streams",
                     "stream_prompt_len", "num_long_prompts", "long_prompt_len",
                     "long_output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.long_prompt_interval_s < 0:
            raise ValueError(f"long_prompt_interval_s={self.long_prompt_interval_s!r} "
                             "must be >= 0 (0 = automatic)")


def make_workload(opts: BenchOptions, vocab_size: int, sampling: dict,
                  calibration: dict | None = None, log: Callable = print
                  ) -> list[workloads.BenchRequest]:
    """The requests of `opts.workload`. Interference arrivals need `calibration` (from
    `runner.warm_up`) unless an interval is given; without either they are placeholders."""
    o = opts
    if o.workload == "offline":
        return workloads.offline(o.num_prompts, o.input_len, o.output_len, o.range_ratio,
                                 vocab_size, o.seed, sampling)
    if o.workload == "online":
        return workloads.online(o.num_prompts, o.input_len, o.output_len, o.range_ratio,
                                vocab_size, o.seed, o.request_rate, sampling)
    if o.workload == "interference":
        if o.long_prompt_interval_s:
            arrivals = [(k + 1) * o.long_prompt_interval_s for k in range(o.num_long_prompts)]
        elif calibration:
            # After their first tokens the streams decode for ~output_len decode steps.
            span = o.output_len * calibration["decode_step_s"]
            arrivals = workloads.spread_arrivals(o.num_long_prompts, 0.0, span)
        else:
            arrivals = [0.0] * o.num_long_prompts
        return workloads.interference(
            o.num_streams, o.stream_prompt_len, o.output_len, o.num_long_prompts,
            o.long_prompt_len, o.long_output_len, arrivals, vocab_size, o.seed, sampling)
    reqs, errors = workloads.read_trace(o.trace_file, vocab_size, sampling)
    for number, msg in sorted(errors.items()):
        log(f"{o.trace_file}:{number}: skipped: {msg}")
    if not reqs:
        raise ValueError(f"trace {o.trace_file!r} has no valid request")
    return reqs


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def mode_config(mode: str, engine_options: dict, need: int, model_cfg: ModelConfig
                ) -> EngineConfig:
    """The engine of one mode. Unchunked (chunk_size=0) prefills every prompt whole, in a chunk
    region of max_model_len tokens, so max_model_len is sized to the workload (its longest prompt
    + output) unless given. Everything else, max_chunk_seqs included, stays as given: several
    whole prompts may share a step, as in vLLM without chunked prefill, so chunking is the only
    difference between the modes."""
    from jaxserve.llm import engine_config

    if mode == "chunked":
        if not engine_options.get("chunk_size"):
            raise ValueError("chunked mode needs chunk_size > 0")
        return engine_config(**engine_options)
    page = engine_options.get("page_size") or EngineConfig.page_size
    max_len = engine_options.get("max_model_len") or min(
        _round_up(need, page), model_cfg.max_position_embeddings)
    return engine_config(**{**engine_options, "chunk_size": 0, "max_model_len": max_len})


def _check_lengths(reqs, max_model_len: int, mode: str) -> None:
    for r in reqs:
        if r.prompt_len + r.params.max_tokens > max_model_len:
            raise ValueError(
                f"request {r.id!r}: prompt {r.prompt_len} + max_tokens {r.params.max_tokens} "
                f"exceeds the {mode} engine's max_model_len={max_model_len}")


def run_benchmark(opts: BenchOptions, model_cfg: ModelConfig, params, engine_options: dict,
                  sampling: dict | None = None, *, model_path: str | None = None,
                  engines: dict | None = None, log: Callable | None = None,
                  vllm: dict | None = None) -> dict:
    """Runs the benchmark; returns the report (see `report` for its shape).

    `engines` caches built engines by config across calls (tests reuse them; every build
    compiles), `log` takes the progress messages (default: stderr), `vllm` is what
    `check_vllm` returned if the caller already checked (peer=vllm).
    """
    from jaxserve.engine import Engine

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if opts.workload == "score":  # pairs through LLM.score, not requests on the clock
        from jaxserve.bench.score_bench import run_score_benchmark
        if opts.peer == "vllm" and vllm is None:
            vllm = check_vllm(opts, model_path, log)
        return run_score_benchmark(opts, model_cfg, params, engine_options,
                                   model_path=model_path, engines=engines, log=log, vllm=vllm)
    keep_engines = engines is not None
    engines = {} if engines is None else engines
    sampling = dict(sampling or {})
    dtype = engine_options.get("dtype") or EngineConfig.dtype
    chunked = bool(engine_options.get("chunk_size"))
    if opts.compare_chunking and not chunked:
        raise ValueError("--compare_chunking needs --chunk_size > 0 (the chunked side)")
    modes = ["chunked", "unchunked"] if opts.compare_chunking else (
        ["chunked"] if chunked else ["unchunked"])

    if opts.peer == "vllm" and vllm is None:
        vllm = check_vllm(opts, model_path, log)
    reqs = make_workload(opts, model_cfg.vocab_size, sampling, log=log)
    need = max(r.prompt_len + r.params.max_tokens for r in reqs)
    if need > model_cfg.max_position_embeddings:
        raise ValueError(f"the workload needs {need} positions (prompt + output) but the model "
                         f"has max_position_embeddings={model_cfg.max_position_embeddings}")
    machine = roofline.measure_machine(dtype, matmul_n=opts.matmul_n, copy_bytes=opts.copy_bytes)
    log(f"machine: {machine['matmul_gflops']:.1f} GFLOP/s (GEMM), "
        f"{machine['mem_gbps']:.1f} GB/s (copy) on {machine['device_kind']}")
    costs = roofline.model_costs(model_cfg, dtype)
    slots = engine_options.get("max_decode_slots") or EngineConfig.max_decode_slots
    if opts.workload == "interference" and opts.num_streams + opts.num_long_prompts > slots:
        log(f"warning: {opts.num_streams} streams + {opts.num_long_prompts} long prompts exceed "
            f"max_decode_slots={slots}: a long prompt then waits for a stream to finish instead "
            "of interfering with it")
    runs = []
    timings = []  # each run's (steps, prompt lengths, devices): rooflines once measured again
    first_tokens: dict[str, list[int]] = {}  # the first run's outputs (vLLM's agreement check)
    for i, mode in enumerate(modes):
        cfg = mode_config(mode, engine_options, need, model_cfg)
        _check_lengths(reqs, cfg.resolve(model_cfg).max_model_len, mode)  # before compiling
        if cfg not in engines:
            log(f"{mode}: building the engine (compiles every executable) ...")
            engines[cfg] = Engine(model_cfg, params, cfg)
        engine = engines[cfg]
        calib = runner.warm_up(engine, model_cfg.vocab_size,
                               prompt_len=max(1, min(32, engine.cfg.max_model_len - 9)))
        if i == 0 and opts.workload == "interference":  # the same arrivals for every mode
            reqs = make_workload(opts, model_cfg.vocab_size, sampling, calib, log=log)
            log("interference: long prompts arrive "
                + ", ".join(f"{r.arrival_s:.2f}" for r in reqs if r.after_first_tokens_of)
                + " s after every stream has its first token")
        result = runner.run(engine, reqs, desc=f"{opts.workload} {mode}",
                            progress=opts.progress)
        timings.append((result.steps, [r.prompt_len for r in reqs],
                        _mesh_devices(engine.cfg)))
        good = None
        if opts.slo_ttft_ms is not None or opts.slo_tpot_ms is not None:
            good = goodput(result.ordered_outputs(), result.wall_s, opts.slo_ttft_ms,
                           opts.slo_tpot_ms)
        runs.append(rep.run_json(mode, engine.cfg, result, None, good))  # roofline below
        if i == 0:
            first_tokens = {o.request_id: list(o.token_ids) for o in result.ordered_outputs()}
        if not keep_engines:  # free its cache and params before the next mode's engine
            del engines[cfg], engine, result
            gc.collect()
    # The machine again, after the runs: the higher of each rate is the peak (see best_machine).
    machine = roofline.best_machine(machine, roofline.measure_machine(
        dtype, matmul_n=opts.matmul_n, copy_bytes=opts.copy_bytes))
    for run, (steps, lens, devices) in zip(runs, timings):
        run["roofline"] = roofline.roofline(steps, lens, costs, machine, devices=devices)
    out = {"workload": opts.workload, "config": dataclasses.asdict(opts),
           "model": {"path": model_path, "params": costs["params"],
                     **dataclasses.asdict(model_cfg)},
           "sampling": sampling, "machine": machine, "runs": runs}
    if len(runs) == 2:
        out["comparison"] = {"numerator": runs[0]["mode"], "denominator": runs[1]["mode"],
                             "ratios": rep.comparison(runs[0], runs[1])}
    if opts.peer == "hf":
        out["peer"] = _run_peer(opts, model_path, reqs, engine_options, dtype, log)
    elif opts.peer == "vllm":
        out["peer"] = _run_vllm(opts, vllm, model_path, reqs, runs, first_tokens,
                                model_cfg.vocab_size, log)
    return out


def _mesh_devices(cfg: EngineConfig) -> int:
    mesh_shape = getattr(cfg, "mesh_shape", "")
    if not mesh_shape:
        return 1
    from jaxserve.sharding import parse_mesh_shape
    return math.prod(parse_mesh_shape(mesh_shape).values())


def _run_peer(opts, model_path, reqs, engine_options, dtype, log) -> dict:
    from jaxserve.bench import peer

    ok, why = peer.hf_available()
    if not ok:
        log(f"peer skipped: {why}")
        return {"name": "hf", "skipped": why}
    if model_path is None:
        why = "the peer loads the checkpoint from a folder; none was given"
        log(f"peer skipped: {why}")
        return {"name": "hf", "skipped": why}
    batch = engine_options.get("max_decode_slots") or EngineConfig.max_decode_slots
    log(f"peer: Hugging Face generate, static batches of {batch} ...")
    return peer.run_hf(model_path, reqs, batch_size=batch, dtype=dtype, progress=opts.progress)


def check_vllm(opts, model_path, log) -> dict:
    """Before any jaxserve run: the vLLM venv's python and version, or VllmUnavailable (a
    ValueError naming what to install)."""
    from jaxserve.bench import vllm_peer

    if model_path is None:
        raise ValueError("--peer=vllm loads the checkpoint from a folder; none was given")
    with open(os.path.join(model_path, "config.json"), encoding="utf-8") as f:
        if "model_type" not in json.load(f):
            raise ValueError(f"--peer=vllm: {model_path}/config.json has no \"model_type\", "
                             "which vLLM needs to pick the architecture")
    python = vllm_peer.find_python(opts.vllm_python)
    log(f"peer: checking vLLM under {python} ...")
    version = vllm_peer.probe(python)
    log(f"peer: vLLM {version}")
    return {"python": python, "version": version}


def _run_vllm(opts, vllm, model_path, reqs, runs, first_tokens, vocab_size, log) -> dict:
    """vLLM on the same requests (see vllm_peer); its run in the layout of jaxserve's."""
    from jaxserve.bench import vllm_peer

    first = runs[0]
    args = vllm_peer.engine_args(first["engine"])
    prompt_len = max(1, min(32, first["engine"]["max_model_len"] - 9))  # as runner.warm_up
    job = {"model": os.path.abspath(model_path), "engine": args,
           "warmup": {"prompt_token_ids": [(7 * i + 1) % vocab_size for i in range(prompt_len)],
                      "max_tokens": 8},
           "requests": vllm_peer.vllm_requests(reqs, first)}
    log(f"peer: vLLM {vllm['version']} in its own process (start-up takes about a minute) ...")
    result = vllm_peer.run_or_skip(vllm, job, log)
    if "skipped" in result:
        return result
    return vllm_peer_report(opts, vllm, result, reqs, runs, first_tokens)


def vllm_peer_report(opts, vllm: dict, result: dict, reqs, runs: list[dict],
                     first_tokens: dict[str, list[int]]) -> dict:
    """The worker's `result` as the report's "peer": its run (the same figures as jaxserve's,
    by the same code), the ratios jaxserve / vLLM per jaxserve run, and the checks."""
    from jaxserve.bench import vllm_peer

    outputs = vllm_peer.to_outputs(result, reqs)
    run = rep.latency_json(outputs, result["wall_s"])
    good = None
    if opts.slo_ttft_ms is not None or opts.slo_tpot_ms is not None:
        good = goodput(outputs, result["wall_s"], opts.slo_ttft_ms, opts.slo_tpot_ms)
    run.update(mode="vllm", engine_args=result["engine_args"], goodput=good,
               steps=result["steps"], groups=rep.groups_json(run["requests"], result["wall_s"]))
    peer = {"name": "vllm", "vllm_version": vllm["version"], "python": vllm["python"],
            "torch_version": result.get("torch_version"),
            "startup_s": result.get("startup_s"), "env": result.get("env", {}),
            "prefix_caching": False,
            "arrivals": (f"the long prompts at the times (after the run's start) they arrived "
                         f"in jaxserve's {runs[0]['mode']} run, the streams at 0"
                         if any(r.after_first_tokens_of for r in reqs)
                         else "the workload's"),
            "run": run,
            "ratios": {r["mode"]: rep.peer_comparison(r, run) for r in runs}}
    if all(r.params.temperature == 0 for r in reqs):
        peer["greedy_agreement"] = vllm_peer.agreement(first_tokens, outputs)
    check = vllm_peer.interference_check(outputs, reqs)
    if check:
        peer["interference"] = check
    return peer
