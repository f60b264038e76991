"""The score workload's tables, from its report (`score_bench.run_score_benchmark`)."""

from __future__ import annotations

import math

from jaxserve.metrics import format_columns, format_table


def _f(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{-digits}g}" if digits < 0 else f"{x:,.{digits}f}"  # < 0: significant digits


def machine_line(m: dict) -> str:
    cpu = m["cpu"]
    simd = " ".join(cpu["vector_extensions"]) or "no SIMD flags"
    return (f"Machine: {cpu['model']}, {cpu['cores']} cores ({simd}); {m['platform']} "
            f"{m['device_kind']}, JAX {m['jax_version']}, {m['dtype']}")


def job_table(job: dict) -> str:
    q, c = job["question_len"], job["continuation_len"]
    rows = [("Pairs (context, continuation)", _f(job["num_pairs"])),
            ("Items x choices", f"{job['num_items']} x {job['num_choices']}"),
            ("Prefixes x tokens", f"{job['num_prefixes']} x {job['prefix_len']}"),
            ("Question tokens (range)", f"{q[0]}-{q[1]}"),
            ("Continuation tokens (range)", f"{c[0]}-{c[1]}"),
            ("Tokens in all pairs", _f(job["tokens"])),
            ("Distinct tokens (prefix trie)", _f(job["distinct_tokens"])),
            ("Scored tokens", _f(job["scored_tokens"]))]
    return format_table(rows, " Score job (multiple choice) ")


# (label, getter, digits) of the cache on / off table.
_RUN_ROWS = [
    ("Wall time (s)", lambda r: r["wall_s"], 2),
    ("Pairs/s", lambda r: r["pairs_per_s"], 1),
    ("Tokens computed", lambda r: r["tokens_computed"], 0),
    ("Tokens computed/s", lambda r: r["tokens_computed_per_s"], 0),
    ("Steps", lambda r: r["steps"], 0),
    ("Prefix-cache hit rate", lambda r: r["prefix_cache_hit_rate"], 3),
    ("Compiles after warm-up", lambda r: r["compiles_after_warmup"], 0),
    ("Load average (1 min, after)", lambda r: (r.get("load_average") or [None, None])[1], 2),
]


_NO_RATIO = ("Prefix-cache hit rate", "Compiles after warm-up", "Load average (1 min, after)")


def cache_table(out: dict) -> str:
    on, off = out["runs"]
    rows = []
    for label, get, digits in _RUN_ROWS:
        a, b = get(on), get(off)
        ratio = b / a if a and isinstance(a, (int, float)) else float("nan")
        rows.append([label, _f(a, digits), _f(b, digits),
                     "" if label in _NO_RATIO else _f(ratio, 2)])
    s = out["comparison"]["scores"]
    rows += [["Scores, cache on vs off"],
             ["max |loglik diff|", _f(s["max_abs_loglik_diff"], -3), "", ""],
             ["max |token logprob diff|", _f(s["max_abs_token_logprob_diff"], -3), "", ""],
             ["is_greedy agreement", _f(s["is_greedy_agreement"], 3), "", ""],
             ["identical to the bit", _f(s["identical"]), "", ""]]
    return format_columns(["", "cache on", "cache off", "off / on"], rows,
                          " LLM.score: prefix cache on vs off ")


def vllm_table(out: dict) -> str:
    peer, runs = out["peer"], out["runs"]
    v = peer["run"]
    rows = [["Wall time (s)", *(_f(r["wall_s"]) for r in runs), _f(v["wall_s"]),
             *(_f(peer["ratios"][r["mode"]]["wall_s"], 3) for r in runs)],
            ["Pairs/s", *(_f(r["pairs_per_s"], 1) for r in runs), _f(v["pairs_per_s"], 1),
             *(_f(r["pairs_per_s"] / v["pairs_per_s"], 3) for r in runs)],
            ["Load average (1 min, after)",
             *(_f((r.get("load_average") or [None, None])[1]) for r in runs),
             _f((v.get("load_average") or [None, None])[1]), *("" for _ in runs)],
            ["Scores vs vLLM"]]
    for label, key, digits in (("max |loglik diff|", "max_abs_loglik_diff", -3),
                               ("max |token logprob diff|", "max_abs_token_logprob_diff", -3),
                               ("is_greedy agreement", "is_greedy_agreement", 3),
                               ("same choice per item", "choice_agreement", 3)):
        rows.append([label, *(_f(peer["scores_vs"][r["mode"]][key], digits) for r in runs),
                     "", *("" for _ in runs)])
    pc = peer["prefix_caching"]
    title = (f" Peer: vLLM {peer['vllm_version']} (prompt_logprobs=1; prefix cache "
             f"{'on' if pc['enabled'] else 'off'}); ratio = jaxserve / vLLM ")
    header = ["", *(f"jaxserve {r['mode']}" for r in runs), "vLLM",
              *(f"{r['mode']} / vLLM" for r in runs)]
    return format_columns(header, rows, title)


def vllm_notes(peer: dict) -> list[str]:
    pc = peer["prefix_caching"]
    return [f"vLLM: started in {peer['startup_s']:.1f} s (not timed); prefix cache "
            f"{'on' if pc['enabled'] else 'off'}, skip_reading_prefix_cache="
            f"{pc['skip_reading_prefix_cache']} (vLLM sets it when prompt logprobs are asked); "
            f"{pc['cached_tokens']} cached tokens over {pc['requests_with_cached_tokens']} "
            "requests"]


def print_report(out: dict, emit=print) -> None:
    emit(job_table(out["job"]))
    emit(cache_table(out))
    c = out["comparison"]
    emit(f"speed-up with the prefix cache: {c['speedup']:.2f}x wall time, "
         f"{c['tokens_computed_ratio']:.2f}x fewer tokens computed")
    peer = out.get("peer")
    if peer and "skipped" in peer:
        emit(f"peer skipped: {peer['skipped']}")
    elif peer:
        emit(vllm_table(out))
        for line in vllm_notes(peer):
            emit(line)
