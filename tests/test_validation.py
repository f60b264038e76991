"""The validation layer at the boundary: every bad value is refused with a message naming the field
and the value (issue 11's list), and a refused request leaves nothing behind."""

from __future__ import annotations

import numpy as np
import pytest

from engine_helpers import TINY, tiny_params
from jaxserve import LLM, SamplingParams
from jaxserve.engine import UnknownRequestError


@pytest.fixture(scope="module")
def llm():
    return LLM.from_params(TINY, tiny_params(), chunk_size=8, max_decode_slots=2, page_size=8,
                           max_model_len=32, max_logprobs=3, strict_compiles=True)


@pytest.fixture(scope="module")
def llm_no_logprobs():
    return LLM.from_params(TINY, tiny_params(), chunk_size=8, max_decode_slots=2, page_size=8,
                           max_model_len=32, max_logprobs=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature="0.5"), r"temperature='0.5' must be a number .*got str"),
    (dict(top_p="0.5"), r"top_p='0.5' must be a number"),
    (dict(min_p=None), r"min_p=None must be a number"),
    (dict(temperature=float("nan")), r"temperature=nan must be a finite number"),
    (dict(max_tokens=True), r"max_tokens=True must be an integer"),
    (dict(max_tokens=2.0), r"max_tokens=2.0 must be an integer"),
    (dict(top_k=False), r"top_k=False must be an integer"),
    (dict(seed=-1), r"seed=-1 must be an integer in \[0, 2\*\*32\)"),
    (dict(seed=2**32), r"seed=4294967296"),
    (dict(seed="7"), r"seed='7' must be an integer"),
    (dict(stop=[1, 2]), r"stop\[0\]=1 must be a string, got int"),
    (dict(stop=5), r"stop=5 must be a string or a list of strings"),
    (dict(stop=["a", ""]), r"must not contain an empty string"),
    (dict(stop_token_ids=["a"]), r"stop_token_ids\[0\]='a' is not a token id"),
    (dict(stop_token_ids=[True]), r"stop_token_ids\[0\]=True is not a token id"),
    (dict(stop_token_ids=5), r"stop_token_ids=5 must be a list of token ids"),
    (dict(stop_token_ids="ab"), r"stop_token_ids='ab' must be a list of token ids"),
    (dict(stop_token_ids=[-2]), r"token id -2 is negative"),
    (dict(ignore_eos="no"), r"ignore_eos='no' must be true or false"),
    (dict(ignore_eos=1), r"ignore_eos=1 must be true or false"),
    (dict(logprobs=True), r"logprobs=True must be an integer"),
    (dict(logprobs=-1), r"logprobs=-1 must be an integer >= 0"),
    (dict(prompt_logprobs=1.5), r"prompt_logprobs=1.5 must be an integer"),
])
def test_sampling_params_name_the_field_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_numpy_and_sequences():
    p = SamplingParams(max_tokens=np.int64(4), temperature=np.float32(0.5), top_k=np.int32(3),
                       stop=["x", "y"], stop_token_ids=np.array([5, 6]), seed=np.uint32(9))
    assert p.max_tokens == 4 and type(p.max_tokens) is int
    assert p.temperature == 0.5 and type(p.temperature) is float
    assert p.stop == ("x", "y") and p.stop_token_ids == (5, 6) and p.seed == 9
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(temperature=0).temperature == 0.0
    assert hash(p) == hash(SamplingParams(**{f: getattr(p, f) for f in (
        "max_tokens", "temperature", "top_k", "stop", "stop_token_ids", "seed")}))


def test_from_dict_names_unknown_fields_and_non_dicts():
    with pytest.raises(ValueError, match=r"unknown sampling field\(s\) \['temp'\]"):
        SamplingParams.from_dict({"temp": 0})
    with pytest.raises(ValueError, match="got list"):
        SamplingParams.from_dict([1])


