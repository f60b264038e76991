"""Times the GPU Pallas attention against the engine's XLA attention on one step's batch.

  python benchmarks/pallas_gpu_attention.py [--json_out=out/pallas_gpu_attention.json]
  python benchmarks/pallas_gpu_attention.py --tiny      # CPU: interpret mode, tiny shapes

Batches in the engine's step layout (C chunk slots of P tokens + D decode slots), bfloat16,
Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128, page_size 16), pages
scattered at random through the cache:

  decode   D = 64 decodes, each with the whole context
  chunk    C = 4 chunks of P = 512 tokens, each the newest 512 tokens of its context
  mixed    C = 2 chunks of 512 tokens + D = 64 decodes

for contexts 1k, 2k, 4k, 8k. Each case first checks the kernel against the reference (max abs
error on live rows), then times both (median of --repeats after warm-up). Decode rows also
report the kernel's K/V read bandwidth against the card's measured copy bandwidth.

`--tiny` runs the same path on the CPU through Pallas' interpreter with tiny shapes: a check
that the script and the kernel work, not a timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxserve.attention import AttentionShape, attention_fn, reference_attention  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Dims:
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    decodes: int = 64
    chunk_len: int = 512
    chunks_only: int = 4  # chunks of chunk_len rows packed in a chunk-only batch
    chunks_mixed: int = 2  # chunks packed in a mixed batch
    contexts: tuple[int, ...] = (1024, 2048, 4096, 8192)


TINY = Dims(num_heads=4, num_kv_heads=2, head_dim=16, page_size=16, decodes=3, chunk_len=16,
            chunks_only=2, chunks_mixed=1, contexts=(32, 64))


def make_batch(dims: Dims, kind: str, context: int, dtype, seed: int = 0):
    """(AttentionShape, q, k_pages, v_pages, metadata kwargs) for one case; every row live."""
    c = {"decode": 0, "chunk": dims.chunks_only, "mixed": dims.chunks_mixed}[kind]
    d = 0 if kind == "chunk" else dims.decodes
    p, ps = dims.chunk_len, dims.page_size
    pages_per_seq = -(-context // ps)
    s = c + d
    num_pages = 1 + s * pages_per_seq
    rng = np.random.default_rng(seed)
    perm = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
    page_table = perm.reshape(s, pages_per_seq)
    kv_lens = np.full(s, context, np.int32)
    # Chunks packed back to back (each chunk_len rows), then the decode rows.
    q_starts = np.concatenate([np.arange(c) * p, c * p + np.arange(d)]).astype(np.int32)
    q_lens = np.concatenate([np.full(c, p), np.ones(d)]).astype(np.int32)
    t = c * p + d
    positions = np.concatenate([np.tile(np.arange(context - p, context), c),
                                np.full(d, context - 1)]).astype(np.int32)
    key = jax.random.PRNGKey(seed)
    kq, kk, kv = jax.random.split(key, 3)
    cache_shape = (num_pages, ps, dims.num_kv_heads, dims.head_dim)
    q = jax.random.normal(kq, (t, dims.num_heads, dims.head_dim), dtype)
    k_pages = jax.random.normal(kk, cache_shape, dtype)
    v_pages = jax.random.normal(kv, cache_shape, dtype)
    shape = AttentionShape(c * p, c, d, ps, pages_per_seq)
    meta = dict(positions=jnp.asarray(positions), q_starts=jnp.asarray(q_starts),
                q_lens=jnp.asarray(q_lens), kv_lens=jnp.asarray(kv_lens),
                page_table=jnp.asarray(page_table))
    return shape, q, k_pages, v_pages, meta


def median_seconds(fn, args, kwargs, repeats: int) -> float:
    jax.block_until_ready(fn(*args, **kwargs))
    jax.block_until_ready(fn(*args, **kwargs))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args, **kwargs))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes/s of a device copy (read + write), the card's practical memory bandwidth."""
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    return 2 * nbytes / median_seconds(f, (x,), {}, repeats)


