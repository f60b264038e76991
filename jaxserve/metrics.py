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


def goodput(outputs: list[RequestOutput], wall_s: float, slo_ttft_ms: float | None,
            slo_tpot_ms: float | None) -> dict:
    """Requests that met every given SLO (TTFT, and TPOT for those with 2+ tokens), as vLLM's
    `--goodput`: their count, their share and their rate over the run."""
    def good(o: RequestOutput) -> bool:
        m = o.metrics
        if slo_ttft_ms is not None and (m.ttft is None or m.ttft * 1e3 > slo_ttft_ms):
            return False
        if slo_tpot_ms is not None and len(m.token_times) > 1:
            tpot = (m.token_times[-1] - m.token_times[0]) / (len(m.token_times) - 1)
            return tpot * 1e3 <= slo_tpot_ms
        return True

    n = sum(good(o) for o in outputs)
    return {"slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms, "good_requests": n,
            "fraction": n / len(outputs) if outputs else 0.0,
            "goodput_req_s": n / wall_s if wall_s else 0.0}


def format_table(rows: list[tuple[str, str | None]], title: str) -> str:
    """Two columns under an `=` title; a row whose value is None is a `-` section heading."""
    width = max(len(k) for k, v in rows if v is not None) + 2
    line = "=" * (width + 16)
    body = "\n".join(f"{k:-^{width + 16}}" if v is None else f"{k + ':':<{width}}{v:>16}"
                     for k, v in rows)
    return f"{title:=^{width + 16}}\n{body}\n{line}"


def format_columns(header: list[str], rows: list[list[str] | tuple[str]], title: str) -> str:
    """A side-by-side table (first column left-aligned); a one-cell row is a section heading."""
    cols = len(header)
    widths = [max(len(str(r[i])) for r in [header, *rows] if len(r) == cols) + 2
              for i in range(cols)]
    total = sum(widths)

    def fmt(r) -> str:
        if len(r) == 1:
            return f"{r[0]:-^{total}}"
        return f"{r[0]:<{widths[0]}}" + "".join(f"{c:>{w}}" for c, w in zip(r[1:], widths[1:]))

    return "\n".join([f"{title:=^{total}}", fmt(header), *(fmt(r) for r in rows), "=" * total])
