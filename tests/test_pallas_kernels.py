"""The Pallas kernels in interpret mode against the engine's XLA reference attention.

Every case packs, back to back in one chunk region: a chunk that is a whole prompt, an unused
chunk sequence, a one-token chunk just past a page boundary, a chunk ending exactly on a page
boundary that straddles row 8 (where a fixed slot of 8 rows would have ended), several short
chunks, and an empty tail; plus decodes of 1 token, of exactly one page, of a full page table,
and empty decode slots. Pages nobody owns, the tail of each sequence's last page and padding
query rows are NaN, so a read past the end shows. The reference itself is checked against
`ragged_reference` (dense, per row) with tight and aligned packing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.attention import AttentionShape, attention_fn, reference_attention
from pallas_kernels import gpu_ragged_paged_attention as gpu
from pallas_kernels import tpu_ragged_paged_attention as tpu
from pallas_kernels.ragged import RaggedMetadata, step_attention, to_ragged
from pallas_kernels.testing import make_step_case, ragged_oracle
from jax.experimental.pallas import tpu as pltpu

CHUNK_TOKENS = 24  # 19 rows used: a 5-row empty tail
PAGES_PER_SEQ = 5
TOL = {"float32": 1e-5, "bfloat16": 1e-2}


def _chunks(ps):
    return [(8, 8), (0, 0), (1, 2 * ps + 1), (5, 3 * ps), (2, 2), (1, 7), (2, 4 * ps)]


def _case(seed, *, page_size, ratio, dtype, decode_only=False, head_dim=8, num_kv_heads=2,
          chunk_align=1):
    ps = page_size
    chunks = [] if decode_only else _chunks(ps)
    decodes = [1, 0, ps, 2 * ps + 1, PAGES_PER_SEQ * ps, 0]
    return make_step_case(
        np.random.default_rng(seed), chunks=chunks, decodes=decodes, page_size=ps,
        pages_per_seq=PAGES_PER_SEQ, num_heads=ratio * num_kv_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=jnp.dtype(dtype),
        chunk_align=chunk_align,
        # Aligned packing needs more rows: then just enough (the last block's rest is a tail).
        chunk_tokens=0 if decode_only else CHUNK_TOKENS if chunk_align == 1 else None)


def _shape(case, page_size, chunk_align=1):
    return AttentionShape(case.chunk_tokens, case.max_chunk_seqs,
                          len(case.kv_lens) - case.max_chunk_seqs, page_size, PAGES_PER_SEQ,
                          chunk_align)


# CPU compiles dominate these tests; the kernels' numerics do not depend on XLA's CPU
# optimisation level.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _call(fn, case):
    compiled = jax.jit(fn).lower(case.q, case.k_pages, case.v_pages, **case.kwargs()).compile(
        _FAST_COMPILE)
    return compiled(case.q, case.k_pages, case.v_pages, **case.kwargs())


@functools.lru_cache(maxsize=None)
def _case_and_reference(ratio, page_size, dtype, decode_only=False):
    """A case and reference_attention's output on it (shared by both kernels' tests)."""
    case = _case(ratio * 10 + page_size, page_size=page_size, ratio=ratio, dtype=dtype,
                 decode_only=decode_only)
    shape = _shape(case, page_size)
    ref = _call(functools.partial(reference_attention, shape=shape), case)
    return case, shape, np.asarray(ref, np.float32)


def _check(out, key):
    case, _, ref = _case_and_reference(*key)
    live = case.live_rows
    got = np.asarray(out, np.float32)[live]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref[live], atol=TOL[key[2]], rtol=TOL[key[2]])


def _run(kernel, key):
    case, shape, _ = _case_and_reference(*key)
    fn = step_attention(kernel, shape.chunk_tokens, shape.max_chunk_seqs, shape.num_decode_slots)
    return _call(fn, case)


# (GQA ratio, page size, dtype); several KV blocks per sequence and query blocks that span
# several sequences, so the double buffering and the per-row masking are exercised.
CASES = [(1, 4, "float32"), (2, 8, "float32"), (4, 16, "float32"), (2, 4, "bfloat16")]


@pytest.mark.parametrize("key", CASES, ids=str)
def test_tpu_kernel_matches_reference(key):
    interpret = True
    if key == CASES[0]:
        # DMAs executed when started, not when waited on, and the race detector on: a buffer
        # overwritten while in use, or a wait on the wrong semaphore, shows.
        interpret = pltpu.InterpretParams(dma_execution_mode="eager", detect_races=True)
    kernel = functools.partial(tpu.ragged_paged_attention, interpret=interpret, block_q=8,
                               pages_per_block=2)
    _check(_run(kernel, key), key)
    if interpret is not True:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # no public accessor
        assert interpret_pallas_call.races is not None
        assert not interpret_pallas_call.races.races_found


@pytest.mark.parametrize("key", CASES, ids=str)
def test_gpu_kernel_matches_reference(key):
    _, page_size, _ = key
    _, shape, _ = _case_and_reference(*key)
    # Small blocks: two KV blocks per split, several splits, 2-8 query rows per chunk tile.
    blocks = gpu.GpuBlockSizes(decode_kv_tokens=page_size, decode_split_tokens=2 * page_size,
                               chunk_tile_rows=8, chunk_kv_tokens=2 * page_size)
    kernel = functools.partial(gpu.ragged_paged_attention, max_decodes=shape.num_decode_slots,
                               max_chunks=shape.max_chunk_seqs, max_chunk_len=CHUNK_TOKENS,
                               blocks=blocks, interpret=True)
    _check(_run(kernel, key), key)


@pytest.mark.parametrize("backend", ["pallas_tpu", "pallas_gpu"])
def test_decode_only_step_through_attention_fn_with_default_blocks(backend):
    """The engine's decode-only executable (B = 0), block sizes from the tuning tables."""
    key = (4, 4, "float32", True)
    case, shape, _ = _case_and_reference(*key)
    _check(_call(attention_fn(backend, shape, interpret=True), case), key)


