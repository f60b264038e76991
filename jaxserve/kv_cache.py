"""The paged KV cache on the device: per layer, pages of [page_size, kv_heads, head_dim].

Page 0 is the trash page (see `page_allocator.py`): padding tokens write their K/V there.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxserve.config import EngineConfig, ModelConfig

from jaxserve.page_allocator import TRASH_PAGE  # noqa: F401  (re-exported)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [layers, num_pages, page_size, kv_heads, head_dim]
    v: jax.Array  # [layers, num_pages, page_size, kv_heads, head_dim]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]


def cache_shape(model: ModelConfig, engine: EngineConfig) -> tuple[int, ...]:
    return (model.num_layers, engine.num_pages, engine.page_size, model.num_kv_heads,
            model.head_dim)


def init_cache(model: ModelConfig, engine: EngineConfig, dtype, sharding=None) -> KVCache:
    """Zeros; with a sharding, each device makes only its own part (no full copy anywhere)."""
    shape = cache_shape(model, engine)
    make = lambda: KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))  # noqa: E731
    if sharding is None:
        return make()
    return jax.jit(make, out_shardings=KVCache(k=sharding, v=sharding))()
