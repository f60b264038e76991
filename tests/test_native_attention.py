"""The native CPU kernel (jaxserve/native) against the XLA reference, and the `cpu` backend.

Cases come from `make_step_case`: every page no sequence owns and every slot past a sequence's
kv_len is NaN, so a kernel that reads one key too many returns NaN."""

from __future__ import annotations

import functools
import logging
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import TINY, dense_greedy, tiny_params
from jaxserve import LLM, SamplingParams
from jaxserve.attention import AttentionShape, attention_fn, reference_attention
from jaxserve.models import init_params
from jaxserve.native import build
from jaxserve.native.paged_attention import paged_attention_rows
from pallas_kernels.testing import make_step_case


def _decode_case(seed, decodes, *, page_size, num_heads, num_kv_heads, head_dim, dtype):
    pages_per_seq = max(1, -(-max(decodes) // page_size))
    return make_step_case(np.random.default_rng(seed), chunks=[], chunk_len=1, decodes=decodes,
                          page_size=page_size, pages_per_seq=pages_per_seq, num_heads=num_heads,
                          num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size", [
    (4, 4, 64, 16),   # MHA, head blocks of 4
    (6, 2, 64, 4),    # GQA 3 (the bench model's ratio)
    (8, 4, 128, 8),   # GQA 2, head_dim 128
    (8, 1, 32, 16),   # MQA, 8 heads in blocks of 4, head_dim without a fast path
    (5, 1, 16, 4),    # GQA 5: blocks of 1
])
def test_kernel_matches_reference_float32(num_heads, num_kv_heads, head_dim, page_size):
    # Lengths: empty slot, one token, exactly a page, one past it, long and ragged.
    decodes = [0, 1, page_size, page_size + 1, 3 * page_size - 1, 37, 5 * page_size]
    case = _decode_case(0, decodes, page_size=page_size, num_heads=num_heads,
                        num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=np.float32)
    shape = AttentionShape(0, 0, len(decodes), page_size, case.page_table.shape[1])
    ref = jax.jit(functools.partial(reference_attention, shape=shape))(
        case.q, case.k_pages, case.v_pages, **case.kwargs())
    got = jax.jit(lambda q, k, v: paged_attention_rows(
        q, k, v, row_slot=np.arange(len(decodes)), row_len=case.kv_lens,
        page_table=case.page_table))(case.q, case.k_pages, case.v_pages)
    got = np.asarray(got)
    assert np.all(got[0] == 0), "an empty slot gives zeros"
    live = case.live_rows
    np.testing.assert_allclose(got[live], np.asarray(ref)[live], atol=1e-5, rtol=1e-5)


def test_kernel_bfloat16_within_bf16_rounding():
    case = _decode_case(1, [3, 16, 40], page_size=8, num_heads=6, num_kv_heads=2, head_dim=64,
                        dtype=np.float32)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    shape = AttentionShape(0, 0, 3, 8, case.page_table.shape[1])
    # The reference sees the same bf16-rounded inputs, in float32.
    f32 = lambda x: bf(x).astype(jnp.float32)  # noqa: E731
    ref = reference_attention(f32(case.q), f32(case.k_pages), f32(case.v_pages),
                              shape=shape, **case.kwargs())
    got = paged_attention_rows(bf(case.q), bf(case.k_pages), bf(case.v_pages),
                               row_slot=np.arange(3), row_len=case.kv_lens,
                               page_table=case.page_table)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref), atol=2e-2)


def test_stacked_cache_reads_the_given_layer():
    case = _decode_case(2, [5, 12], page_size=4, num_heads=4, num_kv_heads=2, head_dim=16,
                        dtype=np.float32)
    other = np.random.default_rng(3).standard_normal(case.k_pages.shape).astype(np.float32)
    k = np.stack([other, case.k_pages, other])
    v = np.stack([other, case.v_pages, other])
    kw = dict(row_slot=np.arange(2), row_len=case.kv_lens, page_table=case.page_table)
    one = paged_attention_rows(case.q, case.k_pages, case.v_pages, **kw)
    stacked = jax.jit(lambda q, k, v, layer: paged_attention_rows(q, k, v, layer=layer, **kw))(
        case.q, k, v, jnp.int32(1))
    np.testing.assert_array_equal(np.asarray(stacked), np.asarray(one))


