"""Ragged paged attention for TPU (Mosaic), for mixed prefill-chunk + decode batches.

Reads the ragged view of `ragged.py` (decodes first, `cu_q_lens`, `kv_lens`, `page_indices`).

Grid: (kv_head g, query block b), both "parallel": every program is independent.
  * Metadata (cu_q_lens, kv_lens, page_indices, and the first/last sequence with rows in each
    query block, computed by the wrapper) is scalar-prefetched into SMEM.
  * K/V stay in HBM (`pl.ANY`). A program walks the (sequence, KV block) pairs its query block
    needs; each KV block is `pages_per_block` pages of one KV head, brought into VMEM by DMA
    straight from the page list (no gathered copy of the context), double-buffered: block n+1's
    DMAs are started before block n is waited on. Pages past what the block's rows can see
    (causality, kv_len) are not fetched at all.
  * Online softmax per query row, per query head of the group: the group's R = H / KVH query
    heads share one K/V buffer (GQA without repeating K/V). m / l / acc live in VMEM scratch,
    m and l broadcast over 128 lanes (Mosaic tiles the last dim by 128).
  * A query block may span several sequences (many decodes, or a chunk's tail and the next
    chunk's head); rows of other sequences are masked out of each update, so no state reset is
    needed between sequences.

Block sizes come from `TPU_BLOCK_SIZES` below. No TPU was available while writing this: the
kernel is verified in TPU interpret mode (`pltpu.InterpretParams()`) only, and the table holds
VMEM-sized starting points, not measured optima.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged import (MASK_VALUE, RaggedMetadata, default_scale, stacked_cache,
                                   validate_inputs)

_LANES = 128

# (kv dtype, head_dim) -> (query rows per block for mixed steps, KV tokens per block).
# Decode-only steps use DECODE_BLOCK_Q rows: each row is its own sequence, so a larger block
# only adds masked work. KV tokens per block: 2 buffers x (K + V) x tokens x head_dim must stay
# well inside the scoped VMEM (16-32 MiB) with room for q / acc.
TPU_BLOCK_SIZES: dict[tuple[str, int], tuple[int, int]] = {
    ("bfloat16", 64): (64, 1024),
    ("bfloat16", 128): (64, 512),
    ("bfloat16", 256): (32, 256),
    ("float32", 64): (32, 512),
    ("float32", 128): (32, 256),
    ("float32", 256): (16, 128),
}
DECODE_BLOCK_Q = 8
_DEFAULT_BLOCK_SIZES = (32, 256)


def tpu_block_sizes(dtype, head_dim: int, page_size: int, pages_per_seq: int,
                    decode_only: bool) -> tuple[int, int]:
    """(block_q, pages_per_block) for a cache of this dtype / head_dim / page_size."""
    block_q, kv_tokens = TPU_BLOCK_SIZES.get((jnp.dtype(dtype).name, head_dim),
                                             _DEFAULT_BLOCK_SIZES)
    if decode_only:
        block_q = DECODE_BLOCK_Q
    pages_per_block = max(1, min(pages_per_seq, kv_tokens // page_size))
    return block_q, pages_per_block


def _kernel(
    # Scalar prefetch (SMEM).
    cu_ref,  # i32[S + 1]
    kv_lens_ref,  # i32[S]
    pages_ref,  # i32[S, pages_per_seq]
    seq_range_ref,  # i32[2, num_q_blocks]: first, last sequence with rows in the block
    layer_ref,  # i32[1]: the layer of the stacked cache
    # Inputs.
    q_ref,  # [R, block_q, Dh]: query heads g*R .. g*R + R - 1
    k_hbm,  # [L, N, page_size, KVH, Dh] (HBM)
    v_hbm,
    # Output.
    o_ref,  # [R, block_q, Dh]
    # Scratch.
    k_buf,  # [2, block_kv, Dh]
    v_buf,
    sems,  # DMA semaphores [2 (k, v), 2 (buffer)]
    m_ref,  # f32[R, block_q, 128]
    l_ref,  # f32[R, block_q, 128]
    acc_ref,  # f32[R, block_q, Dh]
    *,
    sm_scale: float,
    pages_per_block: int,
):
    g, b = pl.program_id(0), pl.program_id(1)
    num_q_per_kv, block_q, head_dim = q_ref.shape
    page_size = k_hbm.shape[2]
    layer = layer_ref[0]
    pages_per_seq = pages_ref.shape[1]
    block_kv = pages_per_block * page_size
    row0 = b * block_q
    first, last = seq_range_ref[0, b], seq_range_ref[1, b]

    def seq_info(s):
        q_start, q_end, kv_len = cu_ref[s], cu_ref[s + 1], kv_lens_ref[s]
        # The newest position among this sequence's rows in this block: nothing past it is read.
        last_row = jnp.minimum(q_end, row0 + block_q) - 1
        last_pos = kv_len - (q_end - q_start) + (last_row - q_start)
        return q_start, q_end, kv_len, last_pos

    def copies(s, j, slot):
        """(needed, K copy, V copy) for each page of KV block j of sequence s."""
        _, _, _, last_pos = seq_info(s)
        out = []
        for i in range(pages_per_block):
            p = j * pages_per_block + i
            page = pages_ref[s, jnp.minimum(p, pages_per_seq - 1)]
            dst = pl.ds(i * page_size, page_size)
            out.append((
                p * page_size <= last_pos,
                pltpu.make_async_copy(k_hbm.at[layer, page, :, g, :], k_buf.at[slot, dst, :],
                                      sems.at[0, slot]),
                pltpu.make_async_copy(v_hbm.at[layer, page, :, g, :], v_buf.at[slot, dst, :],
                                      sems.at[1, slot]),
            ))
        return out

    def start(s, j, slot):
        for needed, k_copy, v_copy in copies(s, j, slot):
            @pl.when(needed)
            def _():
                k_copy.start()
                v_copy.start()

    def wait(s, j, slot):
        for needed, k_copy, v_copy in copies(s, j, slot):
            @pl.when(needed)
            def _():
                k_copy.wait()
                v_copy.wait()

    def num_kv_blocks(s):
        return pl.cdiv(seq_info(s)[3] + 1, block_kv)

    def attend_block(s, j, slot):
        q_start, q_end, kv_len, last_pos = seq_info(s)
        rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
        q_pos = kv_len - (q_end - q_start) + (rows - q_start)  # [block_q, 1]
        in_seq = (rows >= q_start) & (rows < q_end)
        key_pos = j * block_kv + jax.lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
        mask = in_seq & (key_pos <= q_pos)  # [block_q, block_kv]; q_pos < kv_len on live rows
        k = k_buf[slot]  # [block_kv, Dh]
        # Pages not fetched (past last_pos) hold stale data or NaN: 0 * NaN must not reach acc.
        key_col = j * block_kv + jax.lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0)
        v = jnp.where(key_col <= last_pos, v_buf[slot], 0).astype(v_buf.dtype)
        for r in range(num_q_per_kv):
            q = q_ref[r]  # [block_q, Dh]
            s_ = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * sm_scale
            s_ = jnp.where(mask, s_, MASK_VALUE)
            m_prev = m_ref[r][:, :1]
            l_prev = l_ref[r][:, :1]
            m_new = jnp.maximum(m_prev, jnp.max(s_, axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(s_ - m_new), 0.0)
            alpha = jnp.exp(m_prev - m_new)  # 1 on rows of other sequences (all masked)
            l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
            pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)
            acc_ref[r] = alpha * acc_ref[r] + pv
            m_ref[r] = jnp.broadcast_to(m_new, (block_q, _LANES))
            l_ref[r] = jnp.broadcast_to(l_new, (block_q, _LANES))

    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(first <= last)
    def _():
        start(first, 0, 0)

    def body(carry):
        s, j, slot = carry
        advance = j + 1 >= num_kv_blocks(s)
        next_s = jnp.where(advance, s + 1, s)
        next_j = jnp.where(advance, 0, j + 1)

        @pl.when(next_s <= last)
        def _():
            start(next_s, next_j, 1 - slot)

        wait(s, j, slot)
        attend_block(s, j, slot)
        return next_s, next_j, 1 - slot

    jax.lax.while_loop(lambda c: c[0] <= last, body, (first, jnp.int32(0), jnp.int32(0)))

    for r in range(num_q_per_kv):
        l = l_ref[r][:, :1]
        o_ref[r] = (acc_ref[r] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def _seq_ranges(cu_q_lens, num_seqs, num_q_blocks: int, block_q: int):
    """i32[2, num_q_blocks]: first and last live sequence with rows in each query block
    (first > last for a block past the last live row)."""
    total = cu_q_lens[num_seqs[0]]
    lo = jnp.arange(num_q_blocks, dtype=jnp.int32) * block_q
    hi = jnp.minimum(lo + block_q, total) - 1
    first = jnp.searchsorted(cu_q_lens, lo, side="right").astype(jnp.int32) - 1
    last = jnp.searchsorted(cu_q_lens, hi, side="right").astype(jnp.int32) - 1
    last = jnp.where(lo < total, last, first - 1)
    return jnp.stack([first, last])


def ragged_paged_attention(q, k_pages, v_pages, meta: RaggedMetadata, *, layer=None,
                           sm_scale: float | None = None, block_q: int | None = None,
                           pages_per_block: int | None = None, decode_only: bool = False,
                           interpret=False, vmem_limit_bytes: int | None = None):
    """q [Tq, H, Dh] packed ragged rows -> [Tq, H, Dh]; rows past cu_q_lens[num_seqs] are 0.

    k_pages / v_pages: one layer's [N, page_size, KVH, Dh], or the stacked [L, N, ...] cache
    with `layer` (an int or i32 scalar) picking the layer; the kernel DMAs from either in place.

    `interpret=True` runs on the CPU in TPU interpret mode (`pltpu.InterpretParams()`); an
    `InterpretParams` instance may be passed instead to set its options.
    """
    validate_inputs(q, k_pages, v_pages, meta)
    k_pages, v_pages, layer = stacked_cache(k_pages, v_pages, layer)
    tq, h, dh = q.shape
    _, _, page_size, kvh, _ = k_pages.shape
    pages_per_seq = meta.page_indices.shape[1]
    r = h // kvh
    auto_q, auto_pages = tpu_block_sizes(k_pages.dtype, dh, page_size, pages_per_seq, decode_only)
    block_q = block_q or auto_q
    pages_per_block = pages_per_block or auto_pages
    if not interpret:
        # Mosaic tiles the second-minor dim by 8 rows of 32 bits: query blocks and the page
        # slots each DMA lands in must start on a tile boundary.
        sublanes = 8 * max(1, 4 // jnp.dtype(k_pages.dtype).itemsize)
        if block_q % 8:
            raise ValueError(f"{block_q=} must be a multiple of 8 on TPU")
        if page_size % sublanes:
            raise ValueError(f"{page_size=} must be a multiple of {sublanes} on TPU for "
                             f"{jnp.dtype(k_pages.dtype).name} pages")
    if block_q < 1:
        raise ValueError(f"{block_q=} must be positive")
    if not 0 < pages_per_block <= pages_per_seq:
        raise ValueError(f"{pages_per_block=} must be in [1, {pages_per_seq=}]")
    sm_scale = default_scale(dh) if sm_scale is None else sm_scale
    if interpret is True:
        interpret = pltpu.InterpretParams()

    num_q_blocks = pl.cdiv(tq, block_q)
    tq_pad = num_q_blocks * block_q
    # [Tq, H, Dh] -> [KVH, R, Tq_pad, Dh]: a program's query block is one contiguous tile per
    # query head of its group (q is small next to the K/V it reads).
    q_t = jnp.pad(q, ((0, tq_pad - tq), (0, 0), (0, 0)))
    q_t = q_t.reshape(tq_pad, kvh, r, dh).transpose(1, 2, 0, 3)
    seq_range = _seq_ranges(meta.cu_q_lens, meta.num_seqs, num_q_blocks, block_q)
    block_kv = pages_per_block * page_size

    q_spec = pl.BlockSpec((None, r, block_q, dh), lambda g, b, *_: (g, 0, b, 0))
    kernel = pl.pallas_call(
        functools.partial(_kernel, sm_scale=sm_scale, pages_per_block=pages_per_block),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(kvh, num_q_blocks),
            in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY),
                      pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((2, block_kv, dh), k_pages.dtype),
                pltpu.VMEM((2, block_kv, dh), v_pages.dtype),
                pltpu.SemaphoreType.DMA((2, 2)),
                pltpu.VMEM((r, block_q, _LANES), jnp.float32),
                pltpu.VMEM((r, block_q, _LANES), jnp.float32),
                pltpu.VMEM((r, block_q, dh), jnp.float32),
            ]),
        out_shape=jax.ShapeDtypeStruct(q_t.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=vmem_limit_bytes),
        interpret=interpret,
        name="jaxserve_tpu_ragged_paged_attention",
    )
    o_t = kernel(meta.cu_q_lens, meta.kv_lens, meta.page_indices, seq_range, layer, q_t,
                 k_pages, v_pages)
    return o_t.transpose(2, 0, 1, 3).reshape(tq_pad, h, dh)[:tq]
