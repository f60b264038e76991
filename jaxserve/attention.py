"""Paged attention for one step: the XLA reference, and dispatch to the Pallas kernels.

A step's queries are `C` chunk slots of `P` tokens followed by `D` decode tokens. The reference
gathers each slot's pages and runs dense masked attention: chunk slots as [C, P, heads, ctx],
decode slots as [D, heads, ctx]. It is the oracle for every kernel and runs on any platform
(meshes included). On the CPU the default is `cpu`: a native kernel that reads the pages in
place (jaxserve/native), for chunk and decode rows alike.

Gathering `pages_per_seq` pages for every slot would make a short-context step pay for
`max_model_len`; a `lax.switch` over a few context buckets (picked on device from the longest
live context) keeps the gather proportional to what is live, inside the one executable.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ("xla", "cpu", "pallas_tpu", "pallas_gpu")
_MASKED = -1e30  # finite, so a fully masked padding row gives zeros, never NaN


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """The static layout of a step's queries and the cache, shared by every backend."""

    num_chunk_slots: int  # C
    chunk_len: int  # P
    num_decode_slots: int  # D
    page_size: int
    pages_per_seq: int

    @property
    def decode_groups(self) -> int:
        """Decode slots are bucketed in two halves (the host puts the longest contexts first),
        so one long sequence does not make every decode slot gather its context length. More
        groups would bound it tighter but each adds a switch of attention bodies per layer to
        the compile (start-up must stay well under 20 s for a 125M model on 2 cores)."""
        d = self.num_decode_slots
        return 2 if d >= 8 and d % 2 == 0 else 1

    @property
    def buckets(self) -> tuple[int, ...]:
        """Page counts the reference gathers, in sixteenths of pages_per_seq (powers of two:
        each bucket adds attention bodies per layer to the compile; 7 finer buckets cost the
        125M model 5 s more start-up for ~5% faster decode, measured)."""
        sixteenths = (1, 2, 4, 8, 16)
        return tuple(sorted({max(1, math.ceil(self.pages_per_seq * k / 16)) for k in sixteenths}))


# attend(q [T, H, Dh], k_pages [N, page, KVH, Dh], v_pages [N, page, KVH, Dh], *,
#        positions i32[T], chunk_lens i32[C], kv_lens i32[C + D],
#        page_table i32[C + D, pages_per_seq], layer=None) -> [T, H, Dh]
# With `layer`, k/v_pages are the whole stacked cache [L, N, ...]: a backend reads that layer's
# pages in place (slicing it out first would copy a layer of cache per layer per step).
# Queries: chunk slot c holds rows [c*P, c*P + chunk_lens[c]) (the rest is padding), decode slot
# d holds row C*P + d (live iff kv_lens[C + d] > 0). Rows that are padding may hold anything.
AttentionFn = Callable[..., jax.Array]


def _pick_bucket(kv_lens: jax.Array, shape: AttentionShape) -> jax.Array:
    pages_needed = (jnp.max(kv_lens, initial=0) + shape.page_size - 1) // shape.page_size
    buckets = jnp.asarray(shape.buckets, jnp.int32)
    return jnp.minimum(jnp.sum(buckets < pages_needed), len(shape.buckets) - 1)


def _gather(pages: jax.Array, page_table: jax.Array, num_pages: int, layer=None) -> jax.Array:
    """pages [N, page, KVH, Dh] (or the stacked [L, N, ...] with `layer`), page_table
    [S, >=num_pages] -> [S, num_pages*page, KVH, Dh], one gather straight from the cache."""
    idx = page_table[:, :num_pages]
    g = pages[idx] if layer is None else pages[layer, idx]
    s, n, ps, kvh, dh = g.shape
    return g.reshape(s, n * ps, kvh, dh)


