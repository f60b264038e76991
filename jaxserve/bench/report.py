"""The benchmark's JSON (every figure of every run) and its tables (`vllm bench serve`'s layout).

JSON shape (times in seconds after the run's start, latencies in ms):

  {"workload": str, "config": {...}, "machine": {platform, device_kind, cpu_count, jax_version,
   matmul_gflops, mem_gbps, ...},
   "runs": [{"mode": "chunked" | "unchunked", "chunk_size": int, "engine": {...},
             "requests": [{"id", "arrival_s", "first_token_s", "token_times_s": [...],
                           "finished_s", "prompt_len", "output_len"}],
             "ttft_ms" | "tpot_ms" | "itl_ms" | "e2e_ms": {"mean", "median", "p99", "max"},
             "duration_s", "request_throughput_req_s", "output_throughput_tok_s",
             "total_throughput_tok_s", "useful_token_fraction", "executables_compiled",
             "compiles_after_warmup", "goodput": {...} | null, "roofline": {...},
             "steps": [{"kind", "start_s", "end_s", "scheduled_tokens", "slot_tokens",
                        "sampled"}], "stats"}],
   "comparison": {metric: chunked / unchunked} (with --compare_chunking),
   "peer": {...} (with --peer; vllm: {"name": "vllm", "vllm_version", "startup_s",
            "prefix_caching": false, "arrivals", "env", "run": {the throughput / latency
            figures and "requests" as above, "engine_args", "steps"}, "ratios": {jaxserve mode:
            {metric: jaxserve / vLLM}}, "greedy_agreement", "interference"}, or
            {"name", "skipped": why})}
"""

from __future__ import annotations

import dataclasses
import json
import math

from jaxserve.bench.runner import RunResult
from jaxserve.metrics import distribution, format_columns, format_table, summarize


def latency_json(outputs: list, wall_s: float, t0: float = 0.0) -> dict:
    """The figures every engine's run has (jaxserve's and a peer's alike): throughput, the
    TTFT / TPOT / ITL / E2E distributions and each request's times (seconds after `t0`)."""
    s = summarize(outputs, wall_s)
    requests = []
    for o in outputs:
        m = o.metrics
        requests.append({
            "id": o.request_id, "arrival_s": m.arrival_time - t0,
            "first_token_s": m.first_token_time - t0,
            "token_times_s": [t - t0 for t in m.token_times],
            "finished_s": m.finished_time - t0,
            "prompt_len": len(o.prompt_token_ids), "output_len": len(o.token_ids),
            "preemptions": m.num_preemptions})
    return {
        "num_requests": s["requests"], "prompt_tokens": s["prompt_tokens"],
        "output_tokens": s["output_tokens"], "duration_s": wall_s,
        "request_throughput_req_s": s["requests"] / wall_s if wall_s else 0.0,
        "output_throughput_tok_s": s["output_throughput_tok_s"],
        "total_throughput_tok_s": s["total_throughput_tok_s"],
        "ttft_ms": s["ttft_ms"], "tpot_ms": s["tpot_ms"], "itl_ms": s["itl_ms"],
        "e2e_ms": s["e2e_ms"], "requests": requests}


def group_of(request_id: str) -> str:
    """A request's group: its id up to the last '-' ("stream-3" -> "stream", "long-0" ->
    "long"); the interference workload's two kinds of request."""
    return request_id.rsplit("-", 1)[0] if "-" in request_id else request_id


def groups_json(requests: list[dict], wall_s: float) -> dict:
    """Per group of requests (see `group_of`): TTFT and ITL distributions and output tokens/s,
    from the requests' recorded times. Empty unless there are at least two groups (the
    interference workload: the decode streams and the long prompts)."""
    groups: dict[str, list[dict]] = {}
    for r in requests:
        groups.setdefault(group_of(r["id"]), []).append(r)
    if len(groups) < 2:
        return {}
    out = {}
    for name, rs in groups.items():
        itls = [b - a for r in rs for a, b in zip(r["token_times_s"], r["token_times_s"][1:])]
        out[name] = {"requests": len(rs),
                     "ttft_ms": distribution([r["first_token_s"] - r["arrival_s"] for r in rs]),
                     "itl_ms": distribution(itls),
                     "output_tokens": sum(r["output_len"] for r in rs),
                     "output_throughput_tok_s": sum(r["output_len"] for r in rs) / wall_s
                     if wall_s else 0.0}
    return out


def run_json(mode: str, engine_cfg, result: RunResult, roofline: dict | None,
             goodput: dict | None) -> dict:
    lat = latency_json(result.ordered_outputs(), result.wall_s, result.t0)
    requests = lat.pop("requests")
    st = result.stats
    return {
        "mode": mode, "chunk_size": engine_cfg.chunk_size,
        "engine": dataclasses.asdict(engine_cfg), **lat,
        "useful_token_fraction": st["useful_token_fraction"],
        "executables_compiled": st["executables_compiled"],
        "compiles_after_warmup": st["compiles_after_warmup"],
        "startup_compile_s": st["startup_compile_s"],
        "goodput": goodput, "roofline": roofline,
        "steps": [{"kind": x.kind, "start_s": x.start_s, "end_s": x.end_s,
                   "scheduled_tokens": x.scheduled_tokens, "slot_tokens": x.slot_tokens,
                   "sampled": x.sampled}
                  for x in result.steps],
        "stats": {k: v for k, v in st.items() if isinstance(v, (int, float, str))},
        "groups": groups_json(requests, result.wall_s),
        "requests": requests,
    }


