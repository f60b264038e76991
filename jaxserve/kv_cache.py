"""The paged KV cache: device arrays of pages, and the host allocator that hands pages out.

Page 0 is the trash page: padding tokens write their K/V there and no live sequence owns it, so
the step never needs a branch for "is this token real".
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxserve.config import EngineConfig, ModelConfig

TRASH_PAGE = 0


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


def init_cache(model: ModelConfig, engine: EngineConfig, dtype) -> KVCache:
    shape = cache_shape(model, engine)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def cache_bytes(model: ModelConfig, engine: EngineConfig, dtype) -> int:
    n = 1
    for d in cache_shape(model, engine):
        n *= d
    return 2 * n * jnp.dtype(dtype).itemsize


class PageAllocator:
    """A free list of page ids 1..num_pages-1 (page 0 is never handed out)."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"{num_pages=} must be at least 2 (page 0 is the trash page)")
        self.num_pages = num_pages
        # Pop from the end, so low page ids go first (easier to read in tests and dumps).
        self._free = list(range(num_pages - 1, TRASH_PAGE, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} pages with {len(self._free)} free")
        pages = self._free[len(self._free) - n:][::-1]
        del self._free[len(self._free) - n:]
        return pages

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