@pytest.mark.parametrize("backend", ["pallas_tpu", "pallas_gpu"])
def test_stacked_cache_with_a_traced_layer_index(backend):
    """The whole [L, N, ...] cache plus a layer number (no per-layer slice for XLA to copy)."""
    key = CASES[1]
    case, shape, _ = _case_and_reference(*key)
    noise = np.random.default_rng(9).standard_normal((3,) + case.k_pages.shape)
    k_all = noise.astype(np.float32).copy()
    v_all = (noise + 1).astype(np.float32)
    k_all[1], v_all[1] = case.k_pages, case.v_pages
    attend = attention_fn(backend, shape, interpret=True)
    fn = jax.jit(lambda q, k, v, layer, kw: attend(q, k, v, layer=layer, **kw))
    _check(fn(case.q, k_all, v_all, jnp.int32(1), case.kwargs()), key)


def _ragged_oracle(shape):
    return ragged_oracle(shape.chunk_tokens, shape.max_chunk_seqs, shape.num_decode_slots)


def test_ragged_view_round_trip_and_kernel_reference():
    """to_ragged packs live rows decodes-first; ragged_reference agrees with the engine's."""
    key = CASES[1]
    case, shape, _ = _case_and_reference(*key)
    b, sc, d = shape.chunk_tokens, shape.max_chunk_seqs, shape.num_decode_slots
    meta, rows = to_ragged(b, sc, d, case.q_starts, case.q_lens, case.kv_lens, case.page_table)
    n_live = int(case.live_rows.sum())
    num_dec = int((case.kv_lens[sc:] > 0).sum())
    assert int(meta.cu_q_lens[-1]) == n_live and int(meta.num_decodes[0]) == num_dec
    assert int(meta.num_seqs[0]) == num_dec + int((case.q_lens[:sc] > 0).sum())
    q_lens = np.diff(np.asarray(meta.cu_q_lens))
    assert (q_lens[:num_dec] == 1).all() and (q_lens[num_dec:int(meta.num_seqs[0])] > 0).all()
    src = np.asarray(rows.src_rows)[:n_live]
    dst = np.asarray(rows.dst_rows)
    assert sorted(src) == sorted(np.flatnonzero(case.live_rows))
    np.testing.assert_array_equal(dst[src], np.arange(n_live))
    _check(_call(_ragged_oracle(shape), case), key)


