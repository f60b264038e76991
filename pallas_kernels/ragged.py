"""The ragged view both kernels read, its jnp reference, and static input validation.

The engine's step lays queries out as a packed chunk region of `B` rows, in which chunk sequence
s < Sc owns rows [q_starts[s], q_starts[s] + q_lens[s]) (padding between and after them),
followed by `D` decode rows (decode sequence Sc + d owns row B + d). The kernels instead read one
*ragged* batch with no padding between sequences, the same metadata for TPU and GPU:

    q            [Tq, H, Dh]         live query rows packed back to back, decodes first
    cu_q_lens    i32[S + 1]          sequence s owns packed rows [cu_q_lens[s], cu_q_lens[s+1])
    kv_lens      i32[S]              context length of sequence s after this step
    page_indices i32[S, pages_per_seq]
    num_seqs     i32[1]              live sequences; they are the first num_seqs entries
    num_decodes  i32[1]              the first num_decodes sequences are decodes (q_len == 1)

Query row i of sequence s sits at absolute position kv_lens[s] - q_len(s) + i: a chunk's
tokens are always the newest of its context (the step writes them before attention runs), so
causal masking needs no positions array.

`to_ragged` / `from_ragged` convert between the two layouts with static shapes: a gather of the
query rows in, a gather of the output rows out (both [T, H, Dh], tiny next to the K/V reads).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

MASK_VALUE = -1e30  # finite, so exp(MASK - MASK) never makes a NaN in a fully masked row


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RaggedMetadata:
    cu_q_lens: jax.Array  # i32[S + 1]
    kv_lens: jax.Array  # i32[S]; 0 past num_seqs
    page_indices: jax.Array  # i32[S, pages_per_seq]
    num_seqs: jax.Array  # i32[1]
    num_decodes: jax.Array  # i32[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepToRagged:
    """Row maps between the step layout [T] and the packed ragged layout [T]."""

    src_rows: jax.Array  # i32[T]; step row that packed row r comes from (0 for padding)
    dst_rows: jax.Array  # i32[T]; packed row that step row t goes to (T - 1 for padding)


def to_ragged(chunk_tokens: int, max_chunk_seqs: int, num_decode_slots: int, q_starts,
              q_lens, kv_lens, page_table) -> tuple[RaggedMetadata, StepToRagged]:
    """The step's layout as a ragged batch: live decodes first, then live chunks."""
    b, sc, d = chunk_tokens, max_chunk_seqs, num_decode_slots
    s_total, t_total = sc + d, b + d
    i32 = jnp.int32
    q_starts, q_lens, kv_lens, page_table = (
        jnp.asarray(x, i32) for x in (q_starts, q_lens, kv_lens, page_table))
    # Sequences in "decodes first" order: index k < D is decode sequence Sc + k, else chunk
    # sequence k - D; then the live ones first, each group in its own order.
    perm = jnp.concatenate([jnp.arange(sc, s_total, dtype=i32), jnp.arange(sc, dtype=i32)])
    live = q_lens[perm] > 0
    order = perm[jnp.argsort(jnp.logical_not(live), stable=True)]  # step sequence ids
    q_len_o = q_lens[order]
    cu = jnp.concatenate([jnp.zeros((1,), i32), jnp.cumsum(q_len_o, dtype=i32)])
    meta = RaggedMetadata(
        cu_q_lens=cu, kv_lens=jnp.where(q_len_o > 0, kv_lens[order], 0),
        page_indices=page_table[order], num_seqs=jnp.sum(live, dtype=i32)[None],
        num_decodes=jnp.sum(q_lens[sc:] > 0, dtype=i32)[None])

    # Packed row r -> (ragged sequence, offset) -> step row.
    r = jnp.arange(t_total, dtype=i32)
    k = jnp.clip(jnp.searchsorted(cu, r, side="right").astype(i32) - 1, 0, s_total - 1)
    src_rows = jnp.where(r < cu[-1], q_starts[order[k]] + r - cu[k], 0)

    # Step row t -> packed row: the inverse on live rows, T - 1 for padding.
    rank = jnp.zeros((s_total,), i32).at[order].set(jnp.arange(s_total, dtype=i32))
    owns = (r[:, None] >= q_starts[None, :]) & (r[:, None] < (q_starts + q_lens)[None, :])
    seq = jnp.argmax(owns, axis=1)
    dst_rows = jnp.where(jnp.any(owns, axis=1), cu[rank[seq]] + r - q_starts[seq], t_total - 1)
    return meta, StepToRagged(src_rows=src_rows, dst_rows=dst_rows.astype(i32))


