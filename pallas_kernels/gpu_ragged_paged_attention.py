"""Ragged paged attention for GPU (Pallas Triton backend), for mixed chunk + decode batches.

Reads the ragged view of `ragged.py` (decodes first, `cu_q_lens`, `kv_lens`, `page_indices`,
`num_seqs`, `num_decodes`) with two kernels, because the two kinds of rows want different
parallelism:

* Decode rows (one query per sequence, memory bound): split-KV "flash decoding". Grid
  (decode sequence, KV head, split). Each program walks its split's pages in blocks of
  `pages_per_block` pages, loading them straight from the page list (a masked gather of page
  rows: pages past the context are never read), and keeps an online softmax for the R = H/KVH
  query heads that share the KV head (GQA: K/V are read once per KV head, never repeated). The
  splits' partial (output, max, sum) are merged in jnp afterwards (D x H x splits x Dh).
* Chunk rows (prefill): a tiled flash-attention. Grid (chunk sequence, query tile, KV head);
  a tile is `block_q` query rows x R heads (one [block_q * R, Dh] matrix), walking KV blocks
  only up to the tile's newest position (causal), with the causal mask inside the block.

Query heads are padded per KV head to a power of two (at least 16 for decode rows) so every
tile is a legal Triton block; the padding rows are zeros and are dropped.

On a real GPU Triton needs power-of-two block dims with every matmul dim >= 16: head_dim and
page_size must be powers of two and pages_per_block * page_size >= 16 (checked when not
interpreting). On the CPU, `interpret=True` runs the same kernels through Pallas' HLO
interpreter.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ragged import (MASK_VALUE, RaggedMetadata, default_scale, stacked_cache,
                                   validate_inputs)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes:
    """Untuned starting points (no GPU was available when they were written)."""

    decode_kv_tokens: int = 64  # keys per decode KV block
    decode_split_tokens: int = 512  # a split covers at least this many keys
    max_splits: int = 16
    # Split the KV only while decode sequences x KV heads leave the GPU's SMs idle: more
    # splits than that only add partial outputs to write and merge.
    target_programs: int = 264  # ~2 waves of an H100's 132 SMs
    chunk_tile_rows: int = 128  # query rows x heads per chunk tile (one [rows, Dh] matmul)
    chunk_kv_tokens: int = 64
    decode_num_warps: int = 4
    chunk_num_warps: int = 8
    num_stages: int = 2


def _masked_page_load(ref, layer, pages, page_ok, g):
    """ref [L, N, page_size, KVH, Dh]: rows of KV head g of `pages` of `layer` ->
    [n*page_size, Dh]; pages with page_ok False are not read (zeros)."""
    _, _, page_size, _, head_dim = ref.shape
    # Integer-array indices on every dim (a gather of page rows): what both the Triton
    # lowering and the interpreter's discharge rule accept.
    slot = jnp.arange(page_size, dtype=jnp.int32)[None, :, None]
    lane = jnp.arange(head_dim, dtype=jnp.int32)[None, None, :]
    x = plgpu.load(ref.at[layer, pages[:, None, None], slot, g, lane],
                   mask=page_ok[:, None, None], other=0)
    return x.reshape(-1, head_dim)


def _online_update(carry, q, k, v, mask, sm_scale):
    """One KV block of online softmax. q [M, Dh], k/v [B, Dh], mask bool[M, B]."""
    acc, m_prev, l_prev = carry
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * sm_scale
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_new = alpha * l_prev + jnp.sum(p, axis=1)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
    return acc * alpha[:, None] + pv, m_new, l_new


def _decode_kernel(q_ref, k_ref, v_ref, kv_lens_ref, pages_ref, num_decodes_ref, layer_ref,
                   o_out, m_out, l_out, *, sm_scale: float, pages_per_block: int,
                   pages_per_split: int):
    # q_ref [R_pad, Dh]; k_ref / v_ref [L, N, page_size, KVH, Dh]; pages_ref [S, pages_padded]
    # outputs for (decode d, KV head g, split sp): the split's normalised o [R_pad, Dh] in q's
    # dtype, its running max m and sum l [R_pad] in f32.
    d, g, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    page_size = k_ref.shape[2]
    layer = layer_ref[0]
    block_kv = pages_per_block * page_size
    kv_len = jnp.where(d < num_decodes_ref[0], kv_lens_ref[d], 0)
    first_page = sp * pages_per_split
    end_page = jnp.minimum(first_page + pages_per_split, pl.cdiv(kv_len, page_size))
    num_blocks = pl.cdiv(jnp.maximum(end_page - first_page, 0), pages_per_block)
    q = q_ref[...]
    r_pad = q.shape[0]

    def body(j, carry):
        p0 = first_page + j * pages_per_block
        page_ids = p0 + jnp.arange(pages_per_block, dtype=jnp.int32)
        pages = pages_ref[d, pl.ds(p0, pages_per_block)]
        page_ok = page_ids < end_page
        k = _masked_page_load(k_ref, layer, pages, page_ok, g)
        v = _masked_page_load(v_ref, layer, pages, page_ok, g)
        key_pos = p0 * page_size + jnp.arange(block_kv, dtype=jnp.int32)
        key_ok = key_pos < kv_len
        v = jnp.where(key_ok[:, None], v, 0).astype(v.dtype)  # slots past kv_len may be NaN
        mask = jnp.broadcast_to(key_ok[None, :], (r_pad, block_kv))
        return _online_update(carry, q, k, v, mask, sm_scale)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((r_pad,), MASK_VALUE, jnp.float32),
            jnp.zeros((r_pad,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, num_blocks, body, init)
    o_out[...] = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_out.dtype)
    m_out[...] = m
    l_out[...] = l


def _chunk_kernel(q_ref, k_ref, v_ref, cu_ref, kv_lens_ref, pages_ref, num_seqs_ref,
                  num_decodes_ref, layer_ref, o_ref, *, sm_scale: float, block_q: int,
                  r_pad: int, pages_per_block: int):
    # q_ref / o_ref [KVH, Tq_pad * R_pad, Dh]: packed row t, head r of KV group g at
    # [g, t * R_pad + r]. Chunk sequence c is ragged sequence num_decodes + c.
    c, t, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_seqs_max = kv_lens_ref.shape[0]
    page_size = k_ref.shape[2]
    layer = layer_ref[0]
    block_kv = pages_per_block * page_size
    tile = block_q * r_pad
    s = num_decodes_ref[0] + c
    seq_live = s < num_seqs_ref[0]
    s = jnp.minimum(s, num_seqs_max - 1)
    q_start, q_end, kv_len = cu_ref[s], cu_ref[s + 1], kv_lens_ref[s]
    q_len = jnp.where(seq_live, q_end - q_start, 0)
    tile_row0 = t * block_q
    rows = tile_row0 + jnp.arange(tile, dtype=jnp.int32) // r_pad  # row within the sequence
    row_ok = rows < q_len
    q_pos = kv_len - q_len + rows
    last_pos = kv_len - q_len + jnp.minimum(q_len, tile_row0 + block_q) - 1
    num_blocks = jnp.where(tile_row0 < q_len, pl.cdiv(last_pos + 1, block_kv), 0)
    # A dead tile reads and writes nothing (all-false masks); keep its window in bounds anyway.
    span = pl.ds(jnp.where(tile_row0 < q_len, q_start + tile_row0, 0) * r_pad, tile)
    q = plgpu.load(q_ref.at[g, span, :], mask=row_ok[:, None], other=0)

    def body(j, carry):
        p0 = j * pages_per_block
        page_ids = p0 + jnp.arange(pages_per_block, dtype=jnp.int32)
        pages = pages_ref[s, pl.ds(p0, pages_per_block)]
        page_ok = page_ids * page_size <= last_pos
        k = _masked_page_load(k_ref, layer, pages, page_ok, g)
        v = _masked_page_load(v_ref, layer, pages, page_ok, g)
        key_pos = p0 * page_size + jnp.arange(block_kv, dtype=jnp.int32)
        v = jnp.where((key_pos <= last_pos)[:, None], v, 0).astype(v.dtype)
        mask = (key_pos[None, :] <= q_pos[:, None]) & row_ok[:, None]
        return _online_update(carry, q, k, v, mask, sm_scale)

    init = (jnp.zeros((tile, q.shape[1]), jnp.float32), jnp.full((tile,), MASK_VALUE, jnp.float32),
            jnp.zeros((tile,), jnp.float32))
    acc, _, l = jax.lax.fori_loop(0, num_blocks, body, init)
    o = acc / jnp.where(l == 0.0, 1.0, l)[:, None]
    plgpu.store(o_ref.at[g, span, :], o.astype(o_ref.dtype), mask=row_ok[:, None])


def _check_triton_shapes(head_dim, page_size, pages_per_block, name):
    for what, n in (("head_dim", head_dim), ("page_size", page_size)):
        if n & (n - 1):
            raise ValueError(f"{what}={n} must be a power of two for the Triton kernel")
    if head_dim < 16 or pages_per_block * page_size < 16:
        raise ValueError(f"Triton matmuls need head_dim >= 16 and {name} KV blocks of >= 16 "
                         f"keys, got {head_dim=} {page_size=} {pages_per_block=}")


def ragged_paged_attention(q, k_pages, v_pages, meta: RaggedMetadata, *, max_decodes: int,
                           max_chunks: int, max_chunk_len: int, layer=None,
                           sm_scale: float | None = None,
                           blocks: GpuBlockSizes = GpuBlockSizes(), interpret: bool = False):
    """q [Tq, H, Dh] packed ragged rows (decodes first) -> [Tq, H, Dh].

    k_pages / v_pages: one layer's [N, page_size, KVH, Dh], or the stacked [L, N, ...] cache
    with `layer` (an int or i32 scalar) picking the layer; both are read in place.

    Static bounds: at most `max_decodes` decode sequences and `max_chunks` chunk sequences of
    at most `max_chunk_len` rows each. Rows past cu_q_lens[num_seqs] may hold anything.
    """
    validate_inputs(q, k_pages, v_pages, meta)
    k_pages, v_pages, layer = stacked_cache(k_pages, v_pages, layer)
    sm_scale = default_scale(q.shape[-1]) if sm_scale is None else sm_scale
    out = jnp.zeros_like(q)
    if max_chunks:
        out = _chunks(q, k_pages, v_pages, layer, meta, sm_scale, max_chunks, max_chunk_len,
                      blocks, interpret)
    if max_decodes:
        is_decode = (jnp.arange(max_decodes) < meta.num_decodes[0])[:, None, None]
        o_dec = _decodes(q[:max_decodes], k_pages, v_pages, layer, meta, sm_scale, blocks,
                         interpret)
        out = out.at[:max_decodes].set(jnp.where(is_decode, o_dec, out[:max_decodes]))
    return out


def _pad_pages(page_indices, multiple: int):
    """Page lists padded (with the trash page) so a block's page slice never runs off a row."""
    pad = -page_indices.shape[1] % multiple
    return jnp.pad(page_indices, ((0, 0), (0, pad))) if pad else page_indices


