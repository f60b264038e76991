"""The functional view of the NNX model: params are an `nnx.State` pytree, the structure a graphdef.

Device code takes `params` as an ordinary jit argument and rebuilds the module inside the trace
(`bind`), so step functions stay pure `fn(params, cache, batch)` with the config static.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.llama import LlamaForCausalLM

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def to_jnp_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} must be one of {tuple(_DTYPES)}")
        return _DTYPES[dtype]
    return jnp.dtype(dtype)


@functools.lru_cache(maxsize=32)
def _abstract(cfg: ModelConfig, dtype_name: str):
    model = nnx.eval_shape(
        lambda: LlamaForCausalLM(cfg, dtype=_DTYPES[dtype_name], rngs=nnx.Rngs(0)))
    return nnx.split(model)


def graphdef(cfg: ModelConfig, dtype="float32"):
    return _abstract(cfg, jnp.dtype(to_jnp_dtype(dtype)).name)[0]


def abstract_params(cfg: ModelConfig, dtype="float32") -> nnx.State:
    """The params' structure with `jax.ShapeDtypeStruct` leaves (no memory)."""
    return _abstract(cfg, jnp.dtype(to_jnp_dtype(dtype)).name)[1]


def init_params(cfg: ModelConfig, seed: int = 0, dtype="float32") -> nnx.State:
    """Random params (normal, 1/sqrt(fan_in)): test and benchmark models."""
    model = LlamaForCausalLM(cfg, dtype=to_jnp_dtype(dtype), rngs=nnx.Rngs(seed))
    return nnx.split(model)[1]


def bind(cfg: ModelConfig, params: nnx.State) -> LlamaForCausalLM:
    """Rebuilds the module around `params` (works on traced arrays inside jit)."""
    leaf = jax.tree_util.tree_leaves(params)[0]
    return nnx.merge(graphdef(cfg, leaf.dtype), params)
