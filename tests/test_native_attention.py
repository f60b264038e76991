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
