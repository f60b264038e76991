"""Packed steps: several sequences' chunks share the chunk region, through every layer.

The `cpu` backend (native kernel) against the dense per-row oracle on packed layouts, and the
engine end to end: short prompts that arrive together take one step, a long prompt shares its
step with the next one's head, and outputs equal the dense reference's.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from engine_helpers import TINY, dense_greedy, dense_logprobs, tiny_params
from jaxserve import LLM, SamplingParams
from jaxserve.attention import AttentionShape, attention_fn
from pallas_kernels.testing import make_step_case, ragged_oracle


def _oracle(shape):
    return ragged_oracle(shape.chunk_tokens, shape.max_chunk_seqs, shape.num_decode_slots)


@pytest.mark.parametrize("chunk_align", [1, 8])
@pytest.mark.parametrize("backend", ["cpu", "xla"])
def test_packed_step_matches_the_dense_oracle(backend, chunk_align):
    # Many short segments (1-token ones included), one spanning row 16 and row 32 (where fixed
    # 16-row slots would have ended), an unused chunk sequence and an empty tail.
    ps = 4
    chunks = [(1, 1), (3, 9), (20, 20), (1, 13), (0, 0), (2, 2), (13, 40), (1, 2)]
    case = make_step_case(np.random.default_rng(chunk_align), chunks=chunks,
                          decodes=[5, 0, 40, 1], page_size=ps, pages_per_seq=10, num_heads=6,
                          num_kv_heads=2, head_dim=16, chunk_align=chunk_align,
                          chunk_tokens=96)
    shape = AttentionShape(case.chunk_tokens, case.max_chunk_seqs, 4, ps, 10, chunk_align)
    args = (case.q, case.k_pages, case.v_pages)
    run = lambda fn: np.asarray(jax.jit(lambda a, kw: fn(*a, **kw))(args, case.kwargs()))  # noqa
    got, want = run(attention_fn(backend, shape)), run(_oracle(shape))
    live = case.live_rows
    assert live.sum() == sum(n for n, _ in chunks) + 3
    np.testing.assert_allclose(got[live], want[live], atol=2e-5, rtol=1e-5)
    if backend == "cpu":
        assert np.all(got[~live] == 0), "padding rows come back as zeros"


@functools.lru_cache(maxsize=None)
def _llm(**opts):
    return LLM.from_params(TINY, tiny_params(), strict_compiles=True, max_logprobs=3, **opts)


def test_short_prompts_arriving_together_take_one_step():
    llm = _llm(chunk_size=64, max_chunk_seqs=8, chunk_align=4, max_decode_slots=8, page_size=4,
               max_model_len=64)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, TINY.vocab_size, size=n).tolist() for n in (5, 7, 1, 6, 8, 3, 2, 4)]
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=1)
    first = len(llm.engine.step_log)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
    log = list(llm.engine.step_log)[first:]
    # The 1-token prompt is a decode (its one token is all there is to compute); the other
    # seven share the chunk region.
    assert log[0].kind == "mixed" and (log[0].num_chunks, log[0].num_decodes) == (7, 1), log[0]
    assert [r.kind for r in log[1:]] == ["decode", "decode"]  # then every sequence decodes
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == dense_greedy(TINY, tiny_params(), prompt, 3)
        ref = dense_logprobs(TINY, tiny_params(), prompt)
        for i in range(1, len(prompt)):
            assert abs(out.prompt_logprobs[i][prompt[i]] - ref[i - 1, prompt[i]]) <= 1e-4
    assert llm.stats["compiles_after_warmup"] == 0


def test_a_long_prompt_takes_the_budget_then_shares_it():
    # A 45-token prompt in a 16-token budget with 3 decode rows (18 rows while no decode
    # shares the step, aligned to 2) takes two whole steps of 18, then its last 9 tokens share
    # the third with the next prompt's first 8 (rows 0-8 and 10-17); in the fourth both are
    # decodes (the second's last prompt token is computed as one).
    llm = _llm(chunk_size=16, max_chunk_seqs=3, chunk_align=2, max_decode_slots=3, page_size=4,
               max_model_len=64)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, TINY.vocab_size, size=n).tolist() for n in (45, 9)]
    first = len(llm.engine.step_log)
    stats0 = llm.stats
    outs = llm.generate(prompt_token_ids=prompts, use_tqdm=False,
                        sampling_params=SamplingParams(max_tokens=4, temperature=0,
                                                       ignore_eos=True))
    log = list(llm.engine.step_log)[first:]
    assert [(r.num_chunks, r.scheduled_tokens) for r in log[:4]] == [
        (1, 18), (1, 18), (2, 17), (0, 2)]
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == dense_greedy(TINY, tiny_params(), prompt, 4)
    stats = llm.stats
    mixed_rows = stats["mixed_slot_tokens"] - stats0["mixed_slot_tokens"]
    mixed_used = stats["mixed_scheduled_tokens"] - stats0["mixed_scheduled_tokens"]
    assert 0 < mixed_used <= mixed_rows


def test_light_steps_run_in_the_smallest_compiled_shape():
    # Buckets: chunk regions of 4, 8, 12 and 16 rows (each with the 3 decode rows) and
    # decode-only steps of 2 and 3 rows. A 3-token prompt alone runs in the 4-row region, then
    # decodes in the 2-row step; outputs equal the dense reference's whatever shape ran them.
    llm = _llm(chunk_size=16, max_chunk_seqs=3, chunk_align=2, max_decode_slots=3, page_size=4,
               max_model_len=64)
    assert llm.engine.cfg.chunk_bucket_sizes == (4, 8, 12, 16)
    assert llm.engine.cfg.decode_bucket_sizes == (2, 3)
    assert llm.stats["executables_compiled"] == 7  # + 18 chunk rows with no decode rows
    rng = np.random.default_rng(9)
    prompt = rng.integers(0, TINY.vocab_size, size=3).tolist()
    first = len(llm.engine.step_log)
    out = llm.generate(prompt_token_ids=[prompt], use_tqdm=False, sampling_params=SamplingParams(
        max_tokens=3, temperature=0, ignore_eos=True))[0]
    log = list(llm.engine.step_log)[first:]
    assert [(r.kind, r.rows) for r in log] == [("mixed", 4 + 3), ("decode", 2), ("decode", 2)]
    assert out.token_ids == dense_greedy(TINY, tiny_params(), prompt, 3)
    # Four prompts of 9 tokens: two share the 18-row step with no decode rows; every step in
    # one of the compiled shapes.
    prompts = [rng.integers(0, TINY.vocab_size, size=9).tolist() for _ in range(4)]
    first = len(llm.engine.step_log)
    outs = llm.generate(prompt_token_ids=prompts, use_tqdm=False, sampling_params=SamplingParams(
        max_tokens=2, temperature=0, ignore_eos=True))
    rows = {r.rows for r in list(llm.engine.step_log)[first:]}
    assert 18 in rows and rows <= {2, 3, 4 + 3, 8 + 3, 12 + 3, 16 + 3, 18}
    for p, o in zip(prompts, outs):
        assert o.token_ids == dense_greedy(TINY, tiny_params(), p, 2)
    # A 40-token prompt alone takes the decode rows too: 18 + 18 chunk rows in the step with
    # no decode rows, then 4; its prompt logprobs and tokens as the dense reference's.
    prompt = rng.integers(0, TINY.vocab_size, size=40).tolist()
    first = len(llm.engine.step_log)
    out = llm.generate(prompt_token_ids=[prompt], use_tqdm=False, sampling_params=SamplingParams(
        max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=1))[0]
    log = list(llm.engine.step_log)[first:]
    assert [(r.kind, r.rows) for r in log] == [("mixed", 18), ("mixed", 18), ("mixed", 4 + 3),
                                              ("decode", 2)]
    assert out.token_ids == dense_greedy(TINY, tiny_params(), prompt, 2)
    ref = dense_logprobs(TINY, tiny_params(), prompt)
    got = [out.prompt_logprobs[i][prompt[i]] for i in range(1, len(prompt))]
    np.testing.assert_allclose(got, [ref[i - 1, prompt[i]] for i in range(1, len(prompt))],
                               atol=1e-4)
    assert llm.stats["compiles_after_warmup"] == 0


def test_steps_name_the_rows_they_use():
    # Every batch's live_rows is (0, end of the last chunk, B, B + decodes): the native
    # kernel computes those rows only. Steps here leave chunk rows and decode rows idle (72-row
    # steps: 64 chunk rows + 8 decode slots, more than the kernel's 64-row skinny path), and
    # the tokens still equal the dense reference's.
    llm = _llm(chunk_size=64, max_chunk_seqs=8, chunk_align=4, max_decode_slots=8, page_size=4,
               max_model_len=64)
    seen = []
    run = llm.engine.runner.run

    def spy(exe, batch):
        seen.append(batch)
        return run(exe, batch)
    llm.engine.runner.run = spy
    try:
        rng = np.random.default_rng(11)
        prompts = [rng.integers(0, TINY.vocab_size, size=n).tolist() for n in (58, 5, 13)]
        outs = llm.generate(prompt_token_ids=prompts, use_tqdm=False, sampling_params=(
            SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)))
    finally:
        llm.engine.runner.run = run
    partial = 0
    for batch in seen:
        t, b = len(batch.token_ids), len(batch.prompt_targets)
        sc = len(batch.q_starts) - (t - b)
        ends = batch.q_starts[:sc] + batch.q_lens[:sc]
        chunk_end = int(ends[batch.q_lens[:sc] > 0].max(initial=0))
        decodes = int((batch.q_lens[sc:] > 0).sum())
        assert list(batch.live_rows) == [0, chunk_end, b, b + decodes]
        partial += 0 < chunk_end < b
    assert partial, "some step left chunk rows idle"
    # With the native attention, every step's greedy tokens come from the native kernel too.
    for exe, _ in llm.engine.runner.executables.all():
        assert "jaxserve_greedy" in exe.as_text()
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == dense_greedy(TINY, tiny_params(), prompt, 3)