# -- tables ------------------------------------------------------------------------------------

def _f(x: float, digits: int = 2) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _latency_rows(run: dict) -> list[tuple[str, str | None]]:
    rows: list[tuple[str, str | None]] = []
    for key, name, heading in (("ttft_ms", "TTFT", "Time to First Token"),
                               ("tpot_ms", "TPOT", "Time per Output Token (excl. 1st token)"),
                               ("itl_ms", "ITL", "Inter-token Latency"),
                               ("e2e_ms", "E2EL", "End-to-end Latency")):
        d = run[key]
        rows.append((heading, None))
        rows += [(f"Mean {name} (ms)", _f(d["mean"])), (f"Median {name} (ms)", _f(d["median"])),
                 (f"P99 {name} (ms)", _f(d["p99"]))]
        if key == "itl_ms":
            rows.append(("Max ITL (ms)", _f(d["max"])))
    return rows


def serve_table(run: dict) -> str:
    """One run in the layout of `vllm bench serve`, plus the engine's own figures."""
    rows: list[tuple[str, str | None]] = [
        ("Successful requests", f"{run['num_requests']}"),
        ("Benchmark duration (s)", _f(run["duration_s"])),
        ("Total input tokens", f"{run['prompt_tokens']}"),
        ("Total generated tokens", f"{run['output_tokens']}"),
        ("Request throughput (req/s)", _f(run["request_throughput_req_s"])),
        ("Output token throughput (tok/s)", _f(run["output_throughput_tok_s"])),
        ("Total Token throughput (tok/s)", _f(run["total_throughput_tok_s"]))]
    g = run.get("goodput")
    if g:
        rows.append(("Request goodput (req/s)", _f(g["goodput_req_s"])))
    rows += _latency_rows(run)
    if "roofline" not in run:  # a peer's run: no engine figures
        return format_table(rows, f" Serving Benchmark Result: {run['mode']} ")
    r = run["roofline"]
    rows += [("Engine", None),
             ("Steps (mixed / decode)", f"{r['mixed_steps']} / {r['decode_steps']}"),
             ("Median mixed step (ms)", _f(r["mixed_step_ms_median"])),
             ("Median decode step (ms)", _f(r["decode_step_ms_median"])),
             ("MFU of mixed steps", _f(r["mfu_prefill"], 3)),
             ("MBU of decode steps", _f(r["mbu_decode"], 3)),
             ("Useful-token fraction", _f(run["useful_token_fraction"], 3)),
             ("Executables compiled", f"{run['executables_compiled']}"),
             ("Compiles after warm-up", f"{run['compiles_after_warmup']}"),
             ("Preemptions", f"{run['stats'].get('preemptions', 0)}")]
    title = f" Serving Benchmark Result: {run['mode']} (chunk_size={run['chunk_size']}) "
    return format_table(rows, title)


# (label, getter) of the side-by-side comparison; ratio = first run / second run.
_COMPARE = [
    ("Duration (s)", lambda r: r["duration_s"]),
    ("Output tok/s", lambda r: r["output_throughput_tok_s"]),
    ("Total tok/s", lambda r: r["total_throughput_tok_s"]),
    ("Mean TTFT (ms)", lambda r: r["ttft_ms"]["mean"]),
    ("P99 TTFT (ms)", lambda r: r["ttft_ms"]["p99"]),
    ("Mean TPOT (ms)", lambda r: r["tpot_ms"]["mean"]),
    ("P99 TPOT (ms)", lambda r: r["tpot_ms"]["p99"]),
    ("Median ITL (ms)", lambda r: r["itl_ms"]["median"]),
    ("P99 ITL (ms)", lambda r: r["itl_ms"]["p99"]),
    ("Max ITL (ms)", lambda r: r["itl_ms"]["max"]),
    ("P99 E2EL (ms)", lambda r: r["e2e_ms"]["p99"]),
    ("MFU (mixed steps)", lambda r: r["roofline"]["mfu_prefill"]),
    ("MBU (decode steps)", lambda r: r["roofline"]["mbu_decode"]),
    ("Useful-token fraction", lambda r: r["useful_token_fraction"]),
]


def _ratios(rows, a: dict, b: dict) -> dict:
    """{label: get(a) / get(b)} over (label, get) rows; NaN where b has no figure."""
    out = {}
    for label, get in rows:
        x, y = get(a), get(b)
        out[label] = x / y if y and not math.isnan(y) else float("nan")
    return out


