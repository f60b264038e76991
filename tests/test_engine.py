"""The engine end to end against the dense reference: chunks, queueing, preemption, logprobs."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from engine_helpers import TINY, char_tokenizer, dense_greedy, dense_logprobs, tiny_params
from jaxserve import LLM, SamplingParams

# A small packed budget (16 rows, up to 3 sequences, odd-length chunks aligned to 2 rows), few
# decode slots (requests queue) and few pages (preemption happens).
TIGHT = dict(chunk_size=16, max_chunk_seqs=3, chunk_align=2, max_decode_slots=3, page_size=4,
             num_pages=24, max_model_len=64)


@pytest.fixture(scope="module", params=[("cpu", None), ("cpu", False), ("xla", True)],
                ids=["cpu", "cpu-sync", "xla-async"])
def llm(request):
    # cpu: the CPU default (decode rows through the native kernel); xla: the reference path
    # that meshes and platforms without a kernel use. async_scheduling: True, step N+1 is
    # launched before step N is read back, its decodes taking step N's tokens on the device
    # (prev_index); False, each step is read back at once; None (default), pipelined in
    # LLM.generate (offline), not when the engine is stepped directly.
    attention, async_scheduling = request.param
    return LLM.from_params(TINY, tiny_params(), strict_compiles=True, max_logprobs=5,
                           attention=attention, async_scheduling=async_scheduling, **TIGHT)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    lengths = [1, 2, 3, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 33, 40, 47] + list(
        rng.integers(1, 48, size=16))
    return [rng.integers(0, TINY.vocab_size, size=int(n)).tolist() for n in lengths]


def test_greedy_matches_dense_reference_with_queueing_and_preemption(llm, prompts):
    before = llm.stats["preemptions"]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
    assert len(outs) == len(prompts) >= 30
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt
        assert out.token_ids == dense_greedy(TINY, tiny_params(), prompt, 6), len(prompt)
        assert out.finish_reason == "length"
    stats = llm.stats
    assert stats["preemptions"] > before, "the workload was meant to force preemption"
    assert stats["compiles_after_warmup"] == 0
    # Chunk regions of 4, 8, 12 and 16 rows (chunk_buckets=4) and of 18 with no decode rows
    # (chunk_rows_beside(0)), decode steps of 2 and 3.
    assert stats["executables_compiled"] == 7
    assert 0 < stats["useful_token_fraction"] <= 1


def test_prompt_logprobs_match_dense_log_softmax(llm, prompts):
    sp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3, logprobs=2)
    outs = llm.generate(prompt_token_ids=prompts[:12], sampling_params=sp, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ref = dense_logprobs(TINY, tiny_params(), prompt)
        plp = out.prompt_logprobs
        assert len(plp) == len(prompt) and plp[0] is None
        for i in range(1, len(prompt)):
            assert abs(plp[i][prompt[i]] - ref[i - 1, prompt[i]]) <= 1e-4
            top3 = np.argsort(-ref[i - 1])[:3]
            for t in top3:
                assert abs(plp[i][int(t)] - ref[i - 1, t]) <= 1e-4
        (entry,) = out.logprobs
        tok = out.token_ids[0]
        assert abs(entry[tok] - ref[-1, tok]) <= 1e-4
        assert len(entry) in (2, 3)  # top-2 plus the sampled token if it is not among them


def test_seeded_sampling_is_independent_of_the_batch(llm, prompts):
    target = prompts[5]
    sp = SamplingParams(max_tokens=8, temperature=0.9, top_k=20, top_p=0.95, min_p=0.01,
                        seed=1234, ignore_eos=True)
    alone = llm.generate(prompt_token_ids=[target], sampling_params=sp, use_tqdm=False)[0]
    others = [SamplingParams(max_tokens=5, temperature=1.0, seed=i, ignore_eos=True)
              for i in range(7)]
    for order in (0, 1):
        batch = prompts[10:17]
        params = list(others)
        batch.insert(3 + order, target)
        params.insert(3 + order, sp)
        if order:
            batch, params = batch[::-1], params[::-1]
        outs = llm.generate(prompt_token_ids=batch, sampling_params=params, use_tqdm=False)
        got = [o for o, p in zip(outs, params) if p is sp][0]
        assert got.token_ids == alone.token_ids
    other_seed = dataclasses.replace(sp, seed=99)
    diff = llm.generate(prompt_token_ids=[target], sampling_params=other_seed, use_tqdm=False)
    assert diff[0].token_ids != alone.token_ids


def test_stop_token_ids_eos_and_max_tokens(llm, prompts):
    prompt = prompts[3]
    ref = dense_greedy(TINY, tiny_params(), prompt, 8)
    stop_at = ref[3]
    first = ref.index(stop_at)
    out = llm.generate(prompt_token_ids=[prompt], use_tqdm=False, sampling_params=SamplingParams(
        max_tokens=8, temperature=0, stop_token_ids=[stop_at], ignore_eos=True))[0]
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop"
    out = llm.generate(prompt_token_ids=[prompt], use_tqdm=False, sampling_params=SamplingParams(
        max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == ref[:3] and out.finish_reason == "length"


def test_eos_stops_unless_ignored():
    params = tiny_params()
    prompt = [5, 6, 7, 8, 9]
    ref = dense_greedy(TINY, params, prompt, 6)
    cfg = dataclasses.replace(TINY, eos_token_ids=(ref[2],))
    llm = LLM.from_params(cfg, params, **TIGHT)
    first = ref.index(ref[2])
    out = llm.generate(prompt_token_ids=[prompt], use_tqdm=False,
                       sampling_params=SamplingParams(max_tokens=6, temperature=0))[0]
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop"
    out = llm.generate(prompt_token_ids=[prompt], use_tqdm=False, sampling_params=SamplingParams(
        max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == ref and out.finish_reason == "length"
    # max_model_len caps prompt + output: a 60-token prompt has room for 4 tokens of 64.
    long_prompt = list(range(10, 70))
    out = llm.generate(prompt_token_ids=[long_prompt], use_tqdm=False,
                       sampling_params=SamplingParams(max_tokens=20, temperature=0,
                                                      ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    assert out.token_ids == dense_greedy(cfg, params, long_prompt, 4)
    # Stop strings need text: a tokenizer whose every token is one character.
    llm.engine.tokenizer = char_tokenizer()
    text = llm.engine.tokenizer.decode(ref)
    assert len(text) == len(ref)
    stop = text[2:4]
    out = llm.generate(prompt_token_ids=[prompt], use_tqdm=False, sampling_params=SamplingParams(
        max_tokens=6, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]
    assert out.token_ids == ref[: text.index(stop) + 2]


def test_no_compiles_after_warmup_on_a_varied_workload(llm):
    rnd = random.Random(1)
    prompts = [[rnd.randrange(TINY.vocab_size) for _ in range(rnd.randint(1, 50))]
               for _ in range(12)]
    params = [SamplingParams(max_tokens=rnd.randint(1, 10), temperature=rnd.choice([0, 0.7]),
                             top_k=rnd.choice([0, 5]), logprobs=rnd.choice([None, 2]),
                             prompt_logprobs=rnd.choice([None, 1]), ignore_eos=True)
              for _ in prompts]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert all(o.finished for o in outs)
    assert llm.stats["compiles_after_warmup"] == 0
    assert llm.stats["executables_compiled"] == 7


def test_engine_level_api_streams_tokens(llm):
    eng = llm.engine
    eng.add_request("a", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    eng.add_request("b", list(range(20)), SamplingParams(max_tokens=2, temperature=0,
                                                         ignore_eos=True))
    seen: dict[str, list[int]] = {"a": [], "b": []}
    finished = []
    while eng.has_unfinished():
        for out in eng.step():
            assert out.token_ids[: len(seen[out.request_id])] == seen[out.request_id]
            seen[out.request_id] = out.token_ids
            if out.finished:
                finished.append(out.request_id)
    assert sorted(finished) == ["a", "b"]
    assert len(seen["a"]) == 4 and len(seen["b"]) == 2
    m = out.metrics
    assert m.arrival_time <= m.first_token_time <= m.finished_time
    assert len(m.token_times) == len(out.token_ids)


def test_a_request_added_between_steps_joins_the_next_step(llm):
    """Without async scheduling a step is read back in the call that launched it, so a request
    added between two calls has its first token from the very next call; with it, step N+1 is
    already launched when the request arrives, and its first token comes one call later."""
    eng = llm.engine
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    eng.add_request("running", [1, 2, 3], sp)
    while not any(o.request_id == "running" for o in eng.step()):
        pass  # until the running request has its first token
    eng.step()
    eng.add_request("late", [4, 5, 6], sp)
    calls = 1
    while not any(o.request_id == "late" for o in eng.step()):
        calls += 1
    assert calls == (2 if eng.cfg.async_scheduling else 1)
    assert eng.pipelines(offline=True) == (eng.cfg.async_scheduling is not False)
    while eng.has_unfinished():
        eng.step()


def test_grouped_decode_buckets_match_dense_reference():
    # 8 decode slots: the reference attention buckets them in 2 groups of 4 (longest contexts
    # first), so a long sequence and short ones decode in the same step with different buckets.
    llm = LLM.from_params(TINY, tiny_params(), strict_compiles=True, chunk_size=8,
                          max_decode_slots=8, page_size=4, max_model_len=64, attention="xla")
    assert llm.engine.runner.mixed_shape.decode_groups == 2
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, TINY.vocab_size, size=n).tolist()
               for n in (55, 2, 3, 1, 40, 5, 9, 4, 30, 6)]
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == dense_greedy(TINY, tiny_params(), prompt, 5), len(prompt)
    # The reference attention keeps XLA's greedy tokens (the native kernel comes with `cpu`).
    for exe, _ in llm.engine.runner.executables.all():
        assert "jaxserve_greedy" not in exe.as_text()


def test_outputs_are_snapshots_and_the_step_log_is_bounded(llm):
    from jaxserve.engine import STEP_LOG_LEN

    eng = llm.engine
    assert eng.step_log.maxlen == STEP_LOG_LEN  # a long-running engine keeps only the recent
    eng.add_request("snap", [5, 6, 7, 8, 9], SamplingParams(
        max_tokens=5, temperature=0, ignore_eos=True, logprobs=1, prompt_logprobs=1))
    first = None
    while eng.has_unfinished():
        for out in eng.step():
            if first is None:
                first = out
                frozen = (list(out.token_ids), list(out.logprobs), list(out.prompt_logprobs),
                          list(out.metrics.token_times), list(out.prompt_token_ids))
    # The engine ran on (four more tokens): the first snapshot did not change under the caller.
    assert (first.token_ids, first.logprobs, first.prompt_logprobs, first.metrics.token_times,
            first.prompt_token_ids) == frozen
    assert len(first.token_ids) == 1 and len(out.token_ids) == 5
