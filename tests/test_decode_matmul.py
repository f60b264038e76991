"""The native skinny matmul (jaxserve/native/matmul.cc) against jnp, and the layout that uses it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.models.functional import bind, init_params, resolve_layout, to_layout
from jaxserve.native import matmul_build

pytestmark = pytest.mark.skipif(not matmul_build.supported(),
                                reason="the native matmul needs an AVX-512 CPU")


def _skinny(x, w):
    from jaxserve.native.matmul import skinny_matmul
    return jax.jit(skinny_matmul)(x, w)


def _operands(m, k, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k), np.float32), dtype)
    w = jnp.asarray(rng.standard_normal((k, n), np.float32) / np.sqrt(k), dtype)
    return x, w


@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 9, 13, 16])
@pytest.mark.parametrize("k,n", [(64, 128), (37, 33), (100, 300), (257, 16), (5, 1)])
def test_float32_matches_jnp(m, k, n):
    x, w = _operands(m, k, n, jnp.float32, seed=m + k + n)
    want = np.asarray(jnp.dot(x, w, precision="highest"))
    got = np.asarray(_skinny(x, w))
    assert got.dtype == np.float32 and got.shape == (m, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,k,n", [(16, 768, 1280), (5, 96, 200), (1, 33, 47)])
def test_bfloat16_matches_jnp(m, k, n):
    x, w = _operands(m, k, n, jnp.bfloat16)
    want = np.asarray(jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32),
                              precision="highest"))
    got = np.asarray(_skinny(x, w))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,k,n", [(65, 300, 520), (200, 600, 70), (97, 513, 33)])
def test_tall_products_match_jnp(m, k, n, dtype):
    # More than 64 rows take the packed-panel path (matmul.cc: strip_tall; [out, in] weights:
    # strip_tall_wide).
    x, w = _operands(m, k, n, dtype, seed=m)
    want = np.asarray(jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32),
                              precision="highest"))
    np.testing.assert_allclose(np.asarray(_skinny(x, w)), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rows_identical_across_paths_and_offsets(dtype):
    # The skinny (<= 64 rows) and tall (> 64) paths do the same arithmetic: the same 8 rows
    # give the same bits alone, inside 16, 65 or 300 rows, at any offset (batch_invariant).
    x, w = _operands(320, 520, 600, dtype)
    alone = np.asarray(_skinny(x[:8], w))
    for m, off in ((16, 8), (65, 3), (65, 57), (300, 0), (300, 131), (300, 292)):
        xm = x[8:8 + m].at[off:off + 8].set(x[:8])
        np.testing.assert_array_equal(np.asarray(_skinny(xm, w))[off:off + 8], alone)


def test_rows_do_not_depend_on_each_other():
    # Each output sums over K in order whatever the row count: bit-identical rows.
    x, w = _operands(16, 300, 520, jnp.float32)
    full = np.asarray(_skinny(x, w))
    for rows in (slice(0, 1), slice(3, 12), slice(9, 16)):
        np.testing.assert_array_equal(np.asarray(_skinny(x[rows], w)), full[rows])


def _skinny_out_in(x, w_out_in):
    from jaxserve.native.matmul import skinny_matmul
    return jax.jit(lambda x, w: skinny_matmul(x, w, out_in=True))(x, w_out_in)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 5, 1), (3, 37, 33), (8, 100, 300), (16, 768, 1280),
                                   (17, 257, 520), (64, 96, 70), (100, 33, 47), (16, 64, 4100),
                                   (200, 600, 70), (97, 513, 33),  # > 64 rows: the tall path
                                   (600, 300, 200), (271, 129, 130)])  # several row blocks
def test_out_in_weights_give_the_same_bits(m, k, n, dtype):
    # w stored [N, K] (the fused_native layout) runs another loop nest, with the same FMA chain
    # per output: bit-identical to the [K, N] path, whatever the row count.
    x, w = _operands(m, k, n, dtype, seed=m * k + n)
    want = np.asarray(_skinny(x, w))
    got = np.asarray(_skinny_out_in(x, jnp.asarray(np.ascontiguousarray(np.asarray(w).T))))
    assert got.dtype == np.float32 and got.shape == (m, n)
    np.testing.assert_array_equal(got, want)


def test_out_in_rows_do_not_depend_on_each_other():
    x, w = _operands(140, 300, 520, jnp.float32)
    w_oi = jnp.asarray(np.ascontiguousarray(np.asarray(w).T))
    full = np.asarray(_skinny_out_in(x, w_oi))  # tall
    for rows in (slice(0, 1), slice(3, 12), slice(9, 16), slice(5, 37), slice(30, 130)):
        np.testing.assert_array_equal(np.asarray(_skinny_out_in(x[rows], w_oi)), full[rows])


@pytest.mark.parametrize("out_in", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m", [16, 70, 150])
def test_live_rows_are_computed_and_the_rest_zero(m, dtype, out_in):
    # live_rows (s0, e0, s1, e1): rows [s0, e0) and [s1, e1) come out as in the full product,
    # to the bit (same FMA chain whichever tiles they fall in), every other row 0 — also where
    # x holds NaN there (a step's padding rows are never read). Spans that split a register
    # tile, empty spans, and no live row at all.
    from jaxserve.native.matmul import skinny_matmul
    k, n = 200, 300
    x, w = _operands(m, k, n, dtype, seed=m)
    if out_in:
        w = jnp.asarray(np.ascontiguousarray(np.asarray(w).T))
    f = jax.jit(lambda x, w, live: skinny_matmul(x, w, out_in=out_in, live_rows=live))
    full = np.asarray(f(x, w, jnp.array([0, m, m, m])))
    for live in ([0, m // 3, m // 2, m // 2 + 5], [0, 0, m - 7, m], [3, m - 1, m, m],
                 [1, 13, 13, 14], [0, 0, 0, 0]):
        mask = np.zeros(m, bool)
        mask[live[0]:live[1]] = mask[live[2]:live[3]] = True
        x_pad = jnp.where(jnp.asarray(mask)[:, None], x, jnp.nan)
        got = np.asarray(f(x_pad, w, jnp.array(live)))
        np.testing.assert_array_equal(got[mask], full[mask], err_msg=str(live))
        assert (got[~mask] == 0).all(), live


def test_live_rows_out_of_order_is_an_error():
    from jaxserve.native.matmul import skinny_matmul
    x, w = _operands(80, 40, 24, jnp.float32)
    with pytest.raises(Exception, match="live_rows"):
        jax.block_until_ready(skinny_matmul(x, w, live_rows=jnp.array([0, 50, 40, 80])))
    with pytest.raises(Exception, match="live_rows"):
        jax.block_until_ready(skinny_matmul(x, w, live_rows=jnp.array([0, 10, 20, 81])))


def _panels(x, w_out_in, live=None):
    from jaxserve.native.matmul import panels_matmul, to_panels
    n = w_out_in.shape[0]
    live = jnp.array([0, x.shape[0], x.shape[0], x.shape[0]]) if live is None else live
    return jax.jit(lambda x, w, l: panels_matmul(x, w, n, l))(x, to_panels(w_out_in), live)


@pytest.mark.parametrize("m", [1, 5, 16, 17, 64, 65, 100, 150])
@pytest.mark.parametrize("k,n", [(200, 300), (37, 40), (130, 64), (129, 100), (16, 1),
                                 (600, 72), (257, 33), (520, 4100)])
def test_panels_layout_gives_the_out_in_bits(m, k, n):
    # The panels path (few rows: one stream per 16-column tile, 256 k rows at a time with the
    # sums kept in y between; tall: four panels read in place) against the [out, in] path: the
    # same FMA chain per output, so the same bits, for widths that leave a partial panel and a
    # partial 64-column tile, and depths of one, two and three blocks of k (a last block of 1);
    # (520, 4100): strips of many panels and 64-column tiles past the first block of k.
    x, w = _operands(m, k, n, jnp.float32, seed=m * 7 + k)
    w_oi = jnp.asarray(np.ascontiguousarray(np.asarray(w).T))
    want = np.asarray(_skinny_out_in(x, w_oi))
    np.testing.assert_array_equal(np.asarray(_panels(x, w_oi)), want)
    live = jnp.array([0, m // 3, m // 2, m // 2 + 1])
    got = np.asarray(_panels(x, w_oi, live))
    mask = np.zeros(m, bool)
    mask[: m // 3] = mask[m // 2: m // 2 + 1] = True
    np.testing.assert_array_equal(got[mask], want[mask])
    assert (got[~mask] == 0).all()


def test_panels_layout_shape_and_errors():
    from jaxserve.native.matmul import panels_matmul, to_panels
    w = jnp.arange(35 * 3, dtype=jnp.float32).reshape(35, 3)  # [N=35, K=3]
    p = np.asarray(to_panels(w))
    assert p.shape == (3, 3, 16)
    assert p[2, 1, 2] == w[34, 1] and (p[2, :, 3:] == 0).all()  # column 16c + j at [c, k, j]
    # Deeper than a block (256 input rows): the lines go block by block, each block's pieces
    # panel after panel; line (c, k) of block b = k // 256 sits at 256 * b * P + c * kn + k % 256.
    n, k = 40, 600
    w = jnp.asarray(np.random.default_rng(0).standard_normal((n, k)), jnp.float32)
    lines = np.asarray(to_panels(w)).reshape(-1, 16)
    P = 3
    for c, kk in [(0, 0), (1, 255), (2, 256), (0, 511), (1, 512), (2, 599)]:
        b, kn = kk // 256, min(256, k - kk // 256 * 256)
        line = lines[256 * b * P + c * kn + kk % 256]
        cols = min(16, n - 16 * c)
        np.testing.assert_array_equal(line[:cols], np.asarray(w)[16 * c:16 * c + cols, kk])
        assert (line[cols:] == 0).all()
    x = jnp.ones((4, 3), jnp.float32)
    with pytest.raises(ValueError, match="float32 only"):
        panels_matmul(x.astype(jnp.bfloat16), to_panels(w), 35)
    with pytest.raises(ValueError, match="ceil"):
        panels_matmul(x, to_panels(w), 60)
    with pytest.raises(ValueError, match="float32 only"):
        resolve_layout("fused_panels", "cpu", native_matmul=True, dtype="bfloat16")
    with pytest.raises(ValueError, match="native CPU kernel"):
        resolve_layout("fused_panels", "cpu", native_matmul=False)


def test_leading_dims_and_errors():
    from jaxserve.native.matmul import skinny_matmul
    x, w = _operands(6, 40, 24, jnp.float32)
    got = skinny_matmul(x.reshape(2, 3, 40), w)
    np.testing.assert_allclose(np.asarray(got).reshape(6, 24),
                               np.asarray(jnp.dot(x, w, precision="highest")), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError):
        skinny_matmul(x, w.astype(jnp.bfloat16))
    with pytest.raises(ValueError):
        skinny_matmul(x, w.T)


def test_native_layout_matches_xla_layout():
    from engine_helpers import TINY
    hf = init_params(TINY, seed=0)
    tokens = jnp.arange(5, dtype=jnp.int32)
    outs = {}
    for name in ("fused_in_out", "fused_in_out_native", "fused_native", "fused_panels"):
        layout = resolve_layout(name, "cpu", native_matmul=True)
        model = bind(TINY, to_layout(TINY, hf, layout), layout)
        h, _ = model.hidden_states(tokens, tokens, lambda i, q, k, v, c: (q, c), None)
        outs[name] = np.asarray(model.logits(h))
    np.testing.assert_allclose(outs["fused_in_out_native"], outs["fused_in_out"], rtol=1e-4,
                               atol=1e-4)
    # The native layouts: the same kernel arithmetic, so the same bits.
    np.testing.assert_array_equal(outs["fused_native"], outs["fused_in_out_native"])
    np.testing.assert_array_equal(outs["fused_panels"], outs["fused_native"])
    assert (resolve_layout("auto", "cpu", native_matmul=True)
            == resolve_layout("fused_panels", native_matmul=True))
    assert (resolve_layout("auto", "cpu", native_matmul=True, dtype="bfloat16")
            == resolve_layout("fused_in_out_native"))
    assert resolve_layout("auto", "cpu", native_matmul=True).native_rows > 0
    assert resolve_layout("auto", "cpu").native_rows == 0


def test_back_to_back_decode_products_through_the_relay():
    # Decode-sized products leave their helper spinning for the next call's work
    # (parallel_for.h: the relay); 120 chained products of changing widths, run three times,
    # give the same bits each time and the [out, in] path's bits.
    from jaxserve.native.matmul import panels_matmul, skinny_matmul, to_panels
    rng = np.random.default_rng(4)
    widths = [40, 300, 17, 1024, 64] * 24
    ws = [jnp.asarray(rng.standard_normal((n, 64)) / 8, jnp.float32) for n in widths]
    wps = [to_panels(w) for w in ws]

    def chain(x, ws, panels):
        outs = []
        for n, w in zip(widths, ws):
            y = panels_matmul(x, w, n) if panels else skinny_matmul(x, w, out_in=True)
            outs.append(y[:, :5])
            x = jnp.tanh(y[:, :64]) if n >= 64 else x
        return jnp.concatenate(outs, axis=1)
    x = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
    f = jax.jit(chain, static_argnums=2)
    want = np.asarray(f(x, ws, False))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(x, wps, True)), want)
