"""Decode attention on the CPU: the native kernel's K/V read rate in a decode step, cold.

  python benchmarks/decode_attention.py [--baseline=REV] [--rounds=8]
                                        [--json_out=benchmarks/results/decode_attention.json]

A decode step's attention of the bench model: 16 rows (one per sequence, each at `context`
keys), 12 layers of a stacked float32 cache (12 query / 4 KV heads, head_dim 64, pages of 16,
each sequence's pages scattered), called layer after layer in one jitted function as the
engine's step calls it. Before every timed call a 512 MiB read evicts the caches, as a decode
step's 400 MB of weights do between one layer's attention and the next step's. GB/s = the K/V
bytes the rows must read (16 x context x 2 x 4 x 64 x 4 B per layer) / time. With --baseline the
kernel's sources at that git revision are built and timed interleaved with the tree's (same
inputs; outputs compared to the bit). "read" is XLA's jitted sum over the same number of bytes
(contiguous), cold: what streaming them costs without any attention.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from chunk_attention import register, register_baseline  # noqa: E402
from jaxserve.bench.machine import cpu_description, cpu_line  # noqa: E402
from jaxserve.bench.report import write_json  # noqa: E402
from jaxserve.native import build  # noqa: E402

ROWS, HEADS, KV_HEADS, HEAD_DIM, PAGE, LAYERS = 16, 12, 4, 64, 16, 12
CONTEXTS = (300, 1000, 2000)


def layers_fn(target: str, q, slots, lens, table):
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, q.dtype))

    def fn(q, k, v):
        o = q
        for layer in range(LAYERS):  # each layer's input depends on the last: a real order
            o = call(o, k, v, slots, lens, table, jnp.full((1,), layer, jnp.int32),
                     scale=np.float32(1 / np.sqrt(HEAD_DIM)))
        return o
    return jax.jit(fn)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default=None, help="git revision whose kernel to time too")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json_out", default=str(ROOT / "benchmarks/results/decode_attention.json"))
    args = ap.parse_args()

    targets = {"kernel": "decode_bench_kernel"}
    register(build.library_path(), targets["kernel"])
    if args.baseline:
        register_baseline(args.baseline, "decode_bench_baseline")
        targets["baseline"] = "decode_bench_baseline"

    print(f"CPU: {cpu_line()}")
    evict = jnp.ones((128 << 20,), jnp.float32)
    read = jax.jit(jnp.sum)
    rng = np.random.default_rng(0)
    rows = []
    for context in CONTEXTS:
        pages = -(-context // PAGE)
        num_pages = ROWS * pages + 1
        shape = (LAYERS, num_pages, PAGE, KV_HEADS, HEAD_DIM)
        k = jnp.asarray(rng.standard_normal(shape, np.float32))
        v = jnp.asarray(rng.standard_normal(shape, np.float32))
        table = np.zeros((ROWS, 2048 // PAGE), np.int32)
        table[:, :pages] = (1 + rng.permutation(ROWS * pages)).reshape(ROWS, pages)
        q = jnp.asarray(rng.standard_normal((ROWS, HEADS, HEAD_DIM), np.float32))
        slots = jnp.arange(ROWS, dtype=jnp.int32)
        lens = jnp.full(ROWS, context, jnp.int32)
        nbytes = LAYERS * ROWS * context * 2 * KV_HEADS * HEAD_DIM * 4
        flat = jnp.ones((nbytes // 4,), jnp.float32)
        runs = {name: (lambda f=layers_fn(t, q, slots, lens, jnp.asarray(table)): f(q, k, v))
                for name, t in targets.items()}
        runs["read"] = lambda: read(flat)
        outs = {name: np.asarray(run()) for name, run in runs.items()}  # compile + warm
        times = {name: [] for name in runs}
        for r in range(args.rounds):
            # The kernels go first in alternate rounds: run first, a kernel measured ~3% slower
            # than the same kernel run second (an A/A run against HEAD).
            for name in list(runs) if r % 2 == 0 else list(reversed(runs)):
                run = runs[name]
                for _ in range(args.reps):
                    read(evict).block_until_ready()
                    t = time.perf_counter()
                    jax.block_until_ready(run())
                    times[name].append(time.perf_counter() - t)
        row = {"context": context, "kv_mb": nbytes / 1e6}
        for name in runs:
            med = float(np.median(times[name]))
            row[name] = {"ms": med * 1e3, "gbps": nbytes / med / 1e9}
        if "baseline" in outs:
            row["bit_identical_to_baseline"] = bool(np.array_equal(outs["kernel"],
                                                                   outs["baseline"]))
        rows.append(row)
        del k, v, flat

    names = list(runs)
    print(f"{'context':>8} {'K/V MB':>7} " + " ".join(f"{n + ' ms':>14} {'GB/s':>6}"
                                                    for n in names))
    for row in rows:
        print(f"{row['context']:>8} {row['kv_mb']:>7.0f} " + " ".join(
            f"{row[n]['ms']:>14.2f} {row[n]['gbps']:>6.1f}" for n in names))
    if args.baseline:
        print("kernel speed-up over baseline: " + ", ".join(
            f"{r['context']}: {r['baseline']['ms'] / r['kernel']['ms']:.2f}x "
            f"(bit-identical: {r['bit_identical_to_baseline']})" for r in rows))
    result = {"cpu": cpu_description(), "rows": ROWS, "layers": LAYERS,
              "shape": dict(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, page_size=PAGE,
                            dtype="float32"),
              "baseline_revision": args.baseline, "rounds": args.rounds, "reps": args.reps,
              "results": rows,
              "command": "python benchmarks/decode_attention.py " + " ".join(sys.argv[1:])}
    if args.json_out:
        write_json(args.json_out, result)


if __name__ == "__main__":
    main()
