"""Chunk-row attention on the CPU: the native kernel's GFLOP/s against XLA's f32 GEMM peak.

  python benchmarks/chunk_attention.py [--baseline=REV] [--repeats=9] [--dtype=bfloat16]
                                       [--json_out=benchmarks/results/chunk_attention.json]

In one process: (1) XLA's f32 GEMM peak (best of 10 jitted 2048^3 matmuls before the rest and
10 after: the higher), (2) the native kernel (jaxserve/native, as in the tree) on one 512-row
prefill chunk at contexts 512/1024/1536/2048 (the bench model's attention: 12 query heads,
4 kv heads, head_dim 64, pages of 16, float32 unless --dtype; row r sees the first
context - 512 + r + 1 keys), (3) the same chunk through the XLA reference
(jaxserve.attention.reference_attention), and with --baseline the kernel's sources at that git
revision, built into the same cache and registered under another FFI target. FLOPs count the
two matmuls: 4 * heads * head_dim * sum over rows of row_len. Times are medians of --repeats
calls, in 3 rounds of consecutive calls per variant, so that a busy neighbour slows each alike
(the machine may be shared: compare ratios).
"""

from __future__ import annotations

import argparse
import inspect
import math
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
from jaxserve.bench.roofline import gemm_gflops  # noqa: E402
from jaxserve.native import build  # noqa: E402
from pallas_kernels.ragged import stacked_cache  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE, CHUNK = 12, 4, 64, 16, 512
CONTEXTS = (512, 1024, 1536, 2048)
ROUNDS = 3


def register(path: Path, target: str) -> None:
    """The attention library at `path`, its kernel registered as `target`."""
    revision.register(path, "JaxservePagedAttention", target)


def register_baseline(rev: str, target: str) -> None:
    """The attention kernel's sources at git `rev`, built (into the same cache) and registered
    under `target`, to time against the tree's."""
    revision.register_at_revision(build.ATTENTION, rev, "JaxservePagedAttention", target)


def kernel_fn(target: str):
    def fn(q, k, v, row_slot, row_len, table):
        k, v, layer = stacked_cache(k, v, None)
        call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, q.dtype))
        return call(q, k, v, row_slot, row_len, table, layer,
                    scale=np.float32(1 / math.sqrt(q.shape[-1])))
    return jax.jit(fn)


