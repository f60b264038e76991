"""On-device sampling: filters, and a row's token independent of the other rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.sampling import SamplingInputs, sample as _sample

sample = jax.jit(_sample, static_argnums=2)


def _inputs(n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7):
    full = lambda v, dt: jnp.full((n,), v, dt)  # noqa: E731
    return SamplingInputs(temperature=full(temperature, jnp.float32), top_k=full(top_k, jnp.int32),
                          top_p=full(top_p, jnp.float32), min_p=full(min_p, jnp.float32),
                          seeds=full(seed, jnp.uint32), gen_index=jnp.arange(n, dtype=jnp.int32))


def _set(p: SamplingInputs, row: int, **kw) -> SamplingInputs:
    fields = {k: getattr(p, k) for k in ("temperature", "top_k", "top_p", "min_p", "seeds",
                                         "gen_index")}
    for k, v in kw.items():
        fields[k] = fields[k].at[row].set(v)
    return SamplingInputs(**fields)


def test_row_unaffected_by_another_rows_filters():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((4, 50)), jnp.float32)
    plain = _inputs(4)
    sorted_batch = _set(plain, 3, top_k=5, top_p=0.5)  # forces the sorted path for the batch
    a = sample(logits, plain, 3).tokens
    b = sample(logits, sorted_batch, 3).tokens
    np.testing.assert_array_equal(a[:3], b[:3])


def test_filters_restrict_the_support():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((1, 40)) * 3, jnp.float32)
    order = np.argsort(-np.asarray(logits[0]))
    seen_k, seen_p = set(), set()
    for g in range(100):
        p = _inputs(1, top_k=3, seed=g)
        seen_k.add(int(sample(logits, p, 1).tokens[0]))
        p = _inputs(1, top_p=1e-6, seed=g)
        seen_p.add(int(sample(logits, p, 1).tokens[0]))
    assert seen_k <= set(order[:3].tolist()) and len(seen_k) > 1
    assert seen_p == {int(order[0])}
    greedy = sample(logits, _inputs(1, temperature=0.0), 1).tokens[0]
    assert int(greedy) == int(order[0])


def test_greedy_tokens_is_argmax_with_ties_nan_and_inf():
    from jaxserve.sampling import greedy_tokens
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 257)).astype(np.float32)
    x[1, [5, 200]] = 9.0             # a tie: the first
    x[2, 7] = np.nan                 # a NaN wins, wherever the maximum is
    x[3, [30, 4]] = np.nan           # the first NaN
    x[4, :] = -np.inf                # nothing finite: index 0
    x[5, 100] = np.inf
    x[6, :] = 1.0                    # all equal
    x[7, -1] = 50.0                  # the last index
    got = np.asarray(jax.jit(greedy_tokens)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
    np.testing.assert_array_equal(got[:8], [got[0], 5, 7, 4, 0, 100, 0, 256])