def _chunk_attention(q, k_pages, v_pages, q_pos, kv_lens, page_table, layer, num_pages):
    """q [C, P, H, Dh], q_pos i32[C, P] -> [C, P, H, Dh], causal within the sequence."""
    c, p, h, dh = q.shape
    k = _gather(k_pages, page_table, num_pages, layer)  # [C, ctx, KVH, Dh]
    v = _gather(v_pages, page_table, num_pages, layer)
    kvh = k.shape[2]
    ctx = jnp.arange(k.shape[1], dtype=jnp.int32)
    live = ctx[None, :] < kv_lens[:, None]  # [C, ctx]
    v = jnp.where(live[:, :, None, None], v, 0)  # a stale or NaN page must not leak through 0*x
    qg = q.reshape(c, p, kvh, h // kvh, dh)
    s = jnp.einsum("cpkgd,cjkd->ckgpj", qg, k, preferred_element_type=jnp.float32)
    s = s / np.sqrt(dh)
    mask = live[:, None, :] & (ctx[None, None, :] <= q_pos[:, :, None])  # [C, P, ctx]
    s = jnp.where(mask[:, None, None], s, _MASKED)
    w = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("ckgpj,cjkd->cpkgd", w, v, preferred_element_type=jnp.float32)
    return o.reshape(c, p, h, dh).astype(q.dtype)


def _decode_attention(q, k_pages, v_pages, kv_lens, page_table, layer, num_pages):
    """q [D, H, Dh] -> [D, H, Dh]; each query attends to its whole live context."""
    d, h, dh = q.shape
    k = _gather(k_pages, page_table, num_pages, layer)  # [D, ctx, KVH, Dh]
    v = _gather(v_pages, page_table, num_pages, layer)
    kvh = k.shape[2]
    ctx = jnp.arange(k.shape[1], dtype=jnp.int32)
    live = ctx[None, :] < kv_lens[:, None]  # [D, ctx]
    v = jnp.where(live[:, :, None, None], v, 0)
    qg = q.reshape(d, kvh, h // kvh, dh)
    s = jnp.einsum("dkgx,djkx->dkgj", qg, k, preferred_element_type=jnp.float32)
    s = jnp.where(live[:, None, None, :], s / np.sqrt(dh), _MASKED)
    w = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("dkgj,djkx->dkgx", w, v, preferred_element_type=jnp.float32)
    return o.reshape(d, h, dh).astype(q.dtype)


def reference_attention(q, k_pages, v_pages, *, positions, chunk_lens, kv_lens, page_table,
                        shape: AttentionShape, layer=None) -> jax.Array:
    """The XLA reference over a whole step: q [T, H, Dh] -> [T, H, Dh]. With `layer`, k/v_pages
    are the stacked [L, N, page, KVH, Dh] cache and pages are read from that layer in place."""
    del chunk_lens  # padding rows are masked through positions and kv_lens
    c, p, d = shape.num_chunk_slots, shape.chunk_len, shape.num_decode_slots
    t, h, dh = q.shape
    assert t == c * p + d, (t, c, p, d)
    parts = []
    if c:
        q_c = q[: c * p].reshape(c, p, h, dh)
        branches = [functools.partial(_chunk_attention, num_pages=n) for n in shape.buckets]
        o_c = jax.lax.switch(_pick_bucket(kv_lens[:c], shape), branches, q_c, k_pages, v_pages,
                             positions[: c * p].reshape(c, p), kv_lens[:c], page_table[:c], layer)
        parts.append(o_c.reshape(c * p, h, dh))
    if d:
        branches = [functools.partial(_decode_attention, num_pages=n) for n in shape.buckets]
        size = d // shape.decode_groups
        for g0 in range(0, d, size):
            rows = slice(c + g0, c + g0 + size)
            parts.append(jax.lax.switch(
                _pick_bucket(kv_lens[rows], shape), branches, q[c * p + g0: c * p + g0 + size],
                k_pages, v_pages, kv_lens[rows], page_table[rows], layer))
    return jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


def native_cpu_attention(q, k_pages, v_pages, *, positions, chunk_lens, kv_lens, page_table,
                         shape: AttentionShape, layer=None) -> jax.Array:
    """The `cpu` backend: every row through the native kernel (jaxserve/native), which reads
    the pages in place. A chunk row sees its sequence's keys up to its own position (causal),
    a decode row its whole context; padding rows see none and come back as zeros."""
    from jaxserve.native.paged_attention import paged_attention_rows

    c, p, d = shape.num_chunk_slots, shape.chunk_len, shape.num_decode_slots
    assert q.shape[0] == c * p + d, (q.shape, c, p, d)
    row_slot = np.concatenate([np.repeat(np.arange(c), p), np.arange(c, c + d)]).astype(np.int32)
    row_len = kv_lens[c:]
    if c:
        live = (jnp.arange(p)[None, :] < chunk_lens[:, None]).reshape(-1)
        causal = jnp.minimum(positions[: c * p] + 1, jnp.repeat(kv_lens[:c], p))
        row_len = jnp.concatenate([jnp.where(live, causal, 0), row_len])
    return paged_attention_rows(q, k_pages, v_pages, row_slot=row_slot, row_len=row_len,
                                page_table=page_table, layer=layer)


def resolve_backend(name: str, platform: str | None = None) -> str:
    """`auto` picks by platform: TPU -> pallas_tpu, GPU -> pallas_gpu, CPU -> cpu (the native
    kernel; the engine falls back to xla where it cannot be built), otherwise xla."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"attention={name!r} must be one of {('auto',) + BACKENDS}")
        return name
    platform = platform or jax.default_backend()
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu",
            "cpu": "cpu"}.get(platform, "xla")


_PALLAS_PLATFORMS = {"pallas_tpu": ("tpu",), "pallas_gpu": ("gpu", "cuda", "rocm")}


def attention_fn(backend: str, shape: AttentionShape, *, interpret: bool = False) -> AttentionFn:
    """The step's attention for `backend`; `interpret` runs a Pallas kernel on the CPU."""
    if backend == "xla":
        return functools.partial(reference_attention, shape=shape)
    if backend == "cpu":
        if jax.default_backend() != "cpu":
            raise ValueError(f"attention='cpu' runs only on the CPU, but the default backend is "
                             f"{jax.default_backend()!r}; use attention='auto'")
        from jaxserve.native import build
        build.load()  # raises NativeBuildError where the kernel cannot be built
        return functools.partial(native_cpu_attention, shape=shape)
    if backend not in _PALLAS_PLATFORMS:
        raise ValueError(f"attention={backend!r} must be one of {BACKENDS}")
    platform = jax.default_backend()
    if not interpret and platform not in _PALLAS_PLATFORMS[backend]:
        raise ValueError(
            f"attention={backend!r} needs a {_PALLAS_PLATFORMS[backend][0].upper()} but the "
            f"default backend is {platform!r}; set pallas_interpret=True to run the kernel in "
            f"interpret mode, or use attention='xla'")
    # Imported here so that the XLA path never loads Pallas.
    from pallas_kernels.ragged import step_attention

    c, p, d = shape.num_chunk_slots, shape.chunk_len, shape.num_decode_slots
    if backend == "pallas_tpu":
        from pallas_kernels import tpu_ragged_paged_attention as tpu
        kernel = functools.partial(tpu.ragged_paged_attention, interpret=interpret,
                                   decode_only=c == 0)
    else:
        from pallas_kernels import gpu_ragged_paged_attention as gpu
        kernel = functools.partial(gpu.ragged_paged_attention, max_decodes=d, max_chunks=c,
                                   max_chunk_len=p, interpret=interpret)
    return step_attention(kernel, c, p, d)
