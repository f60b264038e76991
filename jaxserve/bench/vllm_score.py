"""The vLLM peer of `--workload=score`: the same pairs scored by vLLM through `prompt_logprobs`,
the way lm-evaluation-harness's vLLM backend scores (`_loglikelihood_tokens`): one request per
pair of context + continuation ids, SamplingParams(max_tokens=1, temperature=0,
prompt_logprobs=1), all handed to the engine at once, the continuation's positions read.

The engine matches jaxserve's run (`vllm_peer.engine_args`: max_num_seqs, the step's token
budget, max_model_len, dtype, chunked prefill), except that **its prefix cache is on**, vLLM's
default and what an lm-eval user gets: the fair peer for a job whose point is shared prefixes.
vLLM 0.32 sets `SamplingParams.skip_reading_prefix_cache=True` whenever prompt logprobs are asked
(a cached position would have no logprobs), so these requests never read the cache; the worker
records that flag and each request's `num_cached_tokens`, so the report says what vLLM did rather
than what it is expected to do. Runs in vLLM's own process and virtualenv (`vllm_worker.py`).
"""

from __future__ import annotations

import os

from jaxserve.bench import vllm_peer
from jaxserve.bench.score_workload import ScorePair


def engine_args(engine_cfg: dict) -> dict:
    return {**vllm_peer.engine_args(engine_cfg), "enable_prefix_caching": True}


def worker_pairs(pairs: list[ScorePair]) -> list[dict]:
    return [{"id": p.id, "prompt_token_ids": p.context + p.continuation,
             "num_scored": len(p.continuation)} for p in pairs]


def job(model_path: str, engine_cfg: dict, pairs: list[ScorePair], warm: list[ScorePair]
        ) -> dict:
    return {"model": os.path.abspath(model_path), "engine": engine_args(engine_cfg),
            "score": {"warmup": worker_pairs(warm), "pairs": worker_pairs(pairs)}}


def run(vllm: dict, model_path: str, engine_cfg: dict, pairs: list[ScorePair],
        warm: list[ScorePair], runs: list[dict], log) -> dict:
    """Runs the worker; the report's "peer" (or {"name", "skipped": why} if it failed)."""
    log(f"peer: vLLM {vllm['version']} scoring the same pairs in its own process (start-up "
        "takes about a minute) ...")
    from jaxserve.bench.score_bench import _load_average

    result = vllm_peer.run_or_skip(vllm, job(model_path, engine_cfg, pairs, warm), log)
    if "skipped" in result:
        return result
    result["load_average_after"] = _load_average()  # its timed run ends the worker
    return report(vllm, result, pairs, runs)


def report(vllm: dict, result: dict, pairs: list[ScorePair], runs: list[dict]) -> dict:
    """The worker's result beside jaxserve's runs: wall-time ratios (jaxserve / vLLM) and how
    far each run's scores are from vLLM's."""
    from jaxserve.bench.score_bench import compare_scores

    by_id = {r["id"]: r for r in result["pairs"]}
    missing = [p.id for p in pairs if p.id not in by_id]
    if missing:
        raise RuntimeError(f"the vLLM worker returned no score for {missing[:5]}")
    rs = [by_id[p.id] for p in pairs]
    scores = {"loglik": [float(sum(r["token_logprobs"])) for r in rs],
              "is_greedy": [bool(r["is_greedy"]) for r in rs],
              "token_logprobs": [[float(x) for x in r["token_logprobs"]] for r in rs]}
    cached = [r.get("num_cached_tokens") or 0 for r in rs]
    wall = result["wall_s"]
    return {
        "name": "vllm", "vllm_version": vllm["version"], "python": vllm["python"],
        "torch_version": result.get("torch_version"), "startup_s": result.get("startup_s"),
        "env": result.get("env", {}), "engine_args": result.get("engine_args"),
        "prefix_caching": {
            "enabled": bool((result.get("engine_args") or {}).get("enable_prefix_caching")),
            "skip_reading_prefix_cache": result.get("skip_reading_prefix_cache"),
            "cached_tokens": sum(cached),
            "requests_with_cached_tokens": sum(c > 0 for c in cached)},
        "run": {"wall_s": wall, "pairs_per_s": len(pairs) / wall if wall else float("nan"),
                "load_average": [None, result.get("load_average_after")], "scores": scores},
        "ratios": {r["mode"]: {"wall_s": r["wall_s"] / wall if wall else float("nan")}
                   for r in runs},
        "scores_vs": {r["mode"]: compare_scores(r["scores"], scores, pairs) for r in runs}}