def make_case(context: int, rng: np.random.Generator):
    """One chunk of CHUNK rows ending at `context`, pages in shuffled order."""
    pages = context // PAGE
    num_pages = pages + 1
    k = rng.standard_normal((num_pages, PAGE, KV_HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((num_pages, PAGE, KV_HEADS, HEAD_DIM)).astype(np.float32)
    table = np.zeros((1, 2048 // PAGE), np.int32)
    table[0, :pages] = rng.permutation(np.arange(1, num_pages))
    q = rng.standard_normal((CHUNK, HEADS, HEAD_DIM)).astype(np.float32)
    positions = np.arange(context - CHUNK, context, dtype=np.int32)
    return dict(q=q, k=k, v=v, table=table, positions=positions, context=context)


def reference_fn(case):
    """The XLA reference on the case, for whichever signature jaxserve.attention has now; None
    if it does not fit."""
    from jaxserve.attention import AttentionShape, reference_attention
    params = inspect.signature(reference_attention).parameters
    fields = {f for f in AttentionShape.__dataclass_fields__}
    pps = case["table"].shape[1]
    kv = jnp.asarray([case["context"]], jnp.int32)
    if "q_starts" in params and "chunk_tokens" in fields:
        extra = {"chunk_align": CHUNK} if "chunk_align" in fields else {}
        shape = AttentionShape(chunk_tokens=CHUNK, max_chunk_seqs=1, num_decode_slots=0,
                               page_size=PAGE, pages_per_seq=pps, **extra)
        kw = dict(q_starts=jnp.zeros(1, jnp.int32), q_lens=jnp.full(1, CHUNK, jnp.int32))
    elif "chunk_lens" in params and "num_chunk_slots" in fields:
        shape = AttentionShape(1, CHUNK, 0, PAGE, pps)
        kw = dict(chunk_lens=jnp.full(1, CHUNK, jnp.int32))
    else:
        return None
    f = jax.jit(lambda q, k, v: reference_attention(
        q, k, v, positions=jnp.asarray(case["positions"]), kv_lens=kv,
        page_table=jnp.asarray(case["table"]),
        shape=shape, **kw))
    q, k, v = (jnp.asarray(case[n]) for n in "qkv")
    return lambda: f(q, k, v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default=None,
                    help="git revision whose jaxserve/native kernel to time as well")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--no_reference", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="of q and the cache (the GEMM peak stays float32)")
    ap.add_argument("--json_out", default=str(ROOT / "benchmarks/results/chunk_attention.json"))
    args = ap.parse_args()

    variants = {}
    register(build.library_path(), "bench_kernel")
    variants["kernel"] = kernel_fn("bench_kernel")
    if args.baseline:
        register_baseline(args.baseline, "bench_baseline")
        variants["baseline"] = kernel_fn("bench_baseline")

    cpu = cpu_description()
    print(f"CPU: {cpu_line()}")
    # Best of 10 before and 10 after the attention runs: a busy neighbour lowers a best of 10.
    peaks = [gemm_gflops()]
    rng = np.random.default_rng(0)
    rows, notes = [], []
    for context in CONTEXTS:
        case = make_case(context, rng)
        row_len = case["positions"] + 1
        flops = 4 * HEADS * HEAD_DIM * int(row_len.sum())
        runs = {}
        # On the device (the CPU) once: the timed calls copy nothing in.
        dt = jnp.dtype(args.dtype)
        case.update({n: np.asarray(jnp.asarray(case[n], dt)) for n in "qkv"})
        args_k = tuple(jnp.asarray(x) for x in (case["q"], case["k"], case["v"],
                                                np.zeros(CHUNK, np.int32), row_len,
                                                case["table"]))
        for name, f in variants.items():
            runs[name] = lambda f=f: f(*args_k)
        if not args.no_reference:
            ref = None
            try:
                ref = reference_fn(case)
            except Exception as e:  # noqa: BLE001 - the lead is changing this signature
                notes.append(f"reference skipped: {type(e).__name__}: {e}")
            if ref is None and not notes:
                notes.append("reference skipped: reference_attention's signature not known")
            if ref is not None:
                runs["xla_reference"] = ref
        outs = {name: np.asarray(run()) for name, run in runs.items()}  # compile + warm
        want = outs.get("xla_reference")
        # Rounds of consecutive calls per variant, after one untimed call: called right after
        # another executable (every call interleaved), the kernel measured up to ~2x slower on
        # 2 cores (the other's thread pool still busy, presumably); inside one executable,
        # after a matmul, it costs what it costs alone.
        times = {name: [] for name in runs}
        for _ in range(ROUNDS):
            for name, run in runs.items():
                jax.block_until_ready(run())
                for _ in range(-(-args.repeats // ROUNDS)):
                    t = time.perf_counter()
                    jax.block_until_ready(run())
                    times[name].append(time.perf_counter() - t)
        row = {"context": context, "rows": CHUNK, "gflop": flops / 1e9}
        for name in runs:
            med = float(np.median(times[name]))
            row[name] = {"ms": med * 1e3, "gflops": flops / med / 1e9}
            if want is not None and name != "xla_reference":
                err = np.abs(outs[name].astype(np.float32) - want.astype(np.float32))
                row[name]["max_abs_err_vs_reference"] = float(np.max(err))
        rows.append(row)

    peaks.append(gemm_gflops())
    peak = max(peaks)
    print(f"XLA f32 GEMM peak (2048^3, best of 10 before / after: "
          f"{peaks[0]:.1f} / {peaks[1]:.1f}): {peak:.1f} GFLOP/s")
    for row in rows:
        for name in row:
            if isinstance(row[name], dict):
                row[name]["fraction_of_gemm_peak"] = row[name]["gflops"] / peak
    names = list(rows[0].keys())[3:]
    head = f"{'context':>8} {'GFLOP':>6} " + " ".join(f"{n + ' ms':>18} {'GFLOP/s':>8} {'%peak':>6}"
                                                     for n in names)
    print(head)
    for row in rows:
        print(f"{row['context']:>8} {row['gflop']:>6.2f} " + " ".join(
            f"{row[n]['ms']:>18.2f} {row[n]['gflops']:>8.1f} "
            f"{100 * row[n]['fraction_of_gemm_peak']:>5.0f}%" for n in names))
    if "baseline" in names:
        print("kernel speed-up over baseline: " + ", ".join(
            f"{r['context']}: {r['baseline']['ms'] / r['kernel']['ms']:.2f}x" for r in rows))
    for note in dict.fromkeys(notes):
        print(note)
    result = {"cpu": cpu, "gemm_peak_gflops": peak, "gemm_peak_before_after": peaks,
              "shape": dict(
        heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, page_size=PAGE, chunk_rows=CHUNK,
        dtype=args.dtype), "baseline_revision": args.baseline, "repeats": args.repeats,
        "threads": "XLA's intra-op pool (all cpus)", "results": rows,
        "notes": list(dict.fromkeys(notes))}
    if args.json_out:
        write_json(args.json_out, result)


if __name__ == "__main__":
    main()
