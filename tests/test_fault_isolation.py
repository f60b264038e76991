"""Fault isolation: a request whose processing raises is finished with finish_reason="error", the
others are served as if nothing happened, and the engine's invariants hold afterwards (issue 11).

Faults are injected by patching per-request functions (the stop/detokenize step, the output
snapshot, the detokenizer) to raise at chosen tokens, and the runner to raise at a chosen step.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine_helpers import TINY, char_tokenizer, tiny_params
from jaxserve import LLM, SamplingParams
from jaxserve.request import Request
from jaxserve.tokenizer import IncrementalDetokenizer

OPTIONS = dict(chunk_size=8, max_chunk_seqs=2, chunk_align=4, max_decode_slots=3, page_size=4,
               max_model_len=48)


@pytest.fixture(scope="module")
def engines():
    tok = char_tokenizer()
    # Tight: 12 usable pages of 4 tokens for up to 3 sequences of up to 48, so preemption happens.
    tight = LLM.from_params(TINY, tiny_params(), tok, num_pages=13, strict_compiles=True,
                            **OPTIONS).engine
    roomy = LLM.from_params(TINY, tiny_params(), tok, strict_compiles=True, **OPTIONS).engine
    return tight, roomy


def run_all(eng, requests) -> dict:
    """Adds every request, steps to the end; {id: [finished outputs]} (a list, to count them)."""
    for rid, (ids, params) in requests.items():
        eng.add_request(rid, ids, params)
    finished: dict[str, list] = {rid: [] for rid in requests}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                finished[out.request_id].append(out)
    return finished


def assert_idle(eng) -> None:
    """No page leaked, nothing registered, the scheduler empty."""
    assert not eng.has_unfinished() and not eng._requests and eng._inflight is None
    assert not eng.scheduler.waiting and not eng.scheduler.running
    assert eng.scheduler.allocator.num_free == eng.cfg.num_pages - 1


_CLEAN: dict = {}
STATS = {"errors": 0, "requests": 0}


def clean_outputs(roomy, requests) -> dict:
    """Each request's output from the roomy engine with no faults (memoised by content)."""
    key = lambda ids, p: (tuple(ids), p)  # noqa: E731
    todo = {rid: r for rid, r in requests.items() if key(*r) not in _CLEAN}
    for rid, outs in run_all(roomy, todo).items():
        assert len(outs) == 1 and outs[0].finish_reason != "error", outs
        _CLEAN[key(*todo[rid])] = outs[0]
    return {rid: _CLEAN[key(*r)] for rid, r in requests.items()}


@st.composite
def request_mixes(draw):
    n = draw(st.integers(1, 7))
    requests = {}
    for i in range(n):
        ids = draw(st.lists(st.integers(0, TINY.vocab_size - 1), min_size=1, max_size=20))
        seeded = draw(st.booleans())
        params = SamplingParams(
            max_tokens=draw(st.integers(1, 14)), temperature=0.8 if seeded else 0.0,
            seed=draw(st.integers(0, 5)) if seeded else None,
            ignore_eos=draw(st.booleans()),
            stop=draw(st.sampled_from([None, "a", ("b", "cd")])),
            logprobs=draw(st.sampled_from([None, 0, 2])))
        requests[f"r{i}"] = (ids, params)
    faults = {}
    for rid in requests:
        if draw(st.booleans()):
            where = draw(st.sampled_from(["append_token", "output", "detokenize"]))
            faults[rid] = (where, draw(st.integers(1, 8)))
    runner_fault = draw(st.one_of(st.none(), st.integers(0, 12)))
    return requests, faults, runner_fault