def validate_inputs(q, k_pages, v_pages, meta: RaggedMetadata) -> None:
    """Static (trace-time) checks; a ValueError names the offending value. The cache is one
    layer's pages [N, page_size, KVH, Dh] or every layer's [L, N, page_size, KVH, Dh]."""
    if q.ndim != 3:
        raise ValueError(f"q must be [tokens, num_q_heads, head_dim], got {q.shape=}")
    if k_pages.ndim not in (4, 5):
        raise ValueError(f"k_pages must be [(layers,) num_pages, page_size, num_kv_heads, "
                         f"head_dim], got {k_pages.shape=}")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"{k_pages.shape=} must equal {v_pages.shape=}")
    _, num_q_heads, head_dim = q.shape
    num_kv_heads, head_dim_kv = k_pages.shape[-2:]
    if head_dim != head_dim_kv:
        raise ValueError(f"q {head_dim=} must equal the cache's head_dim={head_dim_kv}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads=} must be divisible by {num_kv_heads=}")
    if not (q.dtype == k_pages.dtype == v_pages.dtype):
        raise ValueError(
            f"{q.dtype=} must equal the cache dtypes {k_pages.dtype=} {v_pages.dtype=}")
    num_seqs_max = meta.page_indices.shape[0]
    if meta.page_indices.ndim != 2:
        raise ValueError(f"page_indices must be [seqs, pages_per_seq], got "
                         f"{meta.page_indices.shape=}")
    if meta.kv_lens.shape != (num_seqs_max,):
        raise ValueError(f"{meta.kv_lens.shape=} must be ({num_seqs_max},)")
    if meta.cu_q_lens.shape != (num_seqs_max + 1,):
        raise ValueError(f"{meta.cu_q_lens.shape=} must be ({num_seqs_max + 1},)")
    for name in ("cu_q_lens", "kv_lens", "page_indices", "num_seqs", "num_decodes"):
        dtype = getattr(meta, name).dtype
        if dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {dtype=}")


def stacked_cache(k_pages, v_pages, layer):
    """Both kernels index a [L, N, page_size, KVH, Dh] cache with a layer number i32[1]: a
    single layer's [N, ...] pages become L = 1 (a free reshape), and an engine can hand over
    its whole cache plus the layer instead of a per-layer slice, which XLA would copy."""
    if k_pages.ndim == 4:
        if layer is not None:
            raise ValueError("layer= needs the stacked cache [layers, num_pages, ...]")
        return k_pages[None], v_pages[None], jnp.zeros((1,), jnp.int32)
    if layer is None:
        raise ValueError(f"a stacked cache {k_pages.shape=} needs layer=")
    return k_pages, v_pages, jnp.asarray(layer, jnp.int32).reshape(1)


def ragged_reference(q, k_pages, v_pages, meta: RaggedMetadata, *, sm_scale: float):
    """Dense jnp ragged paged attention (every row gathers its sequence's whole page list):
    the kernels' own oracle on the ragged view. q [Tq, H, Dh] -> [Tq, H, Dh]; rows past
    cu_q_lens[num_seqs] come out as zeros."""
    tq, h, dh = q.shape
    _, page_size, kvh, _ = k_pages.shape
    s_max, pages_per_seq = meta.page_indices.shape
    r = jnp.arange(tq, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(meta.cu_q_lens, r, side="right") - 1, 0, s_max - 1)
    live = r < meta.cu_q_lens[meta.num_seqs[0]]
    q_len = meta.cu_q_lens[seq + 1] - meta.cu_q_lens[seq]
    kv_len = meta.kv_lens[seq]
    pos = kv_len - q_len + (r - meta.cu_q_lens[seq])  # [Tq]
    k = k_pages[meta.page_indices[seq]].reshape(tq, pages_per_seq * page_size, kvh, dh)
    v = v_pages[meta.page_indices[seq]].reshape(tq, pages_per_seq * page_size, kvh, dh)
    ctx = jnp.arange(pages_per_seq * page_size, dtype=jnp.int32)
    mask = live[:, None] & (ctx[None, :] <= pos[:, None]) & (ctx[None, :] < kv_len[:, None])
    v = jnp.where(mask[:, :, None, None], v, 0)
    qg = q.reshape(tq, kvh, h // kvh, dh)
    s = jnp.einsum("tkgd,tjkd->tkgj", qg, k, preferred_element_type=jnp.float32) * sm_scale
    s = jnp.where(mask[:, None, None, :], s, MASK_VALUE)
    w = jax.nn.softmax(s, axis=-1)
    w = jnp.where(mask[:, None, None, :], w, 0).astype(v.dtype)
    o = jnp.einsum("tkgj,tjkd->tkgd", w, v, preferred_element_type=jnp.float32)
    return o.reshape(tq, h, dh).astype(q.dtype)


def default_scale(head_dim: int) -> float:
    return float(1.0 / np.sqrt(head_dim))


def step_attention(ragged_fn, chunk_tokens: int, max_chunk_seqs: int, num_decode_slots: int):
    """Adapts `ragged_fn(q, k_pages, v_pages, meta, layer=) -> o` (packed ragged rows) to the
    engine's step layout: attend(q [T, H, Dh], k_pages, v_pages, *, positions, q_starts, q_lens,
    kv_lens, page_table, layer=None) -> [T, H, Dh]. `positions` is not needed (see the module
    docstring); `layer` selects a layer of a stacked [L, N, ...] cache (see `stacked_cache`)."""
    b, sc, d = chunk_tokens, max_chunk_seqs, num_decode_slots

    def attend(q, k_pages, v_pages, *, positions, q_starts, q_lens, kv_lens, page_table,
               layer=None):
        del positions
        if q.shape[0] != b + d:
            raise ValueError(f"{q.shape=} must have B + D = {b + d} rows")
        meta, rows = to_ragged(b, sc, d, q_starts, q_lens, kv_lens, page_table)
        o = ragged_fn(q[rows.src_rows], k_pages, v_pages, meta, layer=layer)
        return o[rows.dst_rows]

    return attend
