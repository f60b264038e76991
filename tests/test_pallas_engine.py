"""The engine end to end through each Pallas kernel in interpret mode, against the dense
reference (greedy tokens, prompt logprobs). Interpret mode is slow, so: a tiny model, a few
prompts chosen to hit page (4) and chunk (8) boundaries, and a single token prompt."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from engine_helpers import TINY, dense_greedy, dense_logprobs, tiny_params
from jaxserve import LLM, SamplingParams
from jaxserve.attention import AttentionShape, attention_fn
from pallas_kernels.testing import make_step_case

CONFIG = dict(chunk_size=16, max_chunk_seqs=3, chunk_align=2, chunk_buckets=1,
              decode_buckets=1, max_decode_slots=3, page_size=4, num_pages=40,
              max_model_len=64)
PROMPT_LENS = [1, 4, 8, 13, 19]


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(0, TINY.vocab_size, size=n).tolist() for n in PROMPT_LENS]


def _warm_tpu_interpreter():
    """TPU interpret mode evaluates the kernel on the host at run time and compiles a few tiny
    helpers (grid arithmetic) the first time any kernel is interpreted in a process; on a TPU
    none of that exists. Run one small kernel first so the engine's compile guard counts only
    the engine's own compiles."""
    case = make_step_case(np.random.default_rng(0), chunks=[(2, 3)], chunk_len=4, decodes=[2],
                          page_size=4, pages_per_seq=2, num_heads=2, num_kv_heads=1, head_dim=8)
    fn = attention_fn("pallas_tpu", AttentionShape(case.chunk_tokens, case.max_chunk_seqs, 1, 4, 2),
                      interpret=True)
    jax.block_until_ready(jax.jit(fn)(case.q, case.k_pages, case.v_pages, **case.kwargs()))


@pytest.fixture(scope="module", params=["pallas_tpu", "pallas_gpu"])
def llm(request):
    if request.param == "pallas_tpu":
        _warm_tpu_interpreter()
    return LLM.from_params(TINY, tiny_params(), strict_compiles=True, max_logprobs=5,
                           attention=request.param, pallas_interpret=True, **CONFIG)


def test_greedy_and_prompt_logprobs_match_dense_reference(llm, prompts):
    assert llm.stats["attention_backend"] in ("pallas_tpu", "pallas_gpu")
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=3)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == dense_greedy(TINY, tiny_params(), prompt, 4), len(prompt)
        ref = dense_logprobs(TINY, tiny_params(), prompt)
        plp = out.prompt_logprobs
        assert len(plp) == len(prompt) and plp[0] is None
        for i in range(1, len(prompt)):
            for t in {prompt[i], *np.argsort(-ref[i - 1])[:3].tolist()}:
                assert abs(plp[i][t] - ref[i - 1, t]) <= 1e-4, (len(prompt), i, t)
    stats = llm.stats
    assert stats["compiles_after_warmup"] == 0
    assert stats["executables_compiled"] == 3  # mixed (16 + 3 rows; 18 + 0), decode-only
