"""Decode-step matmul experiment: variants of the native skinny matmul on the bench model's
weights-only decode step, through the real XLA FFI custom-call path.

  PYTHONPATH=. JAXSERVE_CACHE_DIR=/tmp/exp-decode-cache python benchmarks/decode_experiment.py \
      [--rounds=12] [--reps=5] [--variants=a,b,...] [--json_out=...]

Builds benchmarks/decode_experiment/variants.cc (one FFI handler, the variant picked by its
attributes; see the file) and times y[16, N] = x[16, K] @ w[K, N] for (K, N) = (768, 1280),
(768, 768), (768, 4096), (2048, 768) x 12 layers (distinct weights) and (768, 32000) once,
chained like a decode step (each product's input depends on the previous output), 400 MB of
float32 weights. Every variant is timed in rounds, interleaved with the others in one process,
and reported as the median step time, GB/s of weights and its ratio to today's kernel
(jaxserve.native.matmul.skinny_matmul, "today"), with the repo's two-core read probe (a jitted
sum over 512 MiB, best of 10: benchmarks/decode_bandwidth.py) measured before and after. Each
variant's step output is checked bit-identical to today's kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

M = 16
LAYERS = 12
SHAPES = {"qkv": (768, 1280), "o": (768, 768), "gate_up": (768, 4096), "down": (2048, 768),
          "lm_head": (768, 32000)}
BASE = dict(packed=0, width=0, pf=2, block_k=32, tile=0, hint=0, read_only=0, order=0)
# name: (attribute overrides, huge pages)
VARIANTS = {
    "rowmajor": ({}, False),  # today's kernel, rebuilt here (a check of the harness)
    "rowmajor_nopf": ({"pf": 0}, False),
    "rowmajor_order1": ({"order": 1}, False),
    "rowmajor_bk16": ({"block_k": 16, "pf": 4}, False),
    "rowmajor_t16": ({"tile": 1}, False),
    "rowmajor_huge": ({}, True),
    "packed": ({"packed": 1}, False),
    "packed_order1": ({"packed": 1, "order": 1}, False),
    "bt": ({"packed": 2}, False),
    "bt_order1": ({"packed": 2, "order": 1}, False),
    "bt_nopf": ({"packed": 2, "pf": 0}, False),
    "bt_order1_nopf": ({"packed": 2, "order": 1, "pf": 0}, False),
    "bt_pf1": ({"packed": 2, "pf": 1}, False),
    "bt_pf4": ({"packed": 2, "pf": 4}, False),
    "bt_nta": ({"packed": 2, "hint": 1}, False),
    "bt_t1": ({"packed": 2, "hint": 2}, False),
    "bt_bk16": ({"packed": 2, "block_k": 16, "pf": 4}, False),
    "bt_bk64": ({"packed": 2, "block_k": 64, "pf": 1}, False),
    "bt_w256": ({"packed": 2, "width": -256}, False),
    "bt_w1024": ({"packed": 2, "width": -1024}, False),
    "bt_t16": ({"packed": 2, "tile": 1}, False),
    "bt_t16_nopf": ({"packed": 2, "tile": 1, "pf": 0}, False),
    "bt_t16_pf1": ({"packed": 2, "tile": 1, "pf": 1}, False),
    "bt_t16_pf4": ({"packed": 2, "tile": 1, "pf": 4}, False),
    "bt_t16_t1": ({"packed": 2, "tile": 1, "hint": 2}, False),
    "bt_t16_bk64": ({"packed": 2, "tile": 1, "block_k": 64, "pf": 1}, False),
    "bt_t16_bk16": ({"packed": 2, "tile": 1, "block_k": 16, "pf": 4}, False),
    "bt_t16_w1024": ({"packed": 2, "tile": 1, "width": -1024}, False),
    "bt_t16_w256": ({"packed": 2, "tile": 1, "width": -256}, False),
    "bt_t16_huge": ({"packed": 2, "tile": 1}, True),
    "bt_huge": ({"packed": 2}, True),
    "bt_order1_huge": ({"packed": 2, "order": 1}, True),
    "oi_r24": ({"packed": 3, "tile": 2, "pf": 0}, False),
    "oi_r24_pf4": ({"packed": 3, "tile": 2, "pf": 4}, False),
    "oi_r24_pf8": ({"packed": 3, "tile": 2, "pf": 8}, False),
    "oi_r24_pf2": ({"packed": 3, "tile": 2, "pf": 2}, False),
    "oi_r24_pf4_t1": ({"packed": 3, "tile": 2, "pf": 4, "hint": 2}, False),
    "oi_r28_pf4": ({"packed": 3, "tile": 4, "pf": 4}, False),
    "oi_r16_pf4": ({"packed": 3, "tile": 3, "pf": 4}, False),
    "oi_r24_pf4_huge": ({"packed": 3, "tile": 2, "pf": 4}, True),
    "oi_r16": ({"packed": 3, "tile": 3, "pf": 0}, False),
    "oi_r28": ({"packed": 3, "tile": 4, "pf": 0}, False),
    "oi_r24_huge": ({"packed": 3, "tile": 2, "pf": 0}, True),
    "read_oi": ({"packed": 3, "read_only": 1}, False),
    "read_rowmajor": ({"read_only": 1}, False),
    "read_bt": ({"packed": 2, "read_only": 1}, False),
    "empty": ({"read_only": 2}, False),
}


def build() -> str:
    import jax
    out = "/tmp/exp-decode-variants.so"
    src = HERE / "decode_experiment" / "variants.cc"
    subprocess.run(["g++", "-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-fPIC",
                    "-shared", "-w", f"-I{jax.ffi.include_dir()}", str(src), "-o", out],
                   check=True)
    return out


def register(path: str) -> None:
    import ctypes

    import jax
    lib = ctypes.cdll.LoadLibrary(path)
    jax.ffi.register_ffi_target("exp_matmul", jax.ffi.pycapsule(lib.ExpMatmul), platform="cpu")
    jax.ffi.register_ffi_target("exp_hugepage", jax.ffi.pycapsule(lib.ExpHugepage),
                                platform="cpu")


def default_width(n: int, workers: int, strip: int = 512) -> int:
    rounds = max(1, -(-n // (workers * strip)))
    return (-(-n // (workers * rounds)) + 31) // 32 * 32


def strip_width(n: int, width: int, workers: int) -> int:
    return width if width > 0 else default_width(n, workers, -width if width < 0 else 512)


def pack(w: np.ndarray, wd: int) -> np.ndarray:
    """[K, N] -> strip-major [S, K, wd] (N padded with zeros to S * wd), flattened."""
    k, n = w.shape
    s = -(-n // wd)
    wp = np.zeros((k, s * wd), np.float32)
    wp[:, :n] = w
    return np.ascontiguousarray(wp.reshape(k, s, wd).transpose(1, 0, 2)).reshape(-1)


def pack_bt(w: np.ndarray, wd: int, bk: int, tw: int) -> np.ndarray:
    """[K, N] -> [S, blocks, wd / tw, kn, tw]: strip-major, block-major, tile-major (a block's
    tiles one after another, each tile's kn rows of tw contiguous), flattened."""
    k, n = w.shape
    s = -(-n // wd)
    wp = np.zeros((k, s * wd), np.float32)
    wp[:, :n] = w
    out = np.empty((s, k * wd), np.float32)
    for k0 in range(0, k, bk):
        kn = min(bk, k - k0)
        blk = wp[k0:k0 + kn].reshape(kn, s, wd // tw, tw).transpose(1, 2, 0, 3)
        out[:, k0 * wd:(k0 + kn) * wd] = blk.reshape(s, -1)
    return out.reshape(-1)


def exp_mm(x, w, n, attrs):
    import jax
    import jax.numpy as jnp
    call = jax.ffi.ffi_call("exp_matmul", jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
    return call(x, w, n=np.int64(n), **{k: np.int64(v) for k, v in attrs.items()})


def step_fn(mm):
    """A weights-only decode step: 12 layers of (qkv, o, gate_up, down), then the lm_head, each
    product's input depending on the previous product's output."""
    def step(x, ws):
        h = x
        for layer in ws["layers"]:
            qkv = mm(h, layer["qkv"], SHAPES["qkv"][1])
            h = h + 1e-3 * qkv[:, :768]
            h = h + 1e-3 * mm(h, layer["o"], SHAPES["o"][1])
            gu = mm(h, layer["gate_up"], SHAPES["gate_up"][1])
            a = 1e-3 * gu[:, :2048] * gu[:, 2048:]
            h = h + 1e-3 * mm(a, layer["down"], SHAPES["down"][1])
        return mm(h, ws["lm_head"], SHAPES["lm_head"][1])
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json_out", default="")
    ap.add_argument("--out_in", action="store_true",
                    help="also time jaxserve's kernel on [out, in] weights (skinny_matmul(..., "
                         "out_in=True))")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from decode_bandwidth import read_probe
    from jaxserve.native.matmul import skinny_matmul

    register(build())
    workers = 2  # XLA's CPU intra-op pool here: checked by the packed variants' size check
    names = [v for v in args.variants.split(",") if v]
    rng = np.random.default_rng(0)
    raw = {"layers": [{s: (rng.standard_normal(SHAPES[s], np.float32)
                           / np.sqrt(SHAPES[s][0])).astype(np.float32)
                       for s in ("qkv", "o", "gate_up", "down")} for _ in range(LAYERS)],
           "lm_head": (rng.standard_normal(SHAPES["lm_head"], np.float32) / np.sqrt(768))}
    wbytes = 4 * (LAYERS * sum(k * n for s, (k, n) in SHAPES.items() if s != "lm_head")
                  + 768 * 32000)
    x = jnp.asarray(rng.standard_normal((M, 768), np.float32))

    # Weight copies: one per (layout, strip width, huge pages).
    copies = {}

    def weights(attrs, huge):
        tw = 32 if attrs["tile"] == 0 else 16
        key = (attrs["packed"], attrs["width"] if attrs["packed"] in (1, 2) else 0,
               (attrs["block_k"], tw) if attrs["packed"] == 2 else None, huge)
        if key not in copies:
            def conv(w):
                wd = strip_width(w.shape[1], attrs["width"], workers)
                if attrs["packed"] == 1:
                    return jnp.asarray(pack(w, wd))
                if attrs["packed"] == 3:
                    return jnp.asarray(np.ascontiguousarray(w.T))
                if attrs["packed"] == 2:
                    return jnp.asarray(pack_bt(w, wd, attrs["block_k"], tw))
                return jnp.asarray(w)
            ws = jax.tree_util.tree_map(conv, raw)
            if huge:
                hp = jax.jit(lambda w: jax.ffi.ffi_call(
                    "exp_hugepage", jax.ShapeDtypeStruct((1,), jnp.int32))(w))
                rcs = [int(hp(w)[0]) for w in jax.tree_util.tree_leaves(ws)]
                print(f"  huge pages {key}: madvise errors {sorted(set(rcs))}")
            copies[key] = ws
        return copies[key]

    fns = {"today": (jax.jit(step_fn(lambda x, w, n: skinny_matmul(x, w))),
                     weights(dict(BASE), False))}
    if args.out_in:  # the kernel as committed, on [out, in] weights (the fused_native layout)
        fns["kernel_out_in"] = (
            jax.jit(step_fn(lambda x, w, n: skinny_matmul(x, w, out_in=True))),
            weights(dict(BASE, packed=3), False))
    for v in names:
        over, huge = VARIANTS[v]
        attrs = dict(BASE, **over)
        fns[v] = (jax.jit(step_fn(lambda x, w, n, attrs=attrs: exp_mm(x, w, n, attrs))),
                  weights(attrs, huge))

    ref = np.asarray(fns["today"][0](x, fns["today"][1]))
    identical = {}
    for v, (f, ws) in fns.items():
        out = np.asarray(f(x, ws))
        identical[v] = bool(np.array_equal(out, ref))
    print("bit-identical to today's kernel:",
          {v: ok for v, ok in identical.items() if not v.startswith(("read_", "empty"))})

    probe_before = read_probe()
    ts = {v: [] for v in fns}
    t0 = time.time()
    for r in range(args.rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for v in order:
            f, ws = fns[v]
            jax.block_until_ready(f(x, ws))
            for _ in range(args.reps):
                t = time.perf_counter()
                jax.block_until_ready(f(x, ws))
                ts[v].append(time.perf_counter() - t)
    probe_after = read_probe()
    probe = max(probe_before, probe_after)
    print(f"{args.rounds} rounds x {args.reps} reps in {time.time() - t0:.0f} s; read probe "
          f"{probe_before:.1f} GB/s before, {probe_after:.1f} after; weights {wbytes / 1e6:.0f} MB")
    base = float(np.median(ts["today"]))
    res = {}
    print(f"{'variant':<18}{'ms med':>8}{'ms best':>9}{'GB/s':>7}{'MBU':>6}{'vs today':>10}"
          f"{'bitexact':>9}")
    for v, t in ts.items():
        med = float(np.median(t))
        # Per-round medians' ratio to today's in the same round: robust to drifting load.
        per_round = [np.median(t[i * args.reps:(i + 1) * args.reps])
                     / np.median(ts["today"][i * args.reps:(i + 1) * args.reps])
                     for i in range(args.rounds)]
        res[v] = {"ms_median": med * 1e3, "ms_best": min(t) * 1e3, "gbps": wbytes / med / 1e9,
                  "mbu": wbytes / med / 1e9 / probe, "speedup_vs_today": base / med,
                  "speedup_vs_today_per_round_median": 1 / float(np.median(per_round)),
                  "bit_identical": identical[v]}
        print(f"{v:<18}{med * 1e3:8.1f}{min(t) * 1e3:9.1f}{wbytes / med / 1e9:7.1f}"
              f"{res[v]['mbu']:6.2f}{base / med:9.2f}x ({res[v]['speedup_vs_today_per_round_median']:.2f})"
              f"{'' if v.startswith(('read_', 'empty')) else str(identical[v]):>7}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"read_gbps_before": probe_before, "read_gbps_after": probe_after,
                       "weight_bytes": wbytes, "rounds": args.rounds, "reps": args.reps,
                       "variants": {v: dict(zip(("attrs", "huge_pages"),
                                                (dict(BASE, **VARIANTS[v][0]), VARIANTS[v][1])))
                                    for v in names},
                       "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