def test_rows_pick_their_slot_and_length():
    # Two rows on one slot with different lengths (a prefix of the same sequence).
    case = _decode_case(4, [20], page_size=4, num_heads=2, num_kv_heads=1, head_dim=8,
                        dtype=np.float32)
    q = np.repeat(case.q, 2, axis=0)
    got = np.asarray(paged_attention_rows(q, case.k_pages, case.v_pages, row_slot=[0, 0],
                                          row_len=[20, 1], page_table=case.page_table))
    # A row that sees one key returns that key's value, for every head.
    np.testing.assert_allclose(got[1], case.v_pages[case.page_table[0, 0], 0, [0, 0]],
                               rtol=1e-6)
    assert not np.allclose(got[0], got[1])


def test_argument_errors_name_the_problem():
    case = _decode_case(5, [4], page_size=4, num_heads=3, num_kv_heads=2, head_dim=8,
                        dtype=np.float32)
    kw = dict(row_slot=[0], row_len=[4], page_table=case.page_table)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_rows(case.q, case.k_pages, case.v_pages, **kw)
    with pytest.raises(ValueError, match="layer= needs the stacked cache"):
        paged_attention_rows(case.q[:, :2], case.k_pages, case.v_pages, layer=0, **kw)
    with pytest.raises(ValueError, match="needs layer="):
        paged_attention_rows(case.q[:, :2], case.k_pages[None], case.v_pages[None], **kw)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size,chunk_len", [
    (4, 2, 16, 4, 8),      # GQA 2, small pages: a 64-key block spans 16 pages
    (6, 2, 64, 16, 40),    # GQA 3 (the bench model), chunks of 40 rows: blocks of 16 + a tail
    (8, 8, 128, 32, 24),   # MHA, head_dim 128, pages larger than a row block
    (8, 1, 32, 128, 20),   # MQA, pages larger than a key block
])
def test_cpu_backend_step_matches_reference(num_heads, num_kv_heads, head_dim, page_size,
                                            chunk_len):
    # The whole-step `cpu` backend: chunk rows (causal, in blocks) and decode rows, ragged,
    # empty slots, partial last pages and NaN everywhere nobody owns.
    p = chunk_len
    chunks = [(p, p), (p - 3, 2 * p + 5), (0, 0), (1, 70), (p, 130)]
    decodes = [7, 0, 130, 1]
    pages_per_seq = -(-130 // page_size)
    case = make_step_case(np.random.default_rng(6), chunks=chunks, chunk_len=p,
                          decodes=decodes, page_size=page_size, pages_per_seq=pages_per_seq,
                          num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    shape = AttentionShape(case.chunk_tokens, case.max_chunk_seqs, len(decodes), page_size,
                           pages_per_seq)
    ref = jax.jit(functools.partial(reference_attention, shape=shape))(
        case.q, case.k_pages, case.v_pages, **case.kwargs())
    got = np.asarray(jax.jit(attention_fn("cpu", shape))(case.q, case.k_pages, case.v_pages,
                                                         **case.kwargs()))
    live = case.live_rows
    np.testing.assert_allclose(got[live], np.asarray(ref)[live], atol=2e-5, rtol=1e-5)
    assert np.all(got[~live] == 0), "padding rows come back as zeros"


def test_cpu_backend_bfloat16_step():
    case = make_step_case(np.random.default_rng(7), chunks=[(20, 45), (5, 5)], chunk_len=20,
                          decodes=[33, 2], page_size=8, pages_per_seq=6, num_heads=6,
                          num_kv_heads=2, head_dim=64)
    shape = AttentionShape(case.chunk_tokens, case.max_chunk_seqs, 2, 8, 6)
    f32 = lambda x: jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)  # noqa: E731
    ref = reference_attention(f32(case.q), f32(case.k_pages), f32(case.v_pages), shape=shape,
                              **case.kwargs())
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (case.q, case.k_pages, case.v_pages)]
    got = attention_fn("cpu", shape)(*bf, **case.kwargs())
    live = case.live_rows
    np.testing.assert_allclose(np.asarray(got, np.float32)[live], np.asarray(ref)[live],
                               atol=2e-2)