@contextlib.contextmanager
def injected(eng, faults: dict, runner_fault: int | None):
    """Patches the per-request functions to raise "injected" at the chosen token counts."""
    def wrap(name, cls, attr, count_of, rid_of):
        orig = getattr(cls, attr)

        def faulty(self, *args, **kwargs):
            rid = rid_of(self)
            if faults.get(rid, (None,))[0] == name and count_of(self, *args) == faults[rid][1]:
                raise RuntimeError(f"injected fault in {name} of {rid}")
            return orig(self, *args, **kwargs)
        return mock.patch.object(cls, attr, faulty)

    detok_owner = {}
    calls = [0]
    orig_run = eng.runner.run

    def run(*args, **kwargs):
        calls[0] += 1
        if calls[0] - 1 == runner_fault:
            raise RuntimeError("injected device fault")
        return orig_run(*args, **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(wrap("append_token", Request, "append_token",
                                 lambda self, token, n, *a: n, lambda self: self.request_id))
        stack.enter_context(wrap("output", Request, "output",
                                 lambda self, ids, *a: len(ids), lambda self: self.request_id))
        stack.enter_context(wrap("detokenize", IncrementalDetokenizer, "add",
                                 lambda self, token: len(self.token_ids) + 1,
                                 lambda self: detok_owner.get(id(self))))
        # Which request a detokenizer belongs to: the engine makes one per request, in order.
        stack.enter_context(mock.patch.object(Request, "__post_init__", _remember_detok(
            Request.__post_init__, detok_owner)))
        stack.enter_context(mock.patch.object(eng.runner, "run", run))
        yield


def _remember_detok(orig, owner: dict):
    def post_init(self):
        orig(self)
        if self.detokenizer is not None:
            owner[id(self.detokenizer)] = self.request_id
    return post_init


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mix=request_mixes())
def test_faults_stay_with_their_request(engines, mix):
    tight, roomy = engines
    requests, faults, runner_fault = mix
    clean = clean_outputs(roomy, requests)
    with injected(tight, faults, runner_fault):
        finished = run_all(tight, requests)
    assert_idle(tight)
    STATS["errors"] += sum(outs[0].finish_reason == "error" for outs in finished.values())
    STATS["requests"] += len(finished)
    for rid, outs in finished.items():
        assert len(outs) == 1, (rid, outs)  # every request finished exactly once
        out, ref = outs[0], clean[rid]
        if out.finish_reason == "error":
            assert "injected" in out.error, out.error
            assert out.token_ids == ref.token_ids[:len(out.token_ids)]
        else:
            assert out.error is None
            assert (out.token_ids, out.text, out.finish_reason) == (
                ref.token_ids, ref.text, ref.finish_reason), rid
            if ref.logprobs is not None:
                assert out.logprobs == ref.logprobs
    # The engine still serves cleanly afterwards.
    again = run_all(tight, requests)
    assert all(outs[0].token_ids == clean[rid].token_ids for rid, outs in again.items())
    assert_idle(tight)


def test_a_bad_request_does_not_poison_the_engine(engines):
    tight, _ = engines
    requests = {"good": ([5, 6, 7], SamplingParams(max_tokens=6, temperature=0)),
                "bad": ([8, 9], SamplingParams(max_tokens=6, temperature=0))}
    with injected(tight, {"bad": ("append_token", 2)}, None):
        finished = run_all(tight, requests)
    bad = finished["bad"][0]
    assert bad.finish_reason == "error" and bad.finished and len(bad.token_ids) >= 1
    assert "RuntimeError: injected fault in append_token of bad" == bad.error
    assert finished["good"][0].finish_reason == "length"
    assert_idle(tight)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engines):
    tight, roomy = engines
    requests = {f"r{i}": ([i + 1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
                for i in range(4)}
    with injected(tight, {}, 0):  # the very first step raises
        finished = run_all(tight, requests)
    errors = {rid for rid, outs in finished.items() if outs[0].finish_reason == "error"}
    assert errors and all("injected device fault" in finished[r][0].error for r in errors)
    assert all(len(outs) == 1 for outs in finished.values())
    assert_idle(tight)
    clean = clean_outputs(roomy, requests)
    again = run_all(tight, requests)
    assert {rid: o[0].token_ids for rid, o in again.items()} == {
        rid: o.token_ids for rid, o in clean.items()}


def test_a_scheduler_fault_fails_everything_and_resets(engines):
    tight, _ = engines
    requests = {"a": ([1, 2], SamplingParams(max_tokens=4)),
                "b": ([3, 4], SamplingParams(max_tokens=4))}
    for rid, (ids, p) in requests.items():
        tight.add_request(rid, ids, p)
    tight.step()
    with mock.patch.object(type(tight.scheduler), "schedule",
                           side_effect=AssertionError("broken invariant")):
        outs = tight.step()
    assert {o.request_id for o in outs} == {"a", "b"}
    assert all(o.finish_reason == "error" and "broken invariant" in o.error for o in outs)
    while tight.has_unfinished():
        assert not tight.step()
    assert_idle(tight)


def test_faults_were_injected():
    # The property test above must have exercised faults, not only clean runs.
    if not STATS["requests"]:
        pytest.skip("runs after test_faults_stay_with_their_request")
    assert STATS["errors"] >= 10 and STATS["requests"] > STATS["errors"], STATS
