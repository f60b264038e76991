"""`--workload=score`: the multiple-choice job through `LLM.score`, with the prefix cache on and
off, in one process on the same params and engine options, and (`--peer=vllm`) through vLLM's
`prompt_logprobs` as lm-evaluation-harness's vLLM backend scores.

Each jaxserve run gets its own `LLM` (the only difference between them is
`enable_prefix_caching`), warmed up twice on a small job of its own (tokens drawn from another
random stream, so the warm-up leaves nothing in the cache that the job could hit), then times one
`LLM.score` call over every pair. Its figures are the deltas of `llm.stats` across that call:
tokens the engine computed (prompt rows of real tokens), steps, and the prefix cache's hits over
the tokens it was asked for. The two runs' scores are compared exactly: with the cache on, a
request's context comes from pages another request computed, and the scores must not change.

Report ("workload": "score"): "job" (the workload's shape, `score_workload.describe`), "runs"
(cache on, cache off: `run_json`), "comparison" (speed-up, `compare_scores`), "peer" (vLLM,
see `vllm_score`), "machine" (platform facts and the CPU's name: no probes, nothing here is
compared with a roofline).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import platform
import time
from typing import Callable

from jaxserve.bench import score_workload
from jaxserve.bench.machine import cpu_description
from jaxserve.bench.score_workload import ScorePair

# (mode, enable_prefix_caching): the subject first, then the baseline.
MODES = (("cache_on", True), ("cache_off", False))


def machine_facts(dtype: str) -> dict:
    import jax

    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
            "jax_version": jax.__version__, "python": platform.python_version(),
            "dtype": dtype, "cpu": cpu_description()}


def run_score_benchmark(opts, model_cfg, params, engine_options: dict, *,
                        model_path: str | None = None, engines: dict | None = None,
                        log: Callable = print, vllm: dict | None = None) -> dict:
    """The score workload's report. `engines` caches the two `LLM`s across calls (tests; each
    build compiles) under ("score", EngineConfig); a reused cache-on LLM keeps its cached
    pages, so callers that reuse one give each call its own `opts.seed`."""
    from jaxserve.config import EngineConfig

    job = opts.score_job
    pairs = score_workload.multiple_choice(job, model_cfg.vocab_size, opts.seed)
    warm = score_workload.multiple_choice(score_workload.warmup_job(job), model_cfg.vocab_size,
                                          opts.seed, stream=score_workload.WARMUP_STREAM)
    described = score_workload.describe(job, pairs)
    if described["longest"] + 1 > model_cfg.max_position_embeddings:  # +1: the engine's token
        raise ValueError(f"the score job needs {described['longest'] + 1} positions but the "
                         f"model has max_position_embeddings="
                         f"{model_cfg.max_position_embeddings}")
    dtype = engine_options.get("dtype") or EngineConfig.dtype
    log(f"score: {len(pairs)} pairs ({job.num_items} items x {job.num_choices} choices, "
        f"{job.num_prefixes} prefixes of {job.prefix_len} tokens), {described['tokens']} tokens "
        f"in all, {described['distinct_tokens']} distinct")
    keep = engines is not None
    engines = {} if engines is None else engines
    runs = []
    for mode, caching in MODES:
        options = {**engine_options, "enable_prefix_caching": caching}
        llm = _llm(engines, model_cfg, params, options, log, mode)
        runs.append(run_one(llm, mode, pairs, warm, progress=opts.progress))
        log(f"score {mode}: {runs[-1]['wall_s']:.2f} s, {runs[-1]['tokens_computed']} tokens "
            f"computed, prefix-cache hit rate {runs[-1]['prefix_cache_hit_rate']:.3f}")
        if not keep:  # free its KV cache before the next run's engine is built
            del llm
            gc.collect()
    on, off = runs
    out = {"workload": "score", "config": dataclasses.asdict(opts),
           "model": {"path": model_path, **dataclasses.asdict(model_cfg)},
           "machine": machine_facts(dtype), "job": described, "runs": runs,
           "comparison": {"numerator": "cache_off", "denominator": "cache_on",
                          "speedup": _ratio(off["wall_s"], on["wall_s"]),
                          "tokens_computed_ratio": _ratio(off["tokens_computed"],
                                                          on["tokens_computed"]),
                          "scores": compare_scores(on["scores"], off["scores"], pairs)},
           "pairs": [{"id": p.id, "item": p.item, "choice": p.choice, "prefix": p.prefix,
                      "context_len": len(p.context), "continuation_len": len(p.continuation)}
                     for p in pairs]}
    if opts.peer == "vllm":
        from jaxserve.bench import vllm_score
        out["peer"] = vllm_score.run(vllm, model_path, on["engine"], pairs, warm, runs, log)
    return out


def _llm(engines: dict, model_cfg, params, options: dict, log, mode: str):
    from jaxserve.llm import LLM, engine_config

    key = ("score", engine_config(**options))
    if key not in engines:
        log(f"score {mode}: building the engine (compiles every executable) ...")
        engines[key] = LLM.from_params(model_cfg, params, **options)
    return engines[key]


def run_one(llm, mode: str, pairs: list[ScorePair], warm: list[ScorePair], *,
            progress: bool = True) -> dict:
    """One timed `LLM.score` over every pair, after two untimed warm-up calls."""
    for _ in range(2):
        llm.score([(p.context, p.continuation) for p in warm], use_tqdm=False)
    before, load_before = llm.stats, _load_average()
    t0 = time.perf_counter()
    outs = llm.score([(p.context, p.continuation) for p in pairs], use_tqdm=progress)
    wall = time.perf_counter() - t0
    after, load_after = llm.stats, _load_average()
    delta = {k: after[k] - before[k] for k in (
        "steps", "mixed_steps", "decode_steps", "scheduled_tokens", "slot_tokens",
        "prefix_cache_hit_tokens", "prefix_cache_query_tokens", "preemptions")}
    summary = llm.last_score_summary
    return {
        "mode": mode, "enable_prefix_caching": llm.engine.cfg.enable_prefix_caching,
        "engine": dataclasses.asdict(llm.engine.cfg), "wall_s": wall,
        "pairs_per_s": len(pairs) / wall if wall else math.nan,
        # Real tokens the engine's steps computed (prompt rows; a scoring request samples its
        # one token from its last prompt row, so there are no decode steps).
        "tokens_computed": delta["scheduled_tokens"], "slot_tokens": delta["slot_tokens"],
        "tokens_computed_per_s": delta["scheduled_tokens"] / wall if wall else math.nan,
        "steps": delta["steps"], "mixed_steps": delta["mixed_steps"],
        "decode_steps": delta["decode_steps"], "preemptions": delta["preemptions"],
        "prefix_cache_hit_tokens": delta["prefix_cache_hit_tokens"],
        "prefix_cache_query_tokens": delta["prefix_cache_query_tokens"],
        "prefix_cache_hit_rate": _ratio(delta["prefix_cache_hit_tokens"],
                                        delta["prefix_cache_query_tokens"], empty=0.0),
        "cached_pages_before": before["cached_pages"], "cached_pages_after": after["cached_pages"],
        "executables_compiled": after["executables_compiled"],
        "compiles_after_warmup": after["compiles_after_warmup"],
        "attention_backend": after.get("attention_backend"),
        # Other work on the machine shows in the wall time (shared 2-core VMs): the 1-minute
        # load average before and after the timed call.
        "load_average": [load_before, load_after],
        "score_summary": dataclasses.asdict(summary) if summary is not None else None,
        "scores": {"loglik": [o.loglik for o in outs], "is_greedy": [o.is_greedy for o in outs],
                   "token_logprobs": [list(o.token_logprobs) for o in outs]}}


def compare_scores(a: dict, b: dict, pairs: list[ScorePair] | None = None) -> dict:
    """How far two runs' scores ({"loglik", "is_greedy", "token_logprobs"} lists, pair by
    pair) differ. "identical": every token logprob equal to the bit and every is_greedy equal.
    With `pairs`, also how many items pick the same choice (the highest loglik, the first of
    equals): what a multiple-choice accuracy is made of."""
    la, lb = a["token_logprobs"], b["token_logprobs"]
    if len(la) != len(lb) or any(len(x) != len(y) for x, y in zip(la, lb)):
        raise ValueError("the two runs scored different pairs or continuation lengths")
    tok = [abs(x - y) for xs, ys in zip(la, lb) for x, y in zip(xs, ys)]
    ll = [abs(x - y) for x, y in zip(a["loglik"], b["loglik"])]
    greedy_equal = sum(x == y for x, y in zip(a["is_greedy"], b["is_greedy"]))
    out = {"pairs": len(la), "max_abs_loglik_diff": max(ll, default=0.0),
           "max_abs_token_logprob_diff": max(tok, default=0.0),
           "is_greedy_agreement": greedy_equal / len(la) if la else 1.0,
           "is_greedy_disagreements": len(la) - greedy_equal,
           "identical": (all(x == y for xs, ys in zip(la, lb) for x, y in zip(xs, ys))
                         and greedy_equal == len(la))}
    if pairs is not None:
        ca, cb = item_choices(pairs, a["loglik"]), item_choices(pairs, b["loglik"])
        out["items"] = len(ca)
        out["choice_agreement"] = sum(ca[i] == cb[i] for i in ca) / len(ca) if ca else 1.0
    return out


def item_choices(pairs: list[ScorePair], loglik: list[float]) -> dict[int, int]:
    """{item: the choice with the highest loglik (the first of equals)}."""
    best: dict[int, tuple[float, int]] = {}
    for p, ll in zip(pairs, loglik):
        if p.item not in best or ll > best[p.item][0]:
            best[p.item] = (ll, p.choice)
    return {i: c for i, (_, c) in best.items()}


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def _ratio(x: float, y: float, empty: float = math.nan) -> float:
    return x / y if y else empty
