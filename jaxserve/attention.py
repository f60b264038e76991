"""Paged attention for one step: the XLA reference, and dispatch to the native and Pallas kernels.

A step's query rows are a packed chunk region of `B` rows followed by `D` decode rows. Up to `Sc`
sequences' prompt chunks share the region back to back: sequence s (s < Sc) owns rows
[q_starts[s], q_starts[s] + q_lens[s]), each start a multiple of `chunk_align`; decode sequence
Sc + d owns row B + d (q_lens 1 when live). Rows nobody owns are padding and may hold anything.

The reference (the oracle for every kernel; what meshes run) works in row blocks of
`chunk_align` rows, which by the alignment belong to one sequence each: a block gathers its
sequence's pages and runs dense masked attention, so its cost is rows x context, like the FLOPs.
A `lax.switch` over a few context buckets (picked on device from the longest live context) keeps
the gather proportional to what is live, inside the one executable. On the CPU the default is
`cpu`: a native kernel that reads the pages in place (jaxserve/native).
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

    chunk_tokens: int  # B: rows of the packed chunk region (0 in the decode-only step)
    max_chunk_seqs: int  # Sc: sequences that may share the chunk region
    num_decode_slots: int  # D
    page_size: int
    pages_per_seq: int
    chunk_align: int = 1  # every chunk starts at a multiple of this many rows

    def __post_init__(self):
        if self.chunk_align < 1 or self.chunk_tokens % self.chunk_align:
            raise ValueError(f"chunk_tokens={self.chunk_tokens} must be a multiple of "
                             f"chunk_align={self.chunk_align}")
        if (self.chunk_tokens == 0) != (self.max_chunk_seqs == 0):
            raise ValueError(f"chunk_tokens={self.chunk_tokens} and max_chunk_seqs="
                             f"{self.max_chunk_seqs} must both be 0 (decode-only) or neither")

    @property
    def num_tokens(self) -> int:
        """T = B + D rows."""
        return self.chunk_tokens + self.num_decode_slots

    @property
    def num_seqs(self) -> int:
        """S = Sc + D sequences (chunk sequences first)."""
        return self.max_chunk_seqs + self.num_decode_slots

    def decode_only(self) -> "AttentionShape":
        return dataclasses.replace(self, chunk_tokens=0, max_chunk_seqs=0)

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
#        positions i32[T], q_starts i32[S], q_lens i32[S], kv_lens i32[S],
#        page_table i32[S, pages_per_seq], layer=None) -> [T, H, Dh]
# With `layer`, k/v_pages are the whole stacked cache [L, N, ...]: a backend reads that layer's
# pages in place (slicing it out first would copy a layer of cache per layer per step).
# Rows are laid out as the module docstring says; padding rows may come back as anything.
AttentionFn = Callable[..., jax.Array]


def row_segments(q_starts: jax.Array, q_lens: jax.Array, num_rows: int) -> jax.Array:
    """i32[num_rows]: the sequence that owns each row (-1 for padding), from the ragged
    starts and lengths (segments never overlap)."""
    r = jnp.arange(num_rows, dtype=jnp.int32)[:, None]
    owns = (r >= q_starts[None, :]) & (r < (q_starts + q_lens)[None, :])  # [rows, S]
    seq = jnp.argmax(owns, axis=1).astype(jnp.int32)
    return jnp.where(jnp.any(owns, axis=1), seq, -1)


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


def _block_attention(q, k_pages, v_pages, q_pos, kv_lens, page_table, layer, num_pages):
    """Blocks of rows that each belong to one sequence: q [NB, A, H, Dh], q_pos i32[NB, A],
    kv_lens i32[NB] (0: an empty block), page_table [NB, pages] -> [NB, A, H, Dh], causal."""
    c, p, h, dh = q.shape
    k = _gather(k_pages, page_table, num_pages, layer)  # [NB, ctx, KVH, Dh]
    v = _gather(v_pages, page_table, num_pages, layer)
    kvh = k.shape[2]
    ctx = jnp.arange(k.shape[1], dtype=jnp.int32)
    live = ctx[None, :] < kv_lens[:, None]  # [NB, ctx]
    v = jnp.where(live[:, :, None, None], v, 0)  # a stale or NaN page must not leak through 0*x
    qg = q.reshape(c, p, kvh, h // kvh, dh)
    s = jnp.einsum("cpkgd,cjkd->ckgpj", qg, k, preferred_element_type=jnp.float32)
    s = s / np.sqrt(dh)
    mask = live[:, None, :] & (ctx[None, None, :] <= q_pos[:, :, None])  # [NB, A, ctx]
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


def reference_attention(q, k_pages, v_pages, *, positions, q_starts, q_lens, kv_lens, page_table,
                        shape: AttentionShape, layer=None) -> jax.Array:
    """The XLA reference over a whole step: q [T, H, Dh] -> [T, H, Dh]. With `layer`, k/v_pages
    are the stacked [L, N, page, KVH, Dh] cache and pages are read from that layer in place."""
    b, sc, d = shape.chunk_tokens, shape.max_chunk_seqs, shape.num_decode_slots
    t, h, dh = q.shape
    assert t == shape.num_tokens, (t, shape)
    parts = []
    if b:
        a = shape.chunk_align
        # A block's rows belong to the sequence of its first row (chunks start block-aligned).
        block_seq = row_segments(q_starts[:sc], q_lens[:sc], b)[::a]  # i32[B / A]
        idx = jnp.maximum(block_seq, 0)
        block_kv = jnp.where(block_seq >= 0, kv_lens[idx], 0)
        branches = [functools.partial(_block_attention, num_pages=n) for n in shape.buckets]
        o_c = jax.lax.switch(_pick_bucket(block_kv, shape), branches,
                             q[:b].reshape(b // a, a, h, dh), k_pages, v_pages,
                             positions[:b].reshape(b // a, a), block_kv, page_table[idx], layer)
        parts.append(o_c.reshape(b, h, dh))
    if d:
        branches = [functools.partial(_decode_attention, num_pages=n) for n in shape.buckets]
        size = d // shape.decode_groups
        for g0 in range(0, d, size):
            rows = slice(sc + g0, sc + g0 + size)
            parts.append(jax.lax.switch(
                _pick_bucket(kv_lens[rows], shape), branches, q[b + g0: b + g0 + size],
                k_pages, v_pages, kv_lens[rows], page_table[rows], layer))
    return jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


def native_cpu_attention(q, k_pages, v_pages, *, positions, q_starts, q_lens, kv_lens,
                         page_table, shape: AttentionShape, layer=None) -> jax.Array:
    """The `cpu` backend: every row through the native kernel (jaxserve/native), which reads
    the pages in place. A chunk row sees its sequence's keys up to its own position (causal),
    a decode row its whole context; padding rows see none and come back as zeros."""
    from jaxserve.native.paged_attention import paged_attention_rows

    assert q.shape[0] == shape.num_tokens, (q.shape, shape)
    row_seq = row_segments(q_starts, q_lens, shape.num_tokens)
    # Every live row is the newest token of its context at its position, so it sees keys
    # [0, position]: causal for a chunk row, the whole context for a decode row.
    row_len = jnp.where(row_seq >= 0, positions + 1, 0)
    return paged_attention_rows(q, k_pages, v_pages, row_slot=jnp.maximum(row_seq, 0),
                                row_len=row_len, page_table=page_table, layer=layer)


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

    b, sc, d = shape.chunk_tokens, shape.max_chunk_seqs, shape.num_decode_slots
    if backend == "pallas_tpu":
        from pallas_kernels import tpu_ragged_paged_attention as tpu
        kernel = functools.partial(tpu.ragged_paged_attention, interpret=interpret,
                                   decode_only=b == 0)
    else:
        from pallas_kernels import gpu_ragged_paged_attention as gpu
        # One packed chunk may take the whole region: B rows at most per chunk sequence.
        kernel = functools.partial(gpu.ragged_paged_attention, max_decodes=d, max_chunks=sc,
                                   max_chunk_len=b, interpret=interpret)
    return step_attention(kernel, b, sc, d)
