"""The prefill GEMMs through XLA:CPU (what jaxserve's mixed steps run), through jaxserve's native
kernel (its tall path: every product with `batch_invariant`) and through PyTorch (what vLLM's CPU
backend runs), on the same machine, interleaved.

  python benchmarks/gemm_libraries.py [--torch_python=/path/to/venv/bin/python] [--rounds=5]
      [--json_out=benchmarks/results/gemm_libraries.json]

Shapes: a 528-row mixed step (512 chunk rows + 16 decode rows) of the bench model's layer
products, f32[528, K] x [N, K]^T (weights stored [out, in], as both engines keep them), plus
2048^3. Each library runs in its own process (torch from --torch_python, e.g. vLLM's
virtualenv; jaxserve never imports torch), both pinned to the machine's cores with their default
threading; the two alternate for --rounds rounds so that a busy neighbour slows both alike.
Per shape: the median over rounds of each round's median of 20 calls, in GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(528, 768, 1280), (528, 768, 768), (528, 768, 4096), (528, 2048, 768),
          (2048, 2048, 2048)]

_CHILD = r"""
import json, sys, time
import numpy as np
lib, shapes, reps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
out = {}
if lib in ("xla", "native"):
    import jax
    if lib == "xla":
        mm = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ()))))
    else:
        from jaxserve.native.matmul import skinny_matmul
        mm = jax.jit(lambda a, b: skinny_matmul(a, b, out_in=True))
    def make(m, k, n):
        a = jax.numpy.asarray(np.random.randn(m, k).astype(np.float32))
        b = jax.numpy.asarray(np.random.randn(n, k).astype(np.float32))
        return lambda: jax.block_until_ready(mm(a, b))
else:
    import torch
    torch.set_grad_enabled(False)
    def make(m, k, n):
        a, b = torch.randn(m, k), torch.randn(n, k)
        return lambda: torch.nn.functional.linear(a, b)
for m, k, n in shapes:
    f = make(m, k, n)
    for _ in range(3):
        f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    out[f"{m}x{k}x{n}"] = 2 * m * k * n / float(np.median(ts)) / 1e9
if lib == "torch":
    out["_version"] = torch.__version__
    out["_threads"] = torch.get_num_threads()
print("RESULT " + json.dumps(out))
"""


def run_child(python: str, lib: str, reps: int) -> dict:
    p = subprocess.run([python, "-c", _CHILD, lib, json.dumps(SHAPES), str(reps)],
                       capture_output=True, text=True, timeout=600)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{lib} child failed: {p.stderr.strip().splitlines()[-3:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--torch_python", default="",
                    help="a Python with torch (e.g. vLLM's virtualenv); without it, XLA only")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json_out", default=str(ROOT / "benchmarks/results/gemm_libraries.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from jaxserve.bench.machine import cpu_description, cpu_line
    from jaxserve.bench.report import write_json

    libs = {"xla": sys.executable}
    from jaxserve.native import matmul_build
    if matmul_build.supported():
        libs["native"] = sys.executable
    if args.torch_python:
        libs["torch"] = args.torch_python
    rounds = {lib: [] for lib in libs}
    for _ in range(args.rounds):
        for lib, python in libs.items():
            rounds[lib].append(run_child(python, lib, args.reps))
    import numpy as np
    keys = [f"{m}x{k}x{n}" for m, k, n in SHAPES]
    table = {lib: {key: float(np.median([r[key] for r in rs])) for key in keys}
             for lib, rs in rounds.items()}
    print(f"CPU: {cpu_line()}")
    ratios = [(a, "torch") for a in libs if a != "torch" and "torch" in libs]
    if "native" in libs:
        ratios.append(("native", "xla"))
    head = f"{'shape (M x K x N)':>18} " + " ".join(f"{lib + ' GFLOP/s':>14}" for lib in libs)
    head += "".join(f" {a + ' / ' + b:>15}" for a, b in ratios)
    print(head)
    for key in keys:
        line = f"{key:>18} " + " ".join(f"{table[lib][key]:>14.1f}" for lib in libs)
        line += "".join(f" {table[a][key] / table[b][key]:>15.2f}" for a, b in ratios)
        print(line)
    extra = {}
    if "torch" in libs:
        extra = {"torch_version": rounds["torch"][0]["_version"],
                 "torch_threads": rounds["torch"][0]["_threads"]}
    result = {"cpu": cpu_description(), "shapes": keys, "rounds": args.rounds,
              "reps": args.reps, "gflops": table, **extra,
              "command": "python benchmarks/gemm_libraries.py " + " ".join(sys.argv[1:])}
    write_json(args.json_out, result)


if __name__ == "__main__":
    main()
