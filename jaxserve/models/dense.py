"""The dense single-sequence reference forward: the oracle the paged engine is tested against."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.functional import bind


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q [T, H, Dh], k/v [T, KVH, Dh] -> [T, H, Dh]; grouped-query, causal, softmax in f32."""
    t, h, dh = q.shape
    kvh = k.shape[1]
    qg = q.reshape(t, kvh, h // kvh, dh)
    s = jnp.einsum("tkgd,skd->kgts", qg, k, preferred_element_type=jnp.float32) / np.sqrt(dh)
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("kgts,skd->tkgd", p, v, preferred_element_type=jnp.float32)
    return o.reshape(t, h, dh).astype(q.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg: ModelConfig, params: nnx.State, token_ids: jax.Array) -> jax.Array:
    model = bind(cfg, params)
    positions = jnp.arange(token_ids.shape[0], dtype=jnp.int32)
    hidden, _ = model.hidden_states(
        token_ids, positions, lambda layer, q, k, v, cache: (causal_attention(q, k, v), cache),
        None)
    return model.logits(hidden)


def forward_dense(cfg: ModelConfig, params: nnx.State, token_ids) -> jax.Array:
    """Logits f32[T, vocab] of one sequence, every position attending causally to its prefix."""
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"token_ids must be a non-empty 1-D sequence, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token_ids must be integers, got dtype {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= cfg.vocab_size)]
    if bad.size:
        raise ValueError(
            f"token id {int(bad[0])} is outside the vocabulary [0, {cfg.vocab_size})")
    if ids.size > cfg.max_position_embeddings:
        raise ValueError(
            f"{ids.size} tokens exceed max_position_embeddings={cfg.max_position_embeddings}")
    if cfg.sliding_window is not None and ids.size > cfg.sliding_window:
        raise ValueError(
            f"{ids.size} tokens exceed sliding_window={cfg.sliding_window}, not implemented")
    return _forward(cfg, params, jnp.asarray(ids, jnp.int32))
