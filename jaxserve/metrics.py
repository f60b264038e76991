"""Latency and throughput summaries in the words of DESIGN.md (TTFT, ITL, TPOT, E2E)."""

from __future__ import annotations

import numpy as np

from jaxserve.outputs import RequestOutput


def distribution(values_s: list[float]) -> dict[str, float]:
    """mean / median / p99 / max in milliseconds (vllm bench serve's layout); NaN when empty."""
    if not values_s:
        return {k: float("nan") for k in ("mean", "median", "p99", "max")}
    a = np.asarray(values_s) * 1e3
    return {"mean": float(a.mean()), "median": float(np.median(a)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def summarize(outputs: list[RequestOutput], wall_s: float) -> dict:
    ttft = [o.metrics.ttft for o in outputs if o.metrics.ttft is not None]
    itl = [g for o in outputs for g in o.metrics.itls]
    tpot = [(o.metrics.token_times[-1] - o.metrics.token_times[0]) / (len(o.token_ids) - 1)
            for o in outputs if len(o.token_ids) > 1]
    e2e = [o.metrics.finished_time - o.metrics.arrival_time for o in outputs
           if o.metrics.finished_time is not None]
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(o.token_ids) for o in outputs)
    return {
        "requests": len(outputs), "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "wall_s": wall_s,
        "output_throughput_tok_s": output_tokens / wall_s if wall_s else 0.0,
        "total_throughput_tok_s": (prompt_tokens + output_tokens) / wall_s if wall_s else 0.0,
        "ttft_ms": distribution(ttft), "tpot_ms": distribution(tpot),
        "itl_ms": distribution(itl), "e2e_ms": distribution(e2e),
    }


def format_table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows) + 2
    line = "=" * (width + 16)
    body = "\n".join(f"{k + ':':<{width}}{v:>16}" for k, v in rows)
    return f"{title:=^{width + 16}}\n{body}\n{line}"
