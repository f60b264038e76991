"""The native greedy kernel (jaxserve/native/greedy.cc) against jnp.argmax, and in a step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.native.greedy import greedy_tokens as native_greedy
from jaxserve.sampling import greedy_tokens


def _check(x):
    got = np.asarray(jax.jit(native_greedy)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
    np.testing.assert_array_equal(got, np.asarray(jax.jit(greedy_tokens)(jnp.asarray(x))))
    return got


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 257, 32000])
def test_native_greedy_is_argmax_with_ties_nan_and_inf(vocab):
    rng = np.random.default_rng(vocab)
    x = rng.standard_normal((12, vocab)).astype(np.float32)
    last = vocab - 1
    x[1, [last // 3, last]] = 9.0      # a tie: the first
    x[2, last // 2] = np.nan           # a NaN wins, wherever the maximum is
    x[3, [last, last // 4]] = np.nan   # the first NaN (the lower index)
    x[4, :] = -np.inf                  # nothing finite: index 0
    x[5, last // 2] = np.inf
    x[6, :] = 1.0                      # all equal
    x[7, last] = 50.0                  # the last index (in the tail past whole vectors)
    x[8, :] = np.nan                   # all NaN: 0
    x[9, :] = -0.0                     # signed zeros compare equal: the first
    x[9, last] = 0.0
    x[10, :] = -np.inf                 # -inf everywhere but one NaN in the tail
    x[10, last] = np.nan
    got = _check(x)
    assert got[1] == last // 3 and got[2] == last // 2 and got[4] == 0 and got[8] == 0
    assert got[7] == last and got[10] == last and got[3] == last // 4


def test_native_greedy_keeps_leading_axes_and_refuses_other_dtypes():
    x = np.random.default_rng(0).standard_normal((2, 3, 40)).astype(np.float32)
    got = np.asarray(native_greedy(jnp.asarray(x)))
    assert got.shape == (2, 3)
    np.testing.assert_array_equal(got, x.argmax(-1))
    with pytest.raises(ValueError, match="float32"):
        native_greedy(jnp.asarray(x, jnp.bfloat16))
    with pytest.raises(ValueError, match="at least one column"):  # argmax of nothing
        native_greedy(jnp.zeros((2, 0), jnp.float32))


def test_build_module_builds_every_native_kernel_ahead_of_time(capsys):
    # `python -m jaxserve.native.build` (README): every kernel this CPU runs, into the cache.
    import os
    from jaxserve.native import build, matmul_build
    build.main()
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert {"attention", "greedy", "matmul"} <= set(lines)
    for name in ("attention", "greedy") + (("matmul",) if matmul_build.supported() else ()):
        assert os.path.exists(lines[name]), name
