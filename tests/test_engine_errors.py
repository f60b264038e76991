"""Errors a user can cause name the bad value."""

from __future__ import annotations

import pytest

from engine_helpers import TINY, tiny_params
from jaxserve import LLM, SamplingParams
from jaxserve.config import EngineConfig


@pytest.fixture(scope="module")
def llm():
    return LLM.from_params(TINY, tiny_params(), chunk_size=8,
                           max_decode_slots=2, page_size=8, max_model_len=32, max_logprobs=3)


@pytest.mark.parametrize("prompt_ids, match", [
    ([], "prompt is empty"),
    (list(range(32)), "prompt of 32 tokens .* max_model_len=32"),
    ([1, 2, 97], "token id 97 is outside the vocabulary"),
    ([-1], "token id -1 is outside"),
])
def test_bad_prompts(llm, prompt_ids, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompt_token_ids=[[1, 2], prompt_ids], use_tqdm=False)
    assert not llm.engine.has_unfinished()  # all or nothing: the good prompt was withdrawn


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(max_tokens=0), "max_tokens=0"),
    (dict(min_p=2.0), "min_p=2.0"),
    (dict(seed=-3), "seed=-3"),
    (dict(stop=[""]), "empty string"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_too_many_logprobs_and_stop_without_tokenizer(llm):
    with pytest.raises(ValueError, match="logprobs=4 exceeds the engine's max_logprobs=3"):
        llm.generate(prompt_token_ids=[1, 2], sampling_params=SamplingParams(logprobs=4),
                     use_tqdm=False)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        llm.generate(prompt_token_ids=[1, 2], sampling_params=SamplingParams(stop="x"),
                     use_tqdm=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello", use_tqdm=False)


@pytest.mark.parametrize("options, match", [
    (dict(chunk_size=8, page_size=8, max_model_len=64, num_pages=8), "num_pages=8 is too small"),
    (dict(chunk_size=8, max_model_len=128), "max_model_len=128 exceeds the model's max_position_embeddings"),
    (dict(chunk_size=100, max_model_len=64), "chunk_size=100 must be a multiple of chunk_align=8"),
    (dict(dtype="float16"), "dtype='float16'"),
    (dict(attention="cuda"), "attention='cuda'"),
    (dict(max_decode_slots=0), "max_decode_slots=0"),
    (dict(chunk_sz=8), r"unknown engine option\(s\) \['chunk_sz'\]"),
    (dict(chunk_size=8, dtype="bfloat16"), "params are float32 but the engine was asked for dtype='bfloat16'"),
])
def test_bad_engine_options(options, match):
    with pytest.raises(ValueError, match=match):
        LLM.from_params(TINY, tiny_params(), **options)


def test_engine_config_resolve_fills_automatic_fields():
    cfg = EngineConfig(chunk_size=16, page_size=16, max_decode_slots=4).resolve(TINY)
    assert cfg.max_model_len == 64 and cfg.num_pages == 1 + 4 * 4
