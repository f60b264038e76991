"""`greedy_tokens`: the native CPU kernel (greedy.cc) for a step's greedy tokens, as a JAX
function: the same indices as `jaxserve.sampling.greedy_tokens` (jnp.argmax's: the first
maximum, the first NaN where a row has one), in one custom call instead of XLA:CPU's five or
six small fusions. Built with the attention kernel (build.py: `load`): once per machine,
any CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.native import build


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """i32[...] = argmax of logits f32[..., V] over its last axis (float32 only; CPU only)."""
    build.load_library(build.GREEDY)  # raises NativeBuildError where it cannot be built
    if logits.dtype != jnp.float32:
        raise ValueError(f"{logits.dtype=}: the native greedy kernel takes float32 logits")
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{logits.shape=}: greedy tokens need at least one column of logits")
    rows = logits.reshape(-1, logits.shape[-1])
    call = jax.ffi.ffi_call("jaxserve_greedy", jax.ShapeDtypeStruct(rows.shape[:1], jnp.int32))
    return call(rows).reshape(logits.shape[:-1])