def _chunks(q, k_pages, v_pages, layer, meta, sm_scale, max_chunks, max_chunk_len,
            blocks: GpuBlockSizes, interpret):
    """Chunk rows of the packed q [Tq, H, Dh] -> [Tq, H, Dh] (other rows: unspecified)."""
    tq, h, dh = q.shape
    _, _, page_size, kvh, _ = k_pages.shape
    pages_per_seq = meta.page_indices.shape[1]
    r = h // kvh
    r_pad = _pow2(r)
    block_q = min(_pow2(max_chunk_len), max(1, blocks.chunk_tile_rows // r_pad))
    ppb = min(_pow2(max(1, blocks.chunk_kv_tokens // page_size)), _pow2(pages_per_seq))
    if not interpret:
        _check_triton_shapes(dh, page_size, ppb, "chunk")
        if block_q * r_pad < 16:
            raise ValueError(f"chunk tiles of {block_q * r_pad} rows are below Triton's 16")
    tq_pad = tq + block_q  # a live tile starts before row Tq and runs at most block_q past it
    # [Tq, H, Dh] -> [KVH, Tq_pad * R_pad, Dh]: a tile is block_q rows x R_pad heads.
    q_g = jnp.pad(q, ((0, tq_pad - tq), (0, 0), (0, 0))).reshape(tq_pad, kvh, r, dh)
    q_g = jnp.pad(q_g, ((0, 0), (0, 0), (0, r_pad - r), (0, 0)))
    q_g = q_g.transpose(1, 0, 2, 3).reshape(kvh, tq_pad * r_pad, dh)
    o_g = pl.pallas_call(
        functools.partial(_chunk_kernel, sm_scale=sm_scale, block_q=block_q, r_pad=r_pad,
                          pages_per_block=ppb),
        grid=(max_chunks, pl.cdiv(max_chunk_len, block_q), kvh),
        out_shape=jax.ShapeDtypeStruct(q_g.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.chunk_num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="jaxserve_gpu_ragged_attention_chunks",
    )(q_g, k_pages, v_pages, meta.cu_q_lens, meta.kv_lens, _pad_pages(meta.page_indices, ppb),
      meta.num_seqs, meta.num_decodes, layer)
    out = o_g.reshape(kvh, tq_pad, r_pad, dh)[:, :tq, :r].transpose(1, 0, 2, 3)
    return out.reshape(tq, h, dh)


def decode_splits(num_decodes: int, num_kv_heads: int, max_tokens: int,
                  blocks: GpuBlockSizes) -> int:
    """How many KV splits a decode row gets (static: from the shapes, not the live lengths)."""
    by_occupancy = pl.cdiv(blocks.target_programs, max(1, num_decodes * num_kv_heads))
    by_length = max(1, max_tokens // blocks.decode_split_tokens)
    return max(1, min(blocks.max_splits, by_length, by_occupancy))


def _decodes(q, k_pages, v_pages, layer, meta, sm_scale, blocks: GpuBlockSizes, interpret):
    """q [D, H, Dh]: the first D packed rows -> [D, H, Dh] (rows >= num_decodes: garbage)."""
    d, h, dh = q.shape
    _, _, page_size, kvh, _ = k_pages.shape
    pages_per_seq = meta.page_indices.shape[1]
    r = h // kvh
    r_pad = max(16, _pow2(r))  # a matmul's M must be >= 16 for Triton
    ppb = min(_pow2(max(1, blocks.decode_kv_tokens // page_size)), _pow2(pages_per_seq))
    if not interpret:
        _check_triton_shapes(dh, page_size, ppb, "decode")
    splits = decode_splits(d, kvh, pages_per_seq * page_size, blocks)
    pages_per_split = pl.cdiv(pl.cdiv(pages_per_seq, splits), ppb) * ppb
    splits = pl.cdiv(pages_per_seq, pages_per_split)
    q_d = jnp.pad(q.reshape(d, kvh, r, dh), ((0, 0), (0, 0), (0, r_pad - r), (0, 0)))
    full = pl.no_block_spec
    o, m, l = pl.pallas_call(
        functools.partial(_decode_kernel, sm_scale=sm_scale, pages_per_block=ppb,
                          pages_per_split=pages_per_split),
        grid=(d, kvh, splits),
        in_specs=[pl.BlockSpec((None, None, r_pad, dh), lambda i, g, sp: (i, g, 0, 0)),
                  full, full, full, full, full, full],
        out_specs=[
            pl.BlockSpec((None, None, None, r_pad, dh), lambda i, g, sp: (i, g, sp, 0, 0)),
            pl.BlockSpec((None, None, None, r_pad), lambda i, g, sp: (i, g, sp, 0)),
            pl.BlockSpec((None, None, None, r_pad), lambda i, g, sp: (i, g, sp, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((d, kvh, splits, r_pad, dh), q.dtype),
                   jax.ShapeDtypeStruct((d, kvh, splits, r_pad), jnp.float32),
                   jax.ShapeDtypeStruct((d, kvh, splits, r_pad), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.decode_num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="jaxserve_gpu_ragged_attention_decodes",
    )(q_d, k_pages, v_pages, meta.kv_lens, _pad_pages(meta.page_indices, splits * pages_per_split),
      meta.num_decodes, layer)
    # Merge the splits, each weighted by its share of the softmax mass; empty splits have
    # m = MASK_VALUE and l = 0, so they weigh nothing.
    w = jnp.exp(m - jnp.max(m, axis=2, keepdims=True)) * l  # [D, KVH, splits, R_pad]
    total = jnp.sum(w, axis=2)
    o = jnp.sum(w[..., None] * o.astype(jnp.float32), axis=2)
    o = o / jnp.where(total == 0, 1.0, total)[..., None]
    return o[:, :, :r].reshape(d, h, dh).astype(q.dtype)
