"""The real kernel, [in, out] vs [out, in] (out_in=True), weights-only decode step at several
row counts, interleaved: python benchmarks/decode_experiment/m_sweep.py [rounds] [M,M,...]"""
import sys, time, numpy as np, jax, jax.numpy as jnp
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from decode_experiment import SHAPES, LAYERS, step_fn
from jaxserve.native.matmul import skinny_matmul
rng = np.random.default_rng(0)
raw = {"layers": [{s: rng.standard_normal(SHAPES[s], np.float32) / np.sqrt(SHAPES[s][0]) for s in ("qkv", "o", "gate_up", "down")} for _ in range(LAYERS)],
       "lm_head": rng.standard_normal(SHAPES["lm_head"], np.float32) / np.sqrt(768)}
w_io = jax.tree_util.tree_map(jnp.asarray, raw)
w_oi = jax.tree_util.tree_map(lambda w: jnp.asarray(np.ascontiguousarray(w.T)), raw)
f_io = jax.jit(step_fn(lambda x, w, n: skinny_matmul(x, w)))
f_oi = jax.jit(step_fn(lambda x, w, n: skinny_matmul(x, w, out_in=True)))
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
for M in [int(a) for a in (sys.argv[2] if len(sys.argv) > 2 else "1,4,8,16,32,64").split(",")]:
    x = jnp.asarray(rng.standard_normal((M, 768), np.float32))
    assert np.array_equal(np.asarray(f_io(x, w_io)), np.asarray(f_oi(x, w_oi)))
    t = {"io": [], "oi": []}; ratio = []
    for r in range(rounds):
        med = {}
        for name, f, w in (("io", f_io, w_io), ("oi", f_oi, w_oi))[:: 1 if r % 2 == 0 else -1]:
            jax.block_until_ready(f(x, w)); ts = []
            for _ in range(3):
                t0 = time.perf_counter(); jax.block_until_ready(f(x, w)); ts.append(time.perf_counter() - t0)
            med[name] = np.median(ts); t[name] += ts
        ratio.append(med["io"] / med["oi"])
    print(f"M={M:3d}: [in,out] {np.median(t['io'])*1e3:6.1f} ms (best {min(t['io'])*1e3:5.1f})  [out,in] {np.median(t['oi'])*1e3:6.1f} ms (best {min(t['oi'])*1e3:5.1f})  speed-up (per-round median) {np.median(ratio):.2f}x", flush=True)
