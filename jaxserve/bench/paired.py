"""Paired A/B runs of whole engines in one process: the same requests alternating between two
(or more) engines, so the VM's drift hits both alike (benchmarks/live_rows.py,
idle_decode_rows.py, panels_engine.py)."""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np

from jaxserve import LLM, SamplingParams
from jaxserve.bench.machine import cpu_line
from jaxserve.config import EngineConfig
from jaxserve.engine import Engine
from jaxserve.llm import load_params


def arg_parser(json_out: Path) -> argparse.ArgumentParser:
    """The A/B scripts' flags: --model (a jaxserve-make-bench-model folder), --repeats,
    --json_out (default `json_out`)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/bench_model",
                    help="a folder from jaxserve-make-bench-model")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--json_out", default=str(json_out))
    return ap


def engine_llm(model: str, cfg: EngineConfig) -> LLM:
    """An LLM around an Engine built from `cfg` as given (a config subclass too, which
    `LLM.from_params` cannot take)."""
    model_cfg, params = load_params(model, None, cfg)
    llm = LLM.__new__(LLM)
    llm.model_path, llm._ids, llm.last_score_summary = model, itertools.count(), None
    llm.engine = Engine(model_cfg, params, cfg, None)
    return llm


def standard_jobs(lengths=(512, 1024, 1536, 2000), seed: int = 0) -> dict:
    """One prompt alone of each length (one output token: its TTFT) and the offline job, 16
    prompts of 256 tokens with 64 output tokens (wall time); greedy. name -> (batches, params)."""
    rng = np.random.default_rng(seed)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    jobs = {f"one prompt of {n} tokens (TTFT, ms)": ([[rng.integers(0, 32000, n).tolist()]
                                                      for _ in range(4)], one)
            for n in lengths}
    jobs["16 x 256 + 64 offline (wall, ms)"] = (
        [[rng.integers(0, 32000, 256).tolist() for _ in range(16)] for _ in range(2)],
        SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    return jobs


def run_paired(engines: dict[str, LLM], jobs: dict, repeats: int) -> dict:
    """Each job `repeats` times on every engine in turn; prints a table and returns, per job,
    each engine's median ms (the first repeat dropped: warm-up), the median of the paired
    ratios first / second engine, and whether all engines produced the same tokens."""
    names = list(engines)
    a, b = names[0], names[1]
    print(cpu_line())
    print(f"{'workload':<38}" + "".join(f"{n:>10}" for n in names) + f"{'ratio':>8}")
    results = {}
    for job, (batches, sp) in jobs.items():
        times = {k: [] for k in names}
        outs = {}
        for i in range(repeats):
            for k in names:
                start = time.perf_counter()
                res = engines[k].generate(prompt_token_ids=batches[i % len(batches)],
                                          sampling_params=sp, use_tqdm=False)
                times[k].append((time.perf_counter() - start) * 1e3)
                outs[k] = [r.token_ids for r in res]
        same = all(outs[k] == outs[a] for k in names)
        ratio = float(np.median(np.array(times[a][1:]) / np.array(times[b][1:])))
        results[job] = {**{f"{k}_ms": float(np.median(times[k][1:])) for k in names},
                        "paired_ratio": ratio, "same_tokens": same, "times_ms": times}
        print(f"{job:<38}" + "".join(f"{results[job][f'{k}_ms']:10.1f}" for k in names)
              + f"{ratio:8.3f}" + ("" if same else "  TOKENS DIFFER"))
    return results
