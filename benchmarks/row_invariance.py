"""Does a row's result depend on how many rows its matmul has? (the bench model's products)

  python benchmarks/row_invariance.py [--json_out=benchmarks/results/row_invariance.json]

For each product a step runs on the ≈125M bench model (fused QKV, O, fused gate/up, down, the
vocabulary logits) and each backend (XLA's CPU dot as a jitted step uses it, the native skinny
matmul), the same 8 rows are multiplied alone (M = 8) and inside products of M rows (the
decode-only steps' 16, the mixed steps' sampling rows 24 and every chunk bucket + 16 decode
rows), at several row offsets. Reported: whether they are bit-identical to the M = 8 result
and to the M = 528 one, the largest differences, and each backend's time per product (median
of 9 calls, the backends in turn), so the cost of one row-invariant matmul for every M can be
read off. The summary names the (product, M) where XLA's rows differ.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

# (name, K, N) of the bench model's products in the fused [in, out] serving layout.
PRODUCTS = (("qkv", 768, 1280), ("o", 768, 768), ("gate_up", 768, 4096), ("down", 2048, 768),
            ("logits", 768, 32000))
ROWS = (1, 8, 16, 24, 64, 65, 144, 272, 400, 528)


def _interleaved_ms(backends, x, w, reps=9):
    """{backend: median ms of one product}, the backends called in turn (a shared machine's
    other work then weighs on each alike)."""
    import jax
    for fn in backends.values():
        jax.block_until_ready(fn(x, w))
    ts = {b: [] for b in backends}
    for _ in range(reps):
        for b, fn in backends.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x, w))
            ts[b].append(time.perf_counter() - t0)
    return {b: 1e3 * float(np.median(t)) for b, t in ts.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json_out", default="benchmarks/results/row_invariance.json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxserve.bench.machine import cpu_description
    from jaxserve.native.matmul import skinny_matmul

    def xla(x, w):
        return jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)

    backends = {"xla_dot": jax.jit(xla), "native_skinny": jax.jit(skinny_matmul)}
    rng = np.random.default_rng(0)
    rows, timings = [], []
    for name, k, n in PRODUCTS:
        w = jnp.asarray(rng.standard_normal((k, n), np.float32) / np.sqrt(k))
        probe = rng.standard_normal((8, k)).astype(np.float32)
        big = rng.standard_normal((max(ROWS), k)).astype(np.float32)
        big[:8] = probe

        def probe_rows(fn, m, off):
            x = big[:m].copy()
            x[off:off + 8] = probe
            return np.asarray(fn(jnp.asarray(x), w))[off:off + 8]

        # The probe alone (M = 8) and inside the largest product, at row 0: the references.
        ref = {b: {"m8": probe_rows(fn, 8, 0), "m528": probe_rows(fn, max(ROWS), 0)}
               for b, fn in backends.items()}
        for m in ROWS:
            offsets = sorted({o for o in (0, 3, m - 8, 8 * (m // 16)) if 0 <= o <= m - 8})
            if m < 8:
                offsets = []
            for b, fn in backends.items():
                got = ([probe_rows(fn, m, off) for off in offsets] if offsets else
                       [np.asarray(fn(jnp.asarray(probe[:m]), w))])
                row = {"product": name, "k": k, "n": n, "m": m, "backend": b,
                       "offsets": offsets}
                for key, r in ref[b].items():
                    r = r[:got[0].shape[0]]
                    row[f"bit_equal_to_{key}"] = all(np.array_equal(g, r) for g in got)
                    row[f"max_abs_diff_to_{key}"] = max(float(np.max(np.abs(g - r)))
                                                        for g in got)
                rows.append(row)
            if m in (16, 24, 144, 528):
                ms = _interleaved_ms(backends, jnp.asarray(big[:m]), w)
                timings += [{"product": name, "m": m, "backend": b, "ms": t}
                            for b, t in ms.items()]
            print(f"{name:8s} M={m:4d}: " + ", ".join(
                f"{r['backend']} vs M=8 {'same' if r['bit_equal_to_m8'] else 'DIFF'}, "
                f"vs M=528 {'same' if r['bit_equal_to_m528'] else 'DIFF'}"
                for r in rows[-2:]), flush=True)
        cross = float(np.max(np.abs(ref["xla_dot"]["m8"] - ref["native_skinny"]["m8"])))
        rows.append({"product": name, "k": k, "n": n, "m": 8, "backend": "xla_vs_native",
                     "bit_equal_to_m8": bool(cross == 0.0), "max_abs_diff_to_m8": cross})
    for t in timings:
        print(f"time {t['product']:8s} M={t['m']:4d} {t['backend']:14s} {t['ms']:8.2f} ms")
    summary = {}
    for b in backends:
        mine = [r for r in rows if r["backend"] == b]
        summary[b] = {
            "row_invariant_for_all_m": all(r["bit_equal_to_m8"] for r in mine),
            "differs_from_m8_at": [f"{r['product']} M={r['m']}" for r in mine
                                   if not r["bit_equal_to_m8"]],
            "differs_from_m528_at": [f"{r['product']} M={r['m']}" for r in mine
                                     if not r["bit_equal_to_m528"]]}
    print(json.dumps(summary, indent=1))
    if args.json_out:
        os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump({"cpu": cpu_description(), "jax": jax.__version__,
                       "load_average": os.getloadavg()[0], "summary": summary,
                       "rows": rows, "timings_ms": timings}, f, indent=1)


if __name__ == "__main__":
    main()