def run_case(dims, kind, context, dtype, *, interpret: bool, repeats: int, tol: float) -> dict:
    shape, q, k_pages, v_pages, meta = make_batch(dims, kind, context, dtype)
    args = (q, k_pages, v_pages)
    ref_fn = jax.jit(functools.partial(reference_attention, shape=shape))
    ker_fn = jax.jit(attention_fn("pallas_gpu", shape, interpret=interpret))
    ref = np.asarray(ref_fn(*args, **meta), np.float32)
    got = np.asarray(ker_fn(*args, **meta), np.float32)
    err = float(np.max(np.abs(got - ref)))  # every row of these batches is live
    ok = bool(np.allclose(got, ref, atol=tol, rtol=tol))
    t_ref = median_seconds(ref_fn, args, meta, repeats)
    t_ker = median_seconds(ker_fn, args, meta, repeats)
    kv_bytes = 2 * shape.num_seqs * context * \
        dims.num_kv_heads * dims.head_dim * jnp.dtype(dtype).itemsize
    return dict(kind=kind, context=context, chunks=shape.max_chunk_seqs,
                chunk_len=dims.chunk_len, decodes=shape.num_decode_slots, max_abs_err=err, ok=ok,
                xla_ms=t_ref * 1e3, pallas_ms=t_ker * 1e3, speedup=t_ref / t_ker,
                kv_bytes=kv_bytes, pallas_kv_gbps=kv_bytes / t_ker / 1e9)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU interpret-mode check, tiny shapes")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--kinds", default="decode,chunk,mixed")
    ap.add_argument("--contexts", default="", help="comma-separated, default 1024..8192")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json_out", default="")
    args = ap.parse_args(argv)
    dims = TINY if args.tiny else Dims()
    if args.contexts:
        dims = dataclasses.replace(dims, contexts=tuple(int(x) for x in args.contexts.split(",")))
    platform = jax.default_backend()
    if not args.tiny and platform != "gpu":
        print(f"no GPU (default backend {platform!r}); run with --tiny for the CPU check")
        return 2
    dtype = jnp.dtype(args.dtype)
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    repeats = 2 if args.tiny else args.repeats
    device = jax.devices()[0].device_kind
    bandwidth = None if args.tiny else copy_bandwidth()
    rows = []
    for kind in args.kinds.split(","):
        for context in dims.contexts:
            row = run_case(dims, kind, context, dtype, interpret=args.tiny, repeats=repeats,
                           tol=tol)
            if bandwidth and kind == "decode":
                row["bandwidth_fraction"] = row["pallas_kv_gbps"] * 1e9 / bandwidth
            rows.append(row)

    print(f"device: {device}   dtype: {dtype.name}   copy bandwidth: "
          f"{'-' if bandwidth is None else f'{bandwidth / 1e9:.0f} GB/s'}"
          f"{'   (interpret mode: timings are meaningless)' if args.tiny else ''}")
    head = f"{'kind':<7}{'ctx':>6}{'C x P + D':>14}{'xla ms':>10}{'pallas ms':>11}" \
           f"{'speedup':>9}{'KV GB/s':>9}{'of BW':>7}{'max err':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        frac = r.get("bandwidth_fraction")
        batch = f"{r['chunks']} x {r['chunk_len']} + {r['decodes']}"
        print(f"{r['kind']:<7}{r['context']:>6}{batch:>14}"
              f"{r['xla_ms']:>10.3f}{r['pallas_ms']:>11.3f}{r['speedup']:>9.2f}"
              f"{r['pallas_kv_gbps']:>9.0f}{'-' if frac is None else f'{frac:.0%}':>7}"
              f"{r['max_abs_err']:>10.2e}")
    result = dict(device=device, dtype=dtype.name, interpret=args.tiny,
                  copy_bandwidth_gbps=None if bandwidth is None else bandwidth / 1e9,
                  dims=dataclasses.asdict(dims), rows=rows)
    print(json.dumps(result))
    if args.json_out:
        os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    bad = [r for r in rows if not r["ok"]]
    if bad:
        print(f"FAILED: {len(bad)} case(s) differ from the reference by more than {tol}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