def test_auto_falls_back_to_xla_when_the_kernel_cannot_be_built(monkeypatch, caplog):
    def no_compiler():
        raise build.NativeBuildError("no C++ compiler found (set CXX or install g++)")

    monkeypatch.setattr(build, "load", no_compiler)
    with pytest.raises(build.NativeBuildError, match="no C\\+\\+ compiler"):
        LLM.from_params(TINY, tiny_params(), attention="cpu", chunk_size=8, max_model_len=32)
    with caplog.at_level(logging.WARNING):
        llm = LLM.from_params(TINY, tiny_params(), chunk_size=8, max_decode_slots=2,
                              max_model_len=32)
    assert llm.engine.backend == "xla"
    assert "no C++ compiler" in caplog.text
    out = llm.generate(prompt_token_ids=[[5, 6, 7]], use_tqdm=False,
                       sampling_params=SamplingParams(max_tokens=3, temperature=0))
    assert out[0].token_ids == dense_greedy(TINY, tiny_params(), [5, 6, 7], 3)


def test_build_error_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(build.NativeBuildError, match="no-such-compiler"):
        build.library_path()


def test_build_error_when_the_cache_is_not_writable(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(build.NativeBuildError, match="JAXSERVE_CACHE_DIR"):
        build.library_path()


def test_bfloat16_engine_agrees_with_the_xla_backend():
    # End to end in bfloat16: the kernel's prompt logprobs against the XLA reference's, with
    # chunks split across steps and pages (chunk 8, pages of 4).
    params = init_params(TINY, seed=0, dtype="bfloat16")
    opts = dict(dtype="bfloat16", chunk_size=16, max_chunk_seqs=3, chunk_align=2, max_decode_slots=3,
                page_size=4, max_model_len=64)
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, TINY.vocab_size, size=n).tolist() for n in (1, 9, 17, 30)]
    sp = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0, ignore_eos=True)
    outs = {}
    for backend in ("cpu", "xla"):
        llm = LLM.from_params(TINY, params, attention=backend, **opts)
        assert llm.stats["attention_backend"] == backend
        outs[backend] = llm.generate(prompt_token_ids=prompts, sampling_params=sp,
                                     use_tqdm=False)
    for a, b, prompt in zip(outs["cpu"], outs["xla"], prompts):
        got = [next(iter(d.values())) for d in a.prompt_logprobs[1:]]
        want = [next(iter(d.values())) for d in b.prompt_logprobs[1:]]
        np.testing.assert_allclose(got, want, atol=0.05, err_msg=f"prompt of {len(prompt)}")
        assert a.token_ids == b.token_ids  # seeded and deterministic: no bf16 argmax flip here


