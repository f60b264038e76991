"""The `panels` weight layout (`fused_panels`, `to_panels`) against `[out, in]`
(`fused_native`) on the native kernel: the bench model's products at prefill size (528 rows,
every layer product) and a weights-only decode step (16 rows, 12 layers' products and the
vocabulary head, chained), the two layouts alternating in one process.

  python benchmarks/panels_layout.py [--rounds=7] [--json_out=benchmarks/results/panels_layout.json]

Both layouts give the same bits (asserted here on every product). Per-round ratios
(panels / out_in time) and their median, as the VM's speed drifts between rounds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxserve.bench.machine import cpu_description, cpu_line  # noqa: E402
from jaxserve.bench.report import write_json  # noqa: E402
from jaxserve.native.matmul import panels_matmul, skinny_matmul, to_panels  # noqa: E402

# (K, N) of the bench model's fused products: qkv, o, gate_up, down; and the head.
LAYER = ((768, 1280), (768, 768), (768, 4096), (2048, 768))
HEAD = (768, 32000)
# A weights-only decode step's products: 12 layers' distinct weights, then the head.
STEP_SHAPES = [s for _ in range(12) for s in LAYER] + [HEAD]


def chain(mm, shapes=STEP_SHAPES, whole: bool = False):
    """The jitted weights-only step: y = mm(h, w, n) for each (K, N) of `shapes` and its weight,
    each input made from the last output; it returns 8 columns of every product (or with
    `whole` every product whole, to compare the bits)."""
    def f(x, ws):
        outs = []
        for (k, n), w in zip(shapes, ws):
            h = x if k == x.shape[1] else jnp.tile(x, (1, k // x.shape[1] + 1))[:, :k]
            y = mm(h, w, n)
            outs.append(y if whole else y[:, :8])
            x = y[:, :768] * 0.5 if n >= 768 else x
        return outs
    return jax.jit(f)


def _time(fn, *args, reps: int) -> float:
    best = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best.append(time.perf_counter() - t)
    return float(np.median(best))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=528)
    ap.add_argument("--steps_only", action="store_true",
                    help="only the weights-only steps, not each product alone")
    ap.add_argument("--json_out", default=str(ROOT / "benchmarks/results/panels_layout.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    oi = jax.jit(lambda x, w: skinny_matmul(x, w, out_in=True))
    results = {}
    print(cpu_line())

    # Prefill-size products, one at a time.
    for k, n in () if args.steps_only else LAYER:
        x = jnp.asarray(rng.standard_normal((args.rows, k)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((n, k)) / np.sqrt(k), jnp.float32)
        wp = to_panels(w)
        pm = jax.jit(lambda x, w, n=n: panels_matmul(x, w, n))
        np.testing.assert_array_equal(np.asarray(oi(x, w)), np.asarray(pm(x, wp)))
        t = {"out_in": [], "panels": []}
        for _ in range(args.rounds):
            t["out_in"].append(_time(oi, x, w, reps=args.reps))
            t["panels"].append(_time(pm, x, wp, reps=args.reps))
        flops = 2 * args.rows * k * n
        name = f"{args.rows} x {k} x {n}"
        results[name] = {
            "gflops_out_in": flops / np.median(t["out_in"]) / 1e9,
            "gflops_panels": flops / np.median(t["panels"]) / 1e9,
            "ratio": float(np.median(np.array(t["panels"]) / np.array(t["out_in"]))),
            "times_s": t}

    # Weights-only steps through 12 layers' distinct weights (302 MB: they come from memory,
    # not from the L3 as a product timed alone does) and, at 16 rows, the vocabulary head.
    shapes = STEP_SHAPES
    ws = [jnp.asarray(rng.standard_normal((n, k)) / np.sqrt(k), jnp.float32) for k, n in shapes]
    wps = [to_panels(w) for w in ws]
    f_oi = chain(lambda x, w, n: skinny_matmul(x, w, out_in=True))
    f_p = chain(lambda x, w, n: panels_matmul(x, w, n))
    for rows, used in ((args.rows, shapes[:-1]), (16, shapes)):
        x = jnp.asarray(rng.standard_normal((rows, 768)), jnp.float32)
        w_oi, w_p = ws[:len(used)], wps[:len(used)]
        if rows == 16:  # the decode step also checks the bits (the tall ones: above)
            for a, b in zip(f_oi(x, w_oi), f_p(x, w_p)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        t = {"out_in": [], "panels": []}
        for _ in range(args.rounds):
            t["out_in"].append(_time(f_oi, x, w_oi, reps=args.reps))
            t["panels"].append(_time(f_p, x, w_p, reps=args.reps))
        nbytes = sum(4 * k * n for k, n in used)
        flops = sum(2 * rows * k * n for k, n in used)
        what = "decode step" if rows == 16 else "prefill step"
        results[f"{what}, {rows} rows (products only)"] = {
            "ms_out_in": 1e3 * float(np.median(t["out_in"])),
            "ms_panels": 1e3 * float(np.median(t["panels"])),
            "gbps_out_in": nbytes / np.median(t["out_in"]) / 1e9,
            "gbps_panels": nbytes / np.median(t["panels"]) / 1e9,
            "gflops_out_in": flops / np.median(t["out_in"]) / 1e9,
            "gflops_panels": flops / np.median(t["panels"]) / 1e9,
            "ratio": float(np.median(np.array(t["panels"]) / np.array(t["out_in"]))),
            "times_s": t, "weight_bytes": nbytes, "flops": flops}

    print(f"{'product':<40}{'out_in':>10}{'panels':>10}{'ratio':>8}")
    for name, r in results.items():
        if "ms_out_in" not in r:
            print(f"{name:<40}{r['gflops_out_in']:8.0f}GF{r['gflops_panels']:8.0f}GF"
                  f"{r['ratio']:8.3f}")
        else:
            print(f"{name:<40}{r['ms_out_in']:8.1f}ms{r['ms_panels']:8.1f}ms{r['ratio']:8.3f}"
                  f"   ({r['gbps_out_in']:.1f} / {r['gbps_panels']:.1f} GB/s, "
                  f"{r['gflops_out_in']:.0f} / {r['gflops_panels']:.0f} GFLOP/s)")
    write_json(args.json_out, {"cpu": cpu_description(), "rounds": args.rounds,
                               "reps": args.reps, "rows": args.rows, "results": results,
                               "command": "python benchmarks/panels_layout.py"})


if __name__ == "__main__":
    main()