@pytest.mark.parametrize("request_id, ids, params, match", [
    (None, [1, 2], None, r"request_id=None must be a non-empty string"),
    (123, [1, 2], None, r"request_id=123 must be a non-empty string, got int"),
    ("", [1, 2], None, r"request_id='' must be a non-empty string"),
    ("r", [True, False], None, r"prompt_token_ids\[0\]=True is not a token id"),
    ("r", [1, 1.7], None, r"prompt_token_ids\[1\]=1.7 is not a token id"),
    ("r", [1, "2"], None, r"prompt_token_ids\[1\]='2' is not a token id"),
    ("r", None, None, r"prompt_token_ids=None must be a list of token ids"),
    ("r", "12", None, r"prompt_token_ids='12' must be a list of token ids"),
    ("r", np.array([1.0, 2.0]), None, r"1-D array of integers.*float64"),
    ("r", np.array([[1, 2]]), None, r"1-D array of integers.*\(1, 2\)"),
    ("r", [1, 97], None, r"token id 97 is outside the vocabulary"),
    ("r", [1, 2], {"temperature": "hot"}, r"temperature='hot' must be a number"),
    ("r", [1, 2], {"tempreature": 0}, r"unknown sampling field\(s\) \['tempreature'\]"),
    ("r", [1, 2], "greedy", r"a SamplingParams or a dict of its fields, got str"),
    ("r", [1, 2], SamplingParams(logprobs=4), r"logprobs=4 exceeds the engine's max_logprobs=3"),
    ("r", [1, 2], SamplingParams(stop="x"), r"stop=\('x',\) needs a tokenizer"),
])
def test_add_request_refuses_and_registers_nothing(llm, request_id, ids, params, match):
    eng = llm.engine
    free = eng.scheduler.allocator.num_free
    with pytest.raises(ValueError, match=match):
        eng.add_request(request_id, ids, params)
    assert not eng.has_unfinished() and not eng._requests
    assert eng.scheduler.allocator.num_free == free


def test_add_request_accepts_numpy_ids_and_a_dict_of_params(llm):
    eng = llm.engine
    eng.add_request("np", np.array([5, 6, 7], dtype=np.int32), {"max_tokens": 3,
                                                                 "temperature": 0})
    eng.add_request("tuple", (5, 6, 7), SamplingParams(max_tokens=3, temperature=0))
    done = {}
    while eng.has_unfinished():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert done["np"].token_ids == done["tuple"].token_ids
    assert done["np"].prompt_token_ids == [5, 6, 7]
    outs = llm.generate(prompt_token_ids=np.array([5, 6, 7]),
                        sampling_params={"max_tokens": 3, "temperature": 0}, use_tqdm=False)
    assert outs[0].token_ids == done["np"].token_ids


def test_max_logprobs_zero_refuses_logprobs(llm_no_logprobs):
    eng = llm_no_logprobs.engine
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=rf"{name}=1 exceeds the engine's max_logprobs=0"):
            eng.add_request("r", [1, 2], SamplingParams(**{name: 1}))
    eng.add_request("r", [1, 2], SamplingParams(logprobs=0, max_tokens=2))  # 0: sampled only
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                assert [len(d) for d in out.logprobs] == [1, 1]


def test_abort_running_finished_and_unknown(llm):
    eng = llm.engine
    eng.add_request("a", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0))
    eng.add_request("b", [1, 2, 3], SamplingParams(max_tokens=20, temperature=0,
                                                     ignore_eos=True))
    assert eng.abort("b") is True
    while eng.has_unfinished():
        eng.step()
    assert eng.abort("a") is False  # finished: a no-op, as in vLLM
    assert eng.abort("b") is False  # aborted already
    with pytest.raises(UnknownRequestError, match=r"no request with request_id='nope'"):
        eng.abort("nope")
    with pytest.raises(KeyError):
        eng.abort("nope")
    with pytest.raises(ValueError, match="request_id=7"):
        eng.abort(7)
    assert eng.scheduler.allocator.num_free == eng.cfg.num_pages - 1
    eng.add_request("a", [1, 2], SamplingParams(max_tokens=1))  # a finished id may be reused
    while eng.has_unfinished():
        eng.step()


def test_engine_seed_is_checked():
    with pytest.raises(ValueError, match=r"seed=-1 must be an integer >= 0"):
        LLM.from_params(TINY, tiny_params(), chunk_size=8, max_decode_slots=2, page_size=8,
                        max_model_len=32, seed=-1)