@pytest.mark.parametrize("chunk_align", [1, 2, 4, 8])
def test_reference_matches_the_dense_ragged_oracle_at_every_alignment(chunk_align):
    """The reference attends in blocks of chunk_align rows (one gather per block): packed
    chunks aligned to 1, 2, 4 or 8 rows give what the per-row dense oracle gives."""
    ps = 4
    case = _case(3, page_size=ps, ratio=2, dtype="float32", chunk_align=chunk_align)
    shape = _shape(case, ps, chunk_align)
    assert case.chunk_tokens % chunk_align == 0
    starts = case.q_starts[:shape.max_chunk_seqs]
    assert (starts % chunk_align == 0).all()
    ref = np.asarray(_call(functools.partial(reference_attention, shape=shape), case))
    want = np.asarray(_call(_ragged_oracle(shape), case))
    live = case.live_rows
    assert np.isfinite(ref[live]).all()
    np.testing.assert_allclose(ref[live], want[live], atol=1e-5, rtol=1e-5)


def test_validation_names_the_bad_value():
    q = jnp.zeros((4, 6, 8))
    pages = jnp.zeros((3, 4, 4, 8))
    meta = RaggedMetadata(cu_q_lens=jnp.zeros(3, jnp.int32), kv_lens=jnp.zeros(2, jnp.int32),
                          page_indices=jnp.zeros((2, 2), jnp.int32),
                          num_seqs=jnp.zeros(1, jnp.int32), num_decodes=jnp.zeros(1, jnp.int32))
    with pytest.raises(ValueError, match="num_q_heads=6 must be divisible by num_kv_heads=4"):
        tpu.ragged_paged_attention(q, pages, pages, meta, interpret=True)
    with pytest.raises(ValueError, match="num_q_heads=6 must be divisible by num_kv_heads=4"):
        gpu.ragged_paged_attention(q, pages, pages, meta, max_decodes=1, max_chunks=1,
                                   max_chunk_len=2, interpret=True)
    with pytest.raises(ValueError, match="kv_lens must be int32"):
        tpu.ragged_paged_attention(jnp.zeros((4, 8, 8)), pages, pages, RaggedMetadata(
            meta.cu_q_lens, meta.kv_lens.astype(jnp.int16), meta.page_indices, meta.num_seqs,
            meta.num_decodes), interpret=True)
    # Off the CPU interpreter, Triton's block rules are checked before lowering.
    with pytest.raises(ValueError, match="head_dim >= 16"):
        gpu.ragged_paged_attention(jnp.zeros((4, 8, 8)), pages, pages, meta, max_decodes=1,
                                   max_chunks=1, max_chunk_len=2, interpret=False)
    with pytest.raises(ValueError, match="pallas_interpret=True"):
        attention_fn("pallas_tpu", AttentionShape(8, 1, 2, 4, 4), interpret=False)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("backend", ["pallas_tpu", "pallas_gpu"])
def test_kernels_lower_for_their_hardware(backend, dtype):
    """The non-interpret path lowers on the CPU to a Mosaic / Triton custom call at realistic
    sizes (head_dim 128, page_size 16, GQA 4), mixed and decode-only: the Pallas lowering
    rules (block shapes, supported ops and indexing) hold; only the device compilers and the
    numerics go unchecked here."""
    b, d, page_size, pages_per_seq = 64, 4, 16, 8
    for chunks in ([(32, 40), (0, 0), (20, 20)], []):
        case = make_step_case(np.random.default_rng(0), chunks=chunks, chunk_align=8,
                              chunk_tokens=b if chunks else 0,
                              decodes=[3, 0, 40, 128], page_size=page_size,
                              pages_per_seq=pages_per_seq, num_heads=8, num_kv_heads=2,
                              head_dim=128, dtype=jnp.dtype(dtype))
        sc = case.max_chunk_seqs
        if backend == "pallas_tpu":
            kernel = functools.partial(tpu.ragged_paged_attention, decode_only=sc == 0)
            platform, target = "tpu", "tpu_custom_call"
        else:
            kernel = functools.partial(gpu.ragged_paged_attention, max_decodes=d,
                                       max_chunks=sc, max_chunk_len=case.chunk_tokens)
            platform, target = "cuda", "xla.gpu.triton"
        fn = step_attention(kernel, case.chunk_tokens, sc, d)
        lowered = jax.jit(fn).trace(case.q, case.k_pages, case.v_pages, **case.kwargs()).lower(
            lowering_platforms=(platform,))
        assert target in lowered.as_text()
