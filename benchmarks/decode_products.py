"""The native kernel's decode-sized products against a git revision's: the bench model's 49
products of a decode step (12 layers' qkv, o, gate_up and down, then the vocabulary head; 400 MB
of float32 weights in the `panels` layout, distinct weights, chained so each input depends on
the last output) on 16 rows, the tree's kernel and the revision's alternating in one process.

  python benchmarks/decode_products.py --baseline=REV [--rows=16] [--rounds=9]
      [--json_out=benchmarks/results/decode_products.json]

The revision's matmul.cc (and parallel_for.h) is built into the kernel cache and registered under
a name of its own; its weights are converted by the revision's own `to_panels` (the layout may
have changed). Both give the same bits (asserted). Per-round ratios (tree / baseline time)
and their median: the VM's speed drifts between rounds, not within one; the two go first in
alternate rounds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxserve.bench import revision  # noqa: E402
from jaxserve.bench.machine import cpu_description, cpu_line  # noqa: E402
from jaxserve.bench.report import write_json  # noqa: E402
from jaxserve.native import matmul_build  # noqa: E402
from jaxserve.native.matmul import full_rows, to_panels  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from panels_layout import STEP_SHAPES as SHAPES  # noqa: E402
from panels_layout import chain as step_chain  # noqa: E402

BASELINE_TARGET = "decode_products_baseline_panels"


def baseline_to_panels(rev: str):
    """The revision's `to_panels` (jaxserve/native/matmul.py at `rev`)."""
    source = subprocess.run(["git", "show", f"{rev}:jaxserve/native/matmul.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    namespace = {"__name__": "baseline_matmul"}
    exec(compile(source, f"{rev}:matmul.py", "exec"), namespace)
    return namespace["to_panels"]


def chain(target: str, whole: bool = False):
    """panels_layout.py's weights-only step with every product through the FFI `target` (the
    tree's panels kernel or the baseline's, registered under its own name)."""
    def product(h, w, n):
        call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((h.shape[0], n), jnp.float32))
        return call(h, w, full_rows(h.shape[0]))
    return step_chain(product, whole=whole)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="git revision whose kernel to time too")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json_out", default=str(ROOT / "benchmarks/results/decode_products.json"))
    args = ap.parse_args()
    print(cpu_line())
    matmul_build.load()
    revision.register_at_revision(matmul_build.MATMUL, args.baseline, "JaxservePanelsMatmul",
                                  BASELINE_TARGET)
    rng = np.random.default_rng(0)
    w_out_in = [jnp.asarray(rng.standard_normal((n, k)) / np.sqrt(k), jnp.float32)
                for k, n in SHAPES]
    weights = {"tree": [to_panels(w) for w in w_out_in],
               "baseline": [baseline_to_panels(args.baseline)(w) for w in w_out_in]}
    del w_out_in
    x = jnp.asarray(rng.standard_normal((args.rows, 768)), jnp.float32)
    targets = {"tree": "jaxserve_panels_matmul", "baseline": BASELINE_TARGET}
    whole = {name: chain(t, whole=True)(x, weights[name]) for name, t in targets.items()}
    for a, b in zip(whole["tree"], whole["baseline"]):  # every column of every product
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    del whole
    runs = {name: chain(t) for name, t in targets.items()}
    for name, f in runs.items():
        jax.block_until_ready(f(x, weights[name]))  # compile
    times = {name: [] for name in runs}
    for r in range(args.rounds):
        for name in (("tree", "baseline") if r % 2 == 0 else ("baseline", "tree")):
            f = runs[name]
            t = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                jax.block_until_ready(f(x, weights[name]))
                t.append(time.perf_counter() - t0)
            times[name].append(float(np.median(t)))
    nbytes = sum(4 * k * (-(-n // 16) * 16) for k, n in SHAPES)
    ratios = np.array(times["tree"]) / np.array(times["baseline"])
    result = {"cpu": cpu_description(), "rows": args.rows, "baseline_revision": args.baseline,
              "rounds": args.rounds, "reps": args.reps, "weight_bytes": nbytes,
              "ms": {n: 1e3 * float(np.median(t)) for n, t in times.items()},
              "gbps": {n: nbytes / float(np.median(t)) / 1e9 for n, t in times.items()},
              "ratio_median": float(np.median(ratios)), "ratios": ratios.tolist(),
              "times_s": times, "bit_identical": True,
              "command": "python benchmarks/decode_products.py " + " ".join(sys.argv[1:])}
    print(f"{'kernel':<10}{'ms':>8}{'GB/s':>8}")
    for name in runs:
        print(f"{name:<10}{result['ms'][name]:8.2f}{result['gbps'][name]:8.1f}")
    print(f"tree / baseline: median {result['ratio_median']:.3f} "
          f"(rounds {', '.join(f'{r:.3f}' for r in ratios)}); bit-identical")
    if args.json_out:
        write_json(args.json_out, result)


if __name__ == "__main__":
    main()
