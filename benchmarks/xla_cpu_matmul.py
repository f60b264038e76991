"""Which XLA CPU path multiplies fastest? Times the 125M model's matmul shapes under XLA flags.

  python benchmarks/xla_cpu_matmul.py [--json_out=out/xla_cpu_matmul.json]

Each flag set runs in its own subprocess (XLA reads XLA_FLAGS once, at start-up). Weights are
stored [out, in] (Hugging Face's layout) and contracted on their last axis, as the model does.
Prints GFLOP/s per shape (median of 7) beside numpy's BLAS on the same shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnnpack_dot": "--xla_cpu_experimental_xnn_fusion_type=XNN_FUSION_TYPE_DOT",
    "ynnpack_dot": "--xla_cpu_experimental_ynn_fusion_type=YNN_FUSION_TYPE_DOT",
}
SHAPES = [(512, 768, 2048), (512, 2048, 768), (16, 768, 2048), (16, 2048, 768),
          (16, 768, 32000), (512, 768, 768)]

_CHILD = r"""
import json, sys, time
import numpy as np, jax, jax.numpy as jnp
res = {}
for m, k, n in json.loads(sys.argv[1]):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((m, k), np.float32))
    w = jnp.asarray(np.random.default_rng(1).standard_normal((n, k), np.float32))
    f = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))))
    f(x, w).block_until_ready()
    ts = []
    for _ in range(7):
        t = time.perf_counter(); f(x, w).block_until_ready(); ts.append(time.perf_counter() - t)
    res[f"{m}x{k}x{n}"] = 2 * m * k * n / sorted(ts)[3] / 1e9
print(json.dumps(res))
"""


def numpy_gflops(shapes) -> dict[str, float]:
    import time

    import numpy as np
    res = {}
    for m, k, n in shapes:
        x = np.random.default_rng(0).standard_normal((m, k), np.float32)
        w = np.random.default_rng(1).standard_normal((n, k), np.float32)
        x @ w.T
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            x @ w.T
            ts.append(time.perf_counter() - t)
        res[f"{m}x{k}x{n}"] = 2 * m * k * n / sorted(ts)[3] / 1e9
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json_out", default=None)
    args = ap.parse_args()
    results = {"numpy": numpy_gflops(SHAPES)}
    for name, flag in FLAG_SETS.items():
        env = dict(os.environ, XLA_FLAGS=flag)
        p = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(SHAPES)], env=env,
                           capture_output=True, text=True)
        if p.returncode:
            print(f"{name}: failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        results[name] = json.loads(p.stdout.strip().splitlines()[-1])
    keys = [f"{m}x{k}x{n}" for m, k, n in SHAPES]
    print(f"{'GFLOP/s (M x K x N)':<14}" + "".join(f"{k:>16}" for k in keys))
    for name, row in results.items():
        print(f"{name:<14}" + "".join(f"{row.get(k, float('nan')):>16.1f}" for k in keys))
    if args.json_out:
        os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump({"gflops": results, "flags": FLAG_SETS}, f, indent=1)


if __name__ == "__main__":
    main()
