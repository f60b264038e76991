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
    k = x.shape[-1]
    if w.ndim != 2 or w.shape[1 if out_in else 0] != k:
        want = "[N, K]" if out_in else "[K, N]"
        raise ValueError(f"{x.shape=} and {w.shape=}: want x [..., K] and w {want}")
    n = w.shape[0 if out_in else 1]
    target = "jaxserve_skinny_matmul_out_in" if out_in else "jaxserve_skinny_matmul"
    return _product(target, x, w, n, live_rows)


def _product(target: str, x: jax.Array, w: jax.Array, n: int,
             live_rows: jax.Array | None) -> jax.Array:
    """f32[..., n] from the kernel's FFI `target` on x's rows flattened, w and `live_rows`
    (every row where None)."""
    x2 = x.reshape(-1, x.shape[-1])
    if live_rows is None:
        live_rows = full_rows(x2.shape[0])
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x2.shape[0], n), jax.numpy.float32))
    return call(x2, w, live_rows.astype(jax.numpy.int32)).reshape(*x.shape[:-1], n)


PANEL_WIDTH = 16  # output columns per panel of the `panels` layout
PANEL_BLOCK_K = 256  # input rows per block of the `panels` layout (matmul.cc: kPanelBlockK)


def to_panels(w_out_in: jax.Array) -> jax.Array:
    """w [N, K] ([out, in]) -> the `panels` layout, float32 [P, K, 16] in size, P = ceil(N / 16):
    panel c holds output columns 16c..16c+15 (zeros past N) of every input k, 16 columns a
    64-byte line, and the lines are stored in blocks of PANEL_BLOCK_K input rows: block b holds
    every panel's [kn, 16] piece of rows [256b, 256b + kn) (kn = 256 but for the last block),
    panel after panel — the order the kernel reads them in. The [P, K, 16] shape is the storage
    size only (it equals the panel-major order when K <= 256)."""
    n, k = w_out_in.shape
    p = -(-n // PANEL_WIDTH)
    padded = jax.numpy.pad(w_out_in, ((0, p * PANEL_WIDTH - n), (0, 0)))
    panels = padded.reshape(p, PANEL_WIDTH, k).transpose(0, 2, 1)  # [P, K, 16] panel-major
    # The full blocks in one transpose (a slice per block held every block and their
    # concatenation at once), then the last, shorter block.
    full = k // PANEL_BLOCK_K * PANEL_BLOCK_K
    blocks = panels[:, :full].reshape(p, full // PANEL_BLOCK_K, PANEL_BLOCK_K, PANEL_WIDTH)
    lines = [blocks.transpose(1, 0, 2, 3).reshape(-1, PANEL_WIDTH),
             panels[:, full:].reshape(-1, PANEL_WIDTH)]
    return jax.numpy.concatenate(lines).reshape(p, k, PANEL_WIDTH)


def panels_matmul(x: jax.Array, w: jax.Array, n: int,
                  live_rows: jax.Array | None = None) -> jax.Array:
    """f32[..., n] = x[..., K] @ W.T for W [n, K] stored as `to_panels(W)` (float32 only): the
    native kernel's `panels` path (matmul.cc: run_panels), the same bits as `skinny_matmul` on
    W itself; `live_rows` as there."""
    matmul_build.load()
    k = x.shape[-1]
    if x.dtype != jax.numpy.float32 or w.dtype != jax.numpy.float32:
        raise ValueError(f"{x.dtype=} and {w.dtype=}: the panels layout is float32 only")
    if w.ndim != 3 or w.shape[1:] != (k, PANEL_WIDTH) or w.shape[0] != -(-n // PANEL_WIDTH):
        raise ValueError(f"{x.shape=}, {w.shape=}, {n=}: want x [..., K] and w "
                         f"[ceil(n / {PANEL_WIDTH}), K, {PANEL_WIDTH}]")
    return _product("jaxserve_panels_matmul", x, w, n, live_rows)
