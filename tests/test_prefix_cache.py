"""Prefix caching end to end: shared prefixes give the dense reference's tokens and the cache-off
engine's, hits are counted, prompt logprobs stay exact, preemption composes, nothing compiles.

(The scheduler's property tests of the cache itself are in test_scheduler.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

from engine_helpers import TINY, dense_greedy, dense_logprobs, tiny_params
from jaxserve import LLM, SamplingParams

OPTIONS = dict(chunk_size=16, max_chunk_seqs=3, chunk_align=2, max_decode_slots=3, page_size=4,
               max_model_len=64, max_logprobs=3)
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1)


def make(**kw) -> LLM:
    return LLM.from_params(TINY, tiny_params(), strict_compiles=True, **{**OPTIONS, **kw})


@pytest.fixture(scope="module")
def on():
    return make()


@pytest.fixture(scope="module")
def off():
    return make(enable_prefix_caching=False)


def shared_prefix_prompts(seed: int, n: int, prefix_len: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, TINY.vocab_size, size=prefix_len).tolist()
    return [prefix + rng.integers(0, TINY.vocab_size, size=int(k)).tolist()
            for k in rng.integers(0, 9, size=n)]


def generate(llm: LLM, prompts, sp=GREEDY):
    return llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)


def hit_tokens(llm: LLM) -> int:
    return llm.stats["prefix_cache_hit_tokens"]


def test_shared_prefix_matches_dense_reference_and_cache_off(on, off):
    prompts = shared_prefix_prompts(0, 8, 37)
    before = hit_tokens(on)
    first = generate(on, prompts[:1])  # puts the prefix in the cache
    outs = first + generate(on, prompts[1:])
    assert hit_tokens(on) - before >= 7 * 36, "every later request reuses the 36-token prefix"
    ref = generate(off, prompts)
    for prompt, out, r in zip(prompts, outs, ref):
        assert out.token_ids == r.token_ids == dense_greedy(TINY, tiny_params(), prompt, 6)
        # Item 2 of issue 12 (bit identity) is not promised here: within float noise.
        for a, b in zip(out.logprobs, r.logprobs):
            assert a.keys() == b.keys()
            np.testing.assert_allclose(list(a.values()), list(b.values()), atol=1e-5)
    assert off.stats["prefix_cache_hit_tokens"] == 0 and off.stats["cached_pages"] == 0
    stats = on.stats
    assert 0 < stats["prefix_cache_hit_rate"] <= 1 and stats["cached_pages"] > 0
    assert stats["compiles_after_warmup"] == 0


def test_a_second_identical_request_hits(on):
    prompt = np.random.default_rng(1).integers(0, TINY.vocab_size, size=31).tolist()
    a = generate(on, [prompt])[0]
    before = hit_tokens(on)
    b = generate(on, [prompt])[0]
    assert hit_tokens(on) - before == 28  # 7 full pages before the last token
    assert a.token_ids == b.token_ids == dense_greedy(TINY, tiny_params(), prompt, 6)
    # A prompt of whole pages recomputes its last page (its last token's logits are needed);
    # one that continues a generated sequence reuses the generated tokens' pages too.
    whole = prompt[:28]
    generate(on, [whole])
    before = hit_tokens(on)
    assert generate(on, [whole])[0].token_ids == dense_greedy(TINY, tiny_params(), whole, 6)
    assert hit_tokens(on) - before == 24
    longer = prompt + a.token_ids[:5]  # 36 tokens, all computed by `a`: 8 pages before the last
    before = hit_tokens(on)
    assert generate(on, [longer])[0].token_ids == dense_greedy(TINY, tiny_params(), longer, 6)
    assert hit_tokens(on) - before == 32


def test_prompt_logprobs_are_exact_with_caching_on(on):
    prompt = shared_prefix_prompts(2, 1, 33)[0]
    generate(on, [prompt])  # cached now
    before = hit_tokens(on)
    sp = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2)
    out = generate(on, [prompt], sp)[0]
    assert hit_tokens(on) == before, "a prompt-logprobs request computes its whole prompt"
    ref = dense_logprobs(TINY, tiny_params(), prompt)
    plp = out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    for i in range(1, len(prompt)):
        entry = plp[i]
        assert prompt[i] in entry and len(entry) >= 2
        for tok, lp in entry.items():
            assert abs(lp - ref[i - 1, tok]) < 1e-4, (i, tok)
    # Its pages are cached for others all the same.
    generate(on, [prompt])
    assert hit_tokens(on) > before


def test_prompt_logprobs_start_takes_the_context_from_the_cache(on, off):
    """Asking prompt logprobs from position `start` on lets the prompt before `start - 1` come
    from the cache, and the entries are the same to the bit as when it is computed."""
    prompt = shared_prefix_prompts(5, 1, 30)[0] + [7, 8, 9, 10, 11]
    start = 31
    sp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2,
                        prompt_logprobs_start=start)
    generate(on, [prompt[:28]])  # caches 7 pages (28 tokens)
    before = hit_tokens(on)
    got = generate(on, [prompt], sp)[0].prompt_logprobs
    # Position 31's logprob comes from row 30, so up to 30 tokens may be cached: 7 full pages.
    assert hit_tokens(on) - before == 28
    want = generate(off, [prompt], sp)[0].prompt_logprobs
    assert got[:start] == [None] * start
    assert got == want  # exact: from the cache or computed, the same arithmetic per row
    ref = dense_logprobs(TINY, tiny_params(), prompt)
    for i in range(start, len(prompt)):
        for tok, lp in got[i].items():
            assert abs(lp - ref[i - 1, tok]) < 1e-4, (i, tok)
    # The whole prompt's logprobs agree with the partial ones where both exist.
    full = generate(off, [prompt], SamplingParams(max_tokens=1, temperature=0,
                                                  prompt_logprobs=2))[0].prompt_logprobs
    assert full[start:] == got[start:]


def test_prompt_logprobs_start_past_the_prompt_is_refused(on):
    sp = SamplingParams(max_tokens=1, prompt_logprobs=1, prompt_logprobs_start=3)
    with pytest.raises(ValueError, match=r"prompt_logprobs_start=3 is past the prompt's last "
                                         r"position 2"):
        on.engine.add_request("r", [1, 2, 3], sp)
    with pytest.raises(ValueError, match=r"prompt_logprobs_start=-1 must be an integer >= 0"):
        SamplingParams(prompt_logprobs_start=-1)


def test_preemption_with_caching_on_gives_correct_outputs():
    tight = make(num_pages=17)  # 16 pages of 4: two 40-token sequences do not fit
    rng = np.random.default_rng(3)
    own = [rng.integers(0, TINY.vocab_size, size=int(n)).tolist() for n in (45, 38, 50)]
    shared = shared_prefix_prompts(3, 6, 40)
    prompts = [shared[0], own[0], shared[1], shared[2], own[1], shared[3], own[2]] + shared[4:]
    outs = generate(tight, prompts)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == dense_greedy(TINY, tiny_params(), prompt, 6)
    stats = tight.stats
    assert stats["preemptions"] > 0, "the workload was meant to force preemption"
    assert stats["prefix_cache_hit_tokens"] > 0
    assert stats["compiles_after_warmup"] == 0
    eng = tight.engine
    assert not eng.has_unfinished()
    assert eng.scheduler.allocator.num_free == eng.cfg.num_pages - 1
    assert not any(eng.scheduler.allocator.refcount)


def test_abort_releases_shared_pages(on):
    eng = on.engine
    prompts = shared_prefix_prompts(4, 3, 24)
    generate(on, prompts[:1])
    for i, p in enumerate(prompts):
        eng.add_request(f"abort-{i}", p, GREEDY)
    eng.step()
    eng.step()
    for i in range(len(prompts)):
        eng.abort(f"abort-{i}")
    while eng.has_unfinished():
        eng.step()
    assert eng.scheduler.allocator.num_free == eng.cfg.num_pages - 1
    assert not any(eng.scheduler.allocator.refcount)


def test_flag_and_config():
    from absl import flags

    from jaxserve.cli import flags as jflags
    from jaxserve.config import EngineConfig
    from test_launch_scripts import define_into

    assert EngineConfig().enable_prefix_caching is True
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig(enable_prefix_caching="yes")
    fv = flags.FlagValues()
    define_into(fv, jflags.define_engine_flags)
    fv(["prog"])
    assert jflags.engine_options(fv)["enable_prefix_caching"] is True
    fv(["prog", "--noenable_prefix_caching"])
    assert jflags.engine_options(fv)["enable_prefix_caching"] is False


def test_xla_reference_attention_reads_cached_pages():
    # The reference path (meshes, platforms without a kernel) gathers pages by the page table too.
    xla = make(attention="xla")
    prompts = shared_prefix_prompts(5, 4, 29)
    outs = generate(xla, prompts[:1]) + generate(xla, prompts[1:])
    assert xla.stats["prefix_cache_hit_tokens"] >= 3 * 28
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == dense_greedy(TINY, tiny_params(), prompt, 6)
    assert xla.stats["compiles_after_warmup"] == 0
