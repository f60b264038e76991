"""`paged_attention_rows`: the native CPU kernel (paged_attention.cc) as a JAX function."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.native import build
from pallas_kernels.ragged import stacked_cache


def paged_attention_rows(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, *,
                         row_slot: jax.Array, row_len: jax.Array, page_table: jax.Array,
                         layer=None, scale: float | None = None) -> jax.Array:
    """Each query row r of q [R, H, Dh] attends to the first row_len[r] keys of the sequence
    whose pages are page_table[row_slot[r]] (row_len 0: zeros). k/v_pages are one layer's
    [N, page, KVH, Dh] or, with `layer`, the stacked [L, N, page, KVH, Dh] cache, read in
    place. float32 or bfloat16; CPU only. Builds the kernel on first use (see build.py)."""
    build.load()
    # The same stacked-cache convention as the Pallas kernels (layer becomes i32[1]).
    k_pages, v_pages, layer = stacked_cache(k_pages, v_pages, layer)
    if q.shape[1] % k_pages.shape[3]:
        raise ValueError(f"{q.shape[1]=} query heads must be a multiple of "
                         f"{k_pages.shape[3]=} kv heads")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    call = jax.ffi.ffi_call("jaxserve_paged_attention", jax.ShapeDtypeStruct(q.shape, q.dtype))
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return call(q, k_pages, v_pages, i32(row_slot), i32(row_len), i32(page_table),
                layer, scale=np.float32(scale))
