"""Is a decode step bound by reading the weights? Read bandwidth, GEMM peak, every 16-row product
of the bench model under XLA's options and the native skinny kernel, and a whole decode step.

  python benchmarks/decode_bandwidth.py [--json_out=benchmarks/results/decode_bandwidth.json]
      [--decode_only]  (the read probe and the decode step only)

- read probe: a jitted sum over 512 MiB of float32 (reads only), best of 10, with both cores and
  in a child process pinned to one core; numpy's sum (one thread) beside it.
- GEMM peak: a jitted 2048^3 float32 matmul, best of 10.
- products: x f32[16, K] @ W for the bench model's shapes (fused q/k/v, o, fused gate/up, down,
  lm_head), each over 12 distinct weight copies (2 for the lm_head) so the weights stream from
  memory as in a step; GB/s of weights read (median of 9 and best). Variants in this process:
  XLA with W [in, out] (the CPU serving layout) and [out, in] (Hugging Face's), XLA with N split
  in two explicit halves, the native kernel (jaxserve/native/matmul.cc). XLA flag variants each
  in a child process (XLA reads XLA_FLAGS once), plus XLA's default pinned to one core.
- decode step: the bench model's 12 layers and lm_head on 16 tokens (attention replaced by the
  identity: weights only), `fused_in_out` (XLA's dot) against the native kernel on `[in, out]`
  weights (`fused_in_out_native`) and on `[out, in]` weights (`fused_native`, the CPU default):
  weight bytes / time and MBU against the two-core read probe, measured interleaved.

The machine is shared: every variant is timed interleaved with its comparison in one process,
and the read probe is re-measured right before the products and the decode step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from jaxserve.bench.machine import cpu_description, cpu_line
from jaxserve.bench.roofline import gemm_gflops

M = 16
SHAPES = {"qkv": (768, 1280), "o": (768, 768), "gate_up": (768, 4096), "down": (2048, 768),
          "lm_head": (768, 32000)}
XLA_FLAG_VARIANTS = {
    "xla_ynn_off": "--xla_cpu_experimental_ynn_fusion_type=",
    "xla_xnnpack": "--xla_cpu_use_xnnpack=true",
    "xla_onednn": "--xla_cpu_use_onednn=true",
    "xla_eigen_1thread": "--xla_cpu_multi_thread_eigen=false",
}
READ_BYTES = 512 * 2**20


def _times(fn, *args, reps=9) -> list[float]:
    import jax
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return ts


def read_probe(reps: int = 10) -> float:
    import jax
    import jax.numpy as jnp
    x = jnp.ones((READ_BYTES // 4,), jnp.float32)
    return READ_BYTES / min(_times(jax.jit(lambda x: jnp.sum(x)), x, reps=reps)) / 1e9


def numpy_read_probe(reps: int = 5) -> float:
    x = np.ones(READ_BYTES // 4, np.float32)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t)
    return READ_BYTES / min(ts) / 1e9


def product_variants(names: list[str]) -> dict:
    """{shape: {variant: {"gbps_median", "gbps_best", "gflops_median"}}}, variants interleaved."""
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    res = {}
    for shape, (k, n) in SHAPES.items():
        copies = 2 if shape == "lm_head" else 12
        w_io = [jnp.asarray(rng.standard_normal((k, n), np.float32)) for _ in range(copies)]
        x = jnp.asarray(rng.standard_normal((M, k), np.float32))
        fns = {}
        if "xla_in_out" in names:
            fns["xla_in_out"] = (jax.jit(lambda x, ws: [x @ w for w in ws]), w_io)
        if "xla_split_n" in names:
            fns["xla_split_n"] = (jax.jit(lambda x, ws: [jnp.concatenate(
                [x @ w[:, : n // 2], x @ w[:, n // 2:]], axis=1) for w in ws]), w_io)
        if "xla_out_in" in names:
            w_oi = [w.T.copy() for w in w_io]
            fns["xla_out_in"] = (jax.jit(lambda x, ws: [jax.lax.dot_general(
                x, w, (((1,), (1,)), ((), ()))) for w in ws]), w_oi)
        if "native" in names:
            from jaxserve.native.matmul import skinny_matmul
            fns["native"] = (jax.jit(lambda x, ws: [skinny_matmul(x, w) for w in ws]), w_io)
        ts = {v: [] for v in fns}
        for _ in range(3):  # rounds, interleaved
            for v, (f, ws) in fns.items():
                ts[v] += _times(f, x, ws, reps=3)
        nbytes = copies * k * n * 4
        res[shape] = {v: {"gbps_median": nbytes / float(np.median(t)) / 1e9,
                          "gbps_best": nbytes / min(t) / 1e9,
                          "gflops_median": 2 * M * k * n * copies / float(np.median(t)) / 1e9}
                      for v, t in ts.items()}
    return res


DECODE_LAYOUTS = ("fused_in_out", "fused_in_out_native", "fused_native")


def decode_step(rounds: int = 5) -> dict:
    """The bench model's weights on 16 tokens: `fused_in_out`, `fused_in_out_native` and
    `fused_native`, interleaved."""
    import jax
    import jax.numpy as jnp

    from jaxserve.bench.roofline import model_costs
    from jaxserve.cli.make_bench_model import BENCH_HF_CONFIG
    from jaxserve.config import ModelConfig
    from jaxserve.models.functional import bind, init_params, resolve_layout, to_layout
    from jaxserve.models.llama import rope_table

    cfg = ModelConfig.from_hf_dict(BENCH_HF_CONFIG)
    hf = init_params(cfg, seed=0)
    rope = rope_table(cfg.rope, cfg.head_dim, 2048, jnp.float32)
    tokens = jnp.arange(M, dtype=jnp.int32) * 7
    positions = jnp.arange(M, dtype=jnp.int32) + 256

    def attend(layer, q, k, v, cache):  # weights only: attention is the identity
        return q, cache

    fns = {}
    for name in DECODE_LAYOUTS:
        layout = resolve_layout(name, "cpu")
        params = to_layout(cfg, hf, layout)

        def step(params, tokens, positions, layout=layout):
            model = bind(cfg, params, layout)
            h, _ = model.hidden_states(tokens, positions, attend, None, rope=rope)
            return model.logits(h)

        fns[name] = (jax.jit(step), params)
    out = {n: np.asarray(f(p, tokens, positions)) for n, (f, p) in fns.items()}
    ref = out["fused_in_out"]
    max_rel = float(np.max(np.abs(out["fused_in_out_native"] - ref)) / np.max(np.abs(ref)))
    # The two native layouts run the same arithmetic: the same bits.
    native_identical = bool(np.array_equal(out["fused_native"], out["fused_in_out_native"]))
    ts = {n: [] for n in fns}
    for _ in range(rounds):
        for n, (f, p) in fns.items():
            ts[n] += _times(f, p, tokens, positions, reps=5)
    wbytes = model_costs(cfg, "float32")["weight_bytes_per_step"]
    return {"weight_bytes": wbytes, "logits_max_rel_diff": max_rel,
            "native_layouts_bit_identical": native_identical,
            **{n: {"ms_median": float(np.median(t)) * 1e3, "ms_best": min(t) * 1e3,
                   "gbps_median": wbytes / float(np.median(t)) / 1e9} for n, t in ts.items()}}


def child(what: str) -> None:
    if what == "pin1":
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        print(json.dumps({"read_gbps": read_probe(),
                          "products": product_variants(["xla_in_out", "native"])}))
    else:
        print(json.dumps({"products": product_variants(["xla_in_out", "xla_out_in"])}))


def print_decode_step(d: dict, read: float) -> None:
    print(f"\ndecode step (16 tokens, weights only, {d['weight_bytes'] / 1e6:.0f} MB; read probe "
          f"{read:.1f} GB/s; logits max rel diff {d['logits_max_rel_diff']:.1e}; native layouts "
          f"bit-identical: {d['native_layouts_bit_identical']})")
    for n in DECODE_LAYOUTS:
        d[n]["mbu"] = d[n]["gbps_median"] / read
        print(f"  {n:<22} {d[n]['ms_median']:6.1f} ms (best {d[n]['ms_best']:.1f})  "
              f"{d[n]['gbps_median']:5.1f} GB/s  MBU {d[n]['mbu']:.2f}")


def decode_only(json_out: str) -> None:
    """The read probe before and after, and the decode step in 15 interleaved rounds."""
    import jax
    cpu = cpu_description()
    print(f"CPU: {cpu_line()}\njax {jax.__version__}")
    before = read_probe()
    d = decode_step(rounds=15)
    after = read_probe()
    read = max(before, after)
    print_decode_step(d, read)
    if json_out:
        os.makedirs(os.path.dirname(json_out) or ".", exist_ok=True)
        with open(json_out, "w") as f:
            json.dump({"cpu": cpu, "jax_version": jax.__version__, "m": M,
                       "read_gbps_before": before, "read_gbps_after": after,
                       "decode_step": d}, f, indent=1)


def run_child(what: str, xla_flags: str = "") -> dict | None:
    env = dict(os.environ, XLA_FLAGS=xla_flags)
    p = subprocess.run([sys.executable, __file__, f"--child={what}"], env=env,
                       capture_output=True, text=True)
    if p.returncode:
        print(f"{what} {xla_flags}: failed: {p.stderr.strip().splitlines()[-1:]}",
              file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json_out", default="benchmarks/results/decode_bandwidth.json")
    ap.add_argument("--child", default=None)
    ap.add_argument("--decode_only", action="store_true",
                    help="only the read probe and the decode step (more rounds of it)")
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    if args.decode_only:
        decode_only(args.json_out)
        return
    import jax
    cpu = cpu_description()
    print(f"CPU: {cpu_line()}, L2 {cpu['l2']}, L3 {cpu['l3']}\njax {jax.__version__}")
    res = {"cpu": cpu, "jax_version": jax.__version__, "m": M, "shapes_k_n": SHAPES}
    res["read_gbps_2core"] = read_probe()
    res["read_gbps_numpy_1thread"] = numpy_read_probe()
    pin = run_child("pin1")
    res["read_gbps_1core"] = pin and pin["read_gbps"]
    res["gemm_gflops"] = gemm_gflops()
    print(f"read probe (jitted sum, {READ_BYTES >> 20} MiB): {res['read_gbps_2core']:.1f} GB/s "
          f"two cores, {res['read_gbps_1core'] or float('nan'):.1f} one core (pinned), numpy "
          f"{res['read_gbps_numpy_1thread']:.1f}; GEMM peak {res['gemm_gflops']:.0f} GFLOP/s")
    products = {v: {} for v in ("xla_in_out", "xla_out_in", "xla_split_n", "native")}
    for shape, row in product_variants(list(products)).items():
        for v, r in row.items():
            products[v][shape] = r
    res["read_gbps_before_decode"] = read_probe()
    res["decode_step"] = decode_step()
    for name, flags in XLA_FLAG_VARIANTS.items():
        r = run_child("flags", flags)
        if r:
            for v, suffix in (("xla_in_out", ""), ("xla_out_in", "_out_in")):
                products[name + suffix] = {s: row[v] for s, row in r["products"].items()}
    if pin:
        products["xla_in_out_1core"] = {s: row["xla_in_out"] for s, row in pin["products"].items()}
        products["native_1core"] = {s: row["native"] for s, row in pin["products"].items()}
    res["products"] = products
    res["xla_flag_variants"] = XLA_FLAG_VARIANTS

    print(f"\nM={M} products, GB/s of weights read (median; f32, 8 FLOP/byte)")
    print(f"{'variant':<24}" + "".join(f"{s + ' ' + 'x'.join(map(str, kn)):>20}"
                                       for s, kn in SHAPES.items()))
    for v, row in products.items():
        print(f"{v:<24}" + "".join(f"{row[s]['gbps_median']:>20.1f}" if s in row else f"{'':>20}"
                                   for s in SHAPES))
    d = res["decode_step"]
    read = res["read_gbps_before_decode"]
    print_decode_step(d, read)
    if args.json_out:
        os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
