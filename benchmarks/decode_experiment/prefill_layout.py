"""XLA's dot at prefill sizes (512 and 128 rows), W [in, out] vs [out, in], interleaved."""
import time, numpy as np, jax, jax.numpy as jnp
rng = np.random.default_rng(0)
shapes = [(768, 1280), (768, 768), (768, 4096), (2048, 768)]
for M in (512, 128):
    ws_io = [jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes]
    ws_oi = [jnp.asarray(np.ascontiguousarray(np.asarray(w).T)) for w in ws_io]
    xs = [jnp.asarray(rng.standard_normal((M, s[0]), np.float32)) for s in shapes]
    f_io = jax.jit(lambda xs, ws: [x @ w for x, w in zip(xs, ws)])
    f_oi = jax.jit(lambda xs, ws: [jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))) for x, w in zip(xs, ws)])
    jax.block_until_ready(f_io(xs, ws_io)); jax.block_until_ready(f_oi(xs, ws_oi))
    r = []; t_io = []; t_oi = []
    for _ in range(15):
        a = []
        for f, w, acc in ((f_io, ws_io, t_io), (f_oi, ws_oi, t_oi)):
            ts = []
            for _ in range(3):
                t = time.perf_counter(); jax.block_until_ready(f(xs, w)); ts.append(time.perf_counter() - t)
            acc.append(np.median(ts)); a.append(np.median(ts))
        r.append(a[0] / a[1])
    print(f"M={M}: in_out {np.median(t_io)*1e3:.2f} ms, out_in {np.median(t_oi)*1e3:.2f} ms; per-round speed out_in/in_out {np.median(r):.3f}")