def test_cache_falls_back_to_the_temp_dir_without_a_writable_home(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-home"
    blocker.write_text("")
    monkeypatch.delenv("JAXSERVE_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(blocker))
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    assert str(build._cache_dir()).startswith(str(tmp_path / "jaxserve-"))


# ---- Chunk rows in GEMM-shaped blocks (attend_block): against a float64 numpy reference. ----
# The cache is NaN everywhere no sequence owns and past each sequence's length, so reading one
# key too many (past a row's causal limit within its block, or past the block's last row) shows.


def _paged_cache(rng, seq_lens, *, page_size, kv_heads, head_dim, spare_pages=3):
    """k/v pages [N, page, KVH, Dh] (NaN where no sequence's first seq_lens[s] tokens are) and
    a page table [S, pages_per_seq] in shuffled page order; page 0 is a NaN trash page."""
    pages_per_seq = max(1, max(-(-n // page_size) for n in seq_lens))
    num_pages = 1 + sum(-(-n // page_size) for n in seq_lens) + spare_pages
    shape = (num_pages, page_size, kv_heads, head_dim)
    k = np.full(shape, np.nan, np.float32)
    v = np.full(shape, np.nan, np.float32)
    free = list(rng.permutation(np.arange(1, num_pages)))
    table = np.zeros((len(seq_lens), pages_per_seq), np.int32)
    for s, n in enumerate(seq_lens):
        for i in range(-(-n // page_size)):
            page = table[s, i] = free.pop()
            valid = min(page_size, n - i * page_size)
            k[page, :valid] = rng.standard_normal((valid, kv_heads, head_dim))
            v[page, :valid] = rng.standard_normal((valid, kv_heads, head_dim))
    return k, v, table


def _numpy_attention(q, k, v, row_slot, row_len, table):
    """Each row's softmax attention over its first row_len keys, in float64 (zeros for 0)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    rows, heads, dh = q.shape
    ps, group = k.shape[1], heads // k.shape[2]
    out = np.zeros_like(q)
    for r in range(rows):
        n = int(row_len[r])
        if n <= 0:
            continue
        pos = np.arange(n)
        pages = table[row_slot[r], pos // ps]
        keys = np.repeat(k[pages, pos % ps], group, axis=1)  # [n, H, Dh]
        vals = np.repeat(v[pages, pos % ps], group, axis=1)
        s = np.einsum("hd,nhd->hn", q[r], keys) / np.sqrt(dh)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[r] = np.einsum("hn,nhd->hd", p / p.sum(axis=1, keepdims=True), vals)
    return out


def _rows(segments):
    """(slot, first position, rows) segments -> row_slot, row_len (causal: position + 1);
    slot -1 makes padding rows (length 0)."""
    slot, length = [], []
    for s, p0, n in segments:
        slot += [max(s, 0)] * n
        length += [0] * n if s < 0 else list(range(p0 + 1, p0 + n + 1))
    return np.asarray(slot, np.int32), np.asarray(length, np.int32)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size", [
    (12, 4, 64, 16),   # the bench model: GQA 3
    (4, 4, 32, 8),     # GQA 1: blocks of 48 rows
    (8, 4, 128, 16),   # GQA 2, head_dim 128
    (8, 2, 48, 4),     # GQA 4, an odd head_dim, small pages
    (12, 2, 80, 32),   # GQA 6, head_dim 80, pages of 32
    (6, 2, 64, 128),   # GQA 3, pages longer than a key block
    (3, 1, 20, 16),    # GQA 3, head_dim not a multiple of the output tile
])
def test_chunk_rows_match_numpy(num_heads, num_kv_heads, head_dim, page_size):
    # Packed like a step: a long chunk deep into its context (every row sees several 64-key
    # blocks and a partial tail), a first chunk (the causal diagonal everywhere), a chunk
    # starting mid-block at an unaligned row, padding rows, then decode rows.
    rng = np.random.default_rng(10)
    seq_lens = [301, 70, 133, 45]
    segments = [(0, 301 - 120, 120), (1, 0, 70), (-1, 0, 3), (2, 133 - 37, 37), (-1, 0, 6),
                (3, 44, 1), (0, 300, 1), (-1, 0, 1)]
    k, v, table = _paged_cache(rng, seq_lens, page_size=page_size, kv_heads=num_kv_heads,
                               head_dim=head_dim)
    row_slot, row_len = _rows(segments)
    q = rng.standard_normal((len(row_slot), num_heads, head_dim)).astype(np.float32)
    got = np.asarray(paged_attention_rows(q, k, v, row_slot=row_slot, row_len=row_len,
                                          page_table=table))
    want = _numpy_attention(q, k, v, row_slot, row_len, table)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert np.all(got[row_len == 0] == 0), "padding rows come back as zeros"


def test_chunk_rows_any_length_order():
    # Rows of one slot need not grow by one: a block with lengths shuffled, repeated and
    # decreasing (each lane masks its own keys; blocks are cut at the longest row).
    rng = np.random.default_rng(11)
    k, v, table = _paged_cache(rng, [260], page_size=16, kv_heads=2, head_dim=64)
    row_len = np.asarray([260, 1, 64, 65, 63, 128, 129, 200, 7, 7, 7, 259, 130, 2, 190, 64,
                          33, 250, 96], np.int32)
    row_slot = np.zeros_like(row_len)
    q = rng.standard_normal((len(row_len), 6, 64)).astype(np.float32)
    got = np.asarray(paged_attention_rows(q, k, v, row_slot=row_slot, row_len=row_len,
                                          page_table=table))
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, row_slot, row_len, table),
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_chunk_row_output_does_not_depend_on_its_block(dtype):
    # The same query rows computed in blocks of 16 (one run), in runs of 2..7 rows (padding
    # rows between them cut the runs), shifted so that blocks start elsewhere, and reversed:
    # every row's output is bit-identical (key blocks sit at absolute positions and each lane
    # computes exactly what it would in any other block). Rows alone (the per-row kernel): see
    # test_a_row_is_bit_identical_whatever_shares_its_step.
    rng = np.random.default_rng(12)
    n, context, heads, kv_heads, dh = 40, 230, 12, 4, 64
    k, v, table = _paged_cache(rng, [context], page_size=16, kv_heads=kv_heads, head_dim=dh)
    q = rng.standard_normal((n, heads, dh)).astype(np.float32)
    lens = np.arange(context - n + 1, context + 1, dtype=np.int32)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    kc, vc = cast(k), cast(v)

    def run(order, gaps):
        """Rows `order` of the chunk, a padding row before each position in `gaps`."""
        rows_q, rows_len, where = [], [], {}
        for i, r in enumerate(order):
            if i in gaps:
                rows_q.append(np.full((heads, dh), np.nan, np.float32))
                rows_len.append(0)
            where[r] = len(rows_q)
            rows_q.append(q[r])
            rows_len.append(lens[r])
        out = np.asarray(paged_attention_rows(
            cast(np.stack(rows_q)), kc, vc, row_slot=np.zeros(len(rows_q), np.int32),
            row_len=np.asarray(rows_len, np.int32), page_table=table)).astype(np.float32)
        return np.stack([out[where[r]] for r in range(n)])

    base = run(list(range(n)), set())
    want = _numpy_attention(np.asarray(cast(q), np.float32), np.asarray(kc, np.float32),
                            np.asarray(vc, np.float32), np.zeros(n, np.int32), lens, table)
    tol = 2e-5 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(base, want, atol=tol, rtol=tol)
    cuts = set(np.cumsum([2, 3, 4, 5, 6, 7, 2, 3, 4]).tolist())
    for order, gaps in [(list(range(n)), cuts), (list(range(n)), {5, 21}),
                        (list(range(n))[::-1], set()), (list(range(n))[::-1], {2, 4, 9, 13})]:
        np.testing.assert_array_equal(run(order, gaps), base)


def test_chunk_rows_bfloat16():
    rng = np.random.default_rng(13)
    k, v, table = _paged_cache(rng, [200, 90], page_size=8, kv_heads=2, head_dim=64)
    row_slot, row_len = _rows([(0, 200 - 77, 77), (1, 0, 90), (0, 199, 1)])
    q = rng.standard_normal((len(row_slot), 6, 64)).astype(np.float32)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    got = paged_attention_rows(bf(q), bf(k), bf(v), row_slot=row_slot, row_len=row_len,
                               page_table=table)
    assert got.dtype == jnp.bfloat16
    f32 = lambda x: np.asarray(bf(x), np.float32)  # noqa: E731
    want = _numpy_attention(f32(q), f32(k), f32(v), row_slot, row_len, table)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2)


def test_chunk_rows_stop_at_a_corrupt_page_table():
    # A page index outside the cache: the kernel reads nothing there (and nothing after it),
    # whatever the row lengths claim, and stays finite.
    rng = np.random.default_rng(14)
    k, v, table = _paged_cache(rng, [160], page_size=16, kv_heads=1, head_dim=32)
    table[0, 5] = 10_000
    row_slot, row_len = _rows([(0, 160 - 32, 32)])
    q = rng.standard_normal((32, 2, 32)).astype(np.float32)
    got = np.asarray(paged_attention_rows(q, k, v, row_slot=row_slot, row_len=row_len,
                                          page_table=table))
    assert np.all(np.isfinite(got))


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size", [
    (12, 4, 64, 16),   # the bench model: GQA 3 (decode rows: the vector kernel)
    (4, 2, 8, 4),      # the tiny test model: head_dim 8 (decode rows: the scalar kernel)
    (4, 4, 64, 16),    # MHA
    (8, 2, 128, 8),    # GQA 4, head_dim 128
    (6, 2, 48, 32),    # head_dim without a fast path, pages of 32
    (16, 1, 32, 128),  # MQA: a group of 16 (blocks of 24 rows), pages past a key block
])
def test_a_row_is_bit_identical_whatever_shares_its_step(dtype, num_heads, num_kv_heads,
                                                         head_dim, page_size):
    # One row (the query of position p - 1 seeing p keys) computed alone (a decode row, or a
    # prompt's last token alone in its step), at the end of runs of 2..17 rows of its
    # sequence (one block, or a block then a remainder), at other row offsets, after another
    # sequence's chunk: every output is bit-identical, for chunk rows and decode rows alike.
    rng = np.random.default_rng(15)
    contexts = [1, 2, 15, 16, 17, 63, 64, 65, 130, 333]
    k, v, table = _paged_cache(rng, contexts + [90], page_size=page_size,
                               kv_heads=num_kv_heads, head_dim=head_dim)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    kc, vc = cast(k), cast(v)
    q = cast(rng.standard_normal((len(contexts), 40, num_heads, head_dim)).astype(np.float32))
    other = len(contexts)

    def run(segments):
        """segments: (slot, rows ending at its last position, padding rows before) -> the
        output of each segment's last row."""
        slot, length, qs, last = [], [], [], []
        for s, n, pad in segments:
            slot += [0] * pad
            length += [0] * pad
            qs += [jnp.zeros((pad, num_heads, head_dim), dtype)]
            p = contexts[s] if s < other else 90
            n = min(n, p)
            slot += [s] * n
            length += list(range(p - n + 1, p + 1))
            qs += [q[s % other, 40 - n:] if s < other else q[0, :n]]
            last.append(len(slot) - 1)
        out = paged_attention_rows(jnp.concatenate(qs), kc, vc,
                                   row_slot=np.asarray(slot, np.int32),
                                   row_len=np.asarray(length, np.int32), page_table=table)
        return np.asarray(out.astype(jnp.float32))[last]

    alone = run([(s, 1, 0) for s in range(other)])
    want = _numpy_attention(np.asarray(cast(q[:, -1:]), np.float32)[:, 0],
                            np.asarray(kc, np.float32), np.asarray(vc, np.float32),
                            np.arange(other), np.asarray(contexts), table)
    tol = 2e-5 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(alone, want, atol=tol, rtol=tol)
    for n in range(1, 18):
        for pad in (0, 1, 3):
            got = run([(other, 5 + n, pad)] + [(s, n, pad) for s in range(other)])[1:]
            np.testing.assert_array_equal(got, alone, err_msg=f"run of {n}, pad {pad}")