def comparison(a: dict, b: dict) -> dict:
    """{metric: a / b} for the metrics of the side-by-side table."""
    return _ratios(_COMPARE, a, b)


def compare_table(a: dict, b: dict) -> str:
    ratios = comparison(a, b)
    rows = [[label, _f(get(a), 3), _f(get(b), 3), _f(ratios[label], 3)]
            for label, get in _COMPARE]
    header = ["", f"{a['mode']} ({a['chunk_size']})", f"{b['mode']} ({b['chunk_size']})",
              "ratio"]
    return format_columns(header, rows, " Chunked vs unchunked prefill ")


# The rows a peer has too (it has no roofline or padding figures); ratio = jaxserve / peer.
_PEER_COMPARE = [row for row in _COMPARE if row[0] not in (
    "MFU (mixed steps)", "MBU (decode steps)", "Useful-token fraction")] + [
    ("Requests/s", lambda r: r["request_throughput_req_s"]),
    ("Mean ITL (ms)", lambda r: r["itl_ms"]["mean"]),
    ("Mean E2EL (ms)", lambda r: r["e2e_ms"]["mean"])]


def peer_comparison(run: dict, peer_run: dict) -> dict:
    """{metric: jaxserve run / peer run} over the figures both engines have."""
    return _ratios(_PEER_COMPARE, run, peer_run)


def vllm_table(runs: list[dict], peer: dict) -> str:
    """Every jaxserve run beside vLLM's, with a ratio (jaxserve / vLLM) column per run."""
    v = peer["run"]
    rows = []
    for label, get in _PEER_COMPARE:
        rows.append([label, *(_f(get(r), 3) for r in runs), _f(get(v), 3),
                     *(_f(peer["ratios"][r["mode"]][label], 3) for r in runs)])
    header = ["", *(f"jaxserve {r['mode']}" for r in runs), "vLLM",
              *(f"{r['mode']}/vLLM" if len(runs) > 1 else "ratio" for r in runs)]
    prefill = "chunked" if v["engine_args"]["enable_chunked_prefill"] else "unchunked"
    title = (f" Peer: vLLM {peer['vllm_version']} ({prefill}, prefix cache off); "
             "ratio = jaxserve / vLLM ")
    return format_columns(header, rows, title)


_GROUP_ROWS = [("mean TTFT (ms)", lambda g: g["ttft_ms"]["mean"]),
               ("median ITL (ms)", lambda g: g["itl_ms"]["median"]),
               ("P99 ITL (ms)", lambda g: g["itl_ms"]["p99"]),
               ("output tok/s", lambda g: g["output_throughput_tok_s"])]


def groups_table(runs: list[dict], peer_run: dict | None = None) -> str | None:
    """Per request group (interference: streams, long prompts), each run side by side, and
    with a peer a ratio column (first run / peer)."""
    cols = runs + ([peer_run] if peer_run else [])
    if not all(c.get("groups") for c in cols):
        return None
    rows = []
    for name in cols[0]["groups"]:
        for label, get in _GROUP_ROWS:
            vals = [get(c["groups"][name]) if name in c["groups"] else float("nan")
                    for c in cols]
            row = [f"{name}: {label}", *(_f(v, 1) for v in vals)]
            if peer_run:
                row.append(_f(vals[0] / vals[-1] if vals[-1] else float("nan"), 3))
            rows.append(row)
    header = ["", *(f"jaxserve {r['mode']}" for r in runs)] + (
        ["vLLM", "ratio"] if peer_run else [])
    return format_columns(header, rows, " Per request group ")


def machine_table(m: dict) -> str:
    rows = [("Platform", m["platform"]), ("Device", m["device_kind"][:16]),
            ("CPU count", f"{m['cpu_count']}"), ("JAX", m["jax_version"]),
            (f"GEMM {m['matmul_n']}^3 {m['dtype']} (GFLOP/s)", _f(m["matmul_gflops"], 1)),
            ("Copy bandwidth (GB/s)", _f(m["mem_gbps"], 1))]
    return format_table(rows, " Machine (measured) ")


def peer_table(peer: dict, run: dict) -> str:
    rows = [["Duration (s)", _f(run["duration_s"]), _f(peer["duration_s"])],
            ["Output tok/s", _f(run["output_throughput_tok_s"]),
             _f(peer["output_throughput_tok_s"])],
            ["Total tok/s", _f(run["total_throughput_tok_s"]),
             _f(peer["total_throughput_tok_s"])],
            ["Requests/s", _f(run["request_throughput_req_s"]),
             _f(peer["request_throughput_req_s"])]]
    return format_columns(["", f"jaxserve {run['mode']}", "HF transformers"], rows,
                          " Peer: Hugging Face generate (static batches) ")


def write_json(path: str, obj) -> None:
    """Writes a benchmark's result to `path` (its folder made if need be), as the benchmark
    scripts do, and says so."""
    from pathlib import Path
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1) + "\n")
    print(f"wrote {path}")


def jsonable(x):
    """NaN and inf become null, so the file is strict JSON (a rate of inf, an empty metric)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x
