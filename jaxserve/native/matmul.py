"""`skinny_matmul`: the native CPU kernel (matmul.cc) for few-row products (and, with
`batch_invariant`, every product), as a JAX function."""

from __future__ import annotations

import jax

from jaxserve.native import matmul_build

supported = matmul_build.supported


def full_rows(m: int) -> jax.Array:
    """`live_rows` naming every one of m rows."""
    return jax.numpy.array([0, m, m, m], jax.numpy.int32)


def skinny_matmul(x: jax.Array, w: jax.Array, out_in: bool = False,
                  live_rows: jax.Array | None = None) -> jax.Array:
    """f32[..., N] = x[..., K] @ w[K, N] (w stored [in, out]), or with `out_in` x @ w.T for w
    stored [N, K] ([out, in], Hugging Face's layout; the layout this kernel streams float32
    weights best in; bfloat16 ones are slower there than [in, out]); float32 or bfloat16
    operands of one dtype, float32 accumulation and result. CPU with AVX-512 only
    (`supported()`); builds the kernel on first use (see matmul_build.py). Each output sums
    over K in order, the same FMA chain whichever layout w has, so a row's result does not
    depend on the other rows (nor on the layout).

    `live_rows` i32[4] = (s0, e0, s1, e1), traced: only rows [s0, e0) and [s1, e1) of x's
    flattened rows are needed (0 <= s0 <= e0 <= s1 <= e1 <= rows); the others come back 0 and
    products of more than 64 rows skip them. Default: every row."""
    matmul_build.load()
    if x.dtype != w.dtype:
        raise ValueError(f"{x.dtype=} and {w.dtype=} must match")
    lead, k = x.shape[:-1], x.shape[-1]
    if w.ndim != 2 or w.shape[1 if out_in else 0] != k:
        want = "[N, K]" if out_in else "[K, N]"
        raise ValueError(f"{x.shape=} and {w.shape=}: want x [..., K] and w {want}")
    n = w.shape[0 if out_in else 1]
    x2 = x.reshape(-1, k)
    call = jax.ffi.ffi_call("jaxserve_skinny_matmul_out_in" if out_in else "jaxserve_skinny_matmul",
                            jax.ShapeDtypeStruct((x2.shape[0], n), jax.numpy.float32))
    if live_rows is None:
        live_rows = full_rows(x2.shape[0])
    return call(x2, w, live_rows.astype(jax.numpy.int32)).reshape(*lead, n)
