"""LLM.score and LLM.score_rolling against the dense reference (issue 12, items 3 and 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from engine_helpers import (TINY, char_tokenizer, dense_greedy, dense_logprobs, run_cli,
                            tiny_params, write_tiny_model)
from jaxserve.llm import LLM
from jaxserve.scoring import Window, rolling_windows

MAX_LEN = 16  # short, so that documents run over several windows
EOS = TINY.eos_token_ids[0]  # the prefix token: the char tokenizer has no BOS and no EOS


@pytest.fixture(scope="module")
def llm():
    return LLM.from_params(TINY, tiny_params(), char_tokenizer(), strict_compiles=True,
                           chunk_size=8, max_chunk_seqs=2, chunk_align=2, max_decode_slots=2,
                           page_size=4, max_model_len=MAX_LEN, max_logprobs=2)


def _dense(ids: list[int]) -> np.ndarray:
    """Logprob of ids[i] given ids[:i], for i >= 1 (index 0 unused)."""
    lp = dense_logprobs(TINY, tiny_params(), ids)
    return np.array([0.0] + [lp[i - 1, ids[i]] for i in range(1, len(ids))])


def _pairs(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        c = int(rng.integers(1, 9))
        k = int(rng.integers(1, MAX_LEN - c))
        out.append((rng.integers(0, TINY.vocab_size, c).tolist(),
                    rng.integers(0, TINY.vocab_size, k).tolist()))
    return out


def test_score_matches_the_dense_reference_in_input_order(llm):
    pairs = _pairs(12)
    outs = llm.score(pairs, use_tqdm=False)
    assert len(outs) == len(pairs)
    for (ctx, cont), out in zip(pairs, outs):
        ref = _dense(ctx + cont)[len(ctx):]
        assert out.context_token_ids == ctx and out.continuation_token_ids == cont
        np.testing.assert_allclose(out.token_logprobs, ref, atol=1e-4)
        assert abs(out.loglik - ref.sum()) < 1e-4
        argmax = dense_logprobs(TINY, tiny_params(), ctx + cont).argmax(-1)
        greedy = all(argmax[len(ctx) + i - 1] == t for i, t in enumerate(cont))
        assert out.is_greedy == greedy
    s = llm.last_score_summary
    assert (s.requests, s.tokens_scored) == (12, sum(len(c) for _, c in pairs))
    # One pair alone is a request, not a list of them; the order does not change a score.
    # Scores are the same to the bit alone, in another order and from the prefix cache.
    one = llm.score(pairs[3], use_tqdm=False)
    assert len(one) == 1 and one[0] == outs[3]
    rev = llm.score(pairs[::-1], use_tqdm=False)
    assert rev[::-1] == outs


def test_shared_contexts_come_from_the_cache_with_identical_scores(llm):
    """Items share a context (a few-shot prefix); each has several continuations. With the
    prefix cache the contexts are computed about once; without it every time; the scores are
    the same to the bit."""
    rng = np.random.default_rng(7)
    shared = rng.integers(0, TINY.vocab_size, 8).tolist()
    pairs = [(shared + rng.integers(0, TINY.vocab_size, int(rng.integers(0, 3))).tolist(),
              rng.integers(0, TINY.vocab_size, int(rng.integers(1, 5))).tolist())
             for _ in range(10)]
    on = llm.score(pairs, use_tqdm=False)
    s = llm.last_score_summary
    assert s.tokens == sum(len(c) + len(k) for c, k in pairs)
    assert s.tokens_cached >= 8 * 8  # the 8-token context (2 pages) for all but the first few
    assert s.tokens_computed == s.tokens - s.tokens_cached
    off = LLM.from_params(TINY, tiny_params(), char_tokenizer(), strict_compiles=True,
                          chunk_size=8, max_chunk_seqs=2, chunk_align=2, max_decode_slots=2,
                          page_size=4, max_model_len=MAX_LEN, max_logprobs=2,
                          enable_prefix_caching=False)
    assert off.score(pairs, use_tqdm=False) == on
    assert off.last_score_summary.tokens_cached == 0
    for (ctx, cont), out in zip(pairs, on):
        np.testing.assert_allclose(out.token_logprobs, _dense(ctx + cont)[len(ctx):], atol=1e-4)


def test_is_greedy_exactly_when_every_token_is_the_argmax(llm):
    ctx = [5, 17, 42, 8]
    cont = dense_greedy(TINY, tiny_params(), ctx, 6)
    lp = dense_logprobs(TINY, tiny_params(), ctx + cont)
    wrong = list(cont)
    wrong[3] = int(np.argsort(lp[len(ctx) + 2])[-2])  # the runner-up at that position
    suffix_wrong = cont[:5] + [int(np.argmin(lp[len(ctx) + 4]))]
    greedy, bad, bad_last = llm.score([(ctx, cont), (ctx, wrong), (ctx, suffix_wrong)],
                                      use_tqdm=False)
    assert greedy.is_greedy and not bad.is_greedy and not bad_last.is_greedy
    assert llm.score([(ctx, cont[:1])], use_tqdm=False)[0].is_greedy


def test_text_pairs_tokenize_like_lm_eval(llm):
    tok = llm.tokenizer
    # The context's trailing spaces move to the continuation; no BOS anywhere (this tokenizer
    # has none); an empty context becomes the prefix token (here the model's EOS).
    out, empty = llm.score([("f(x):  ", "x+1"), ("", "ab")], use_tqdm=False)
    assert out.context_token_ids == tok.encode("f(x):")
    assert out.continuation_token_ids == tok.encode("  x+1")
    ids = out.context_token_ids + out.continuation_token_ids
    assert abs(out.loglik - _dense(ids)[len(out.context_token_ids):].sum()) < 1e-4
    assert empty.context_token_ids == [EOS]
    assert abs(empty.loglik - _dense([EOS] + tok.encode("ab"))[1:].sum()) < 1e-4


@pytest.mark.parametrize("request_, message", [
    (([1, 2], []), r"requests\[0\]: the continuation \[\] is empty"),
    (("abc", ""), r"requests\[0\]: the continuation is empty \(context='abc'\)"),
    (([1] * 10, [2] * 6), r"requests\[0\]: context \+ continuation is 16 tokens \(10 \+ 6\); "
                          r"max_model_len=16 scores at most 15"),
    (("abc", [1, 2]), "must both be strings or both token-id lists, got str and list"),
    (([1, "x"], [2]), r"requests\[0\] context\[1\]='x' is not a token id"),
    (([1, 2], [500]), r"continuation\[0\]: token id 500 is outside the vocabulary"),
    (([1.5], [2]), r"context\[0\]=1.5 is not a token id"),
])
def test_bad_requests_are_refused_naming_the_value(llm, request_, message):
    with pytest.raises(ValueError, match=message):
        llm.score([request_], use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_a_bad_request_among_good_ones_runs_nothing(llm):
    with pytest.raises(ValueError, match=r"requests\[1\]=3 must be a \(context, continuation\)"):
        llm.score([([4, 5], [6]), 3], use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_rolling_windows_are_lm_evals():
    # lm-eval's own test (get_rolling_token_windows, max_seq_len=10, context_len=1): windows of
    # 10 inputs are requests of 11 tokens, so max_model_len=12 here.
    windows = rolling_windows(list(range(34)), -100, max_model_len=12)
    assert windows == [
        Window([-100] + list(range(10)), 10), Window(list(range(9, 20)), 10),
        Window(list(range(19, 30)), 10), Window(list(range(23, 34)), 4)]
    for n in range(0, 60):
        for prefix in (None, -1):
            ws = rolling_windows(list(range(n)), prefix, max_model_len=9)
            scored = [t for w in ws for t in w.token_ids[len(w.token_ids) - w.num_scored:]]
            assert scored == list(range(0 if prefix is not None else min(n, 1), n))
            assert all(len(w.token_ids) <= 8 and w.num_scored >= 1 for w in ws)


@pytest.mark.parametrize("n", [9, 3 * MAX_LEN + 5])
def test_rolling_scores_every_token_once(llm, n):
    rng = np.random.default_rng(n)
    doc = rng.integers(0, TINY.vocab_size, n).tolist()
    short = [4, 9]
    out, out_short = llm.score_rolling([doc, short], use_tqdm=False)
    assert out.num_tokens == len(out.token_logprobs) == n and out.token_ids == doc
    windows = rolling_windows(doc, EOS, MAX_LEN)
    assert out.num_windows == len(windows) == (1 if n < MAX_LEN else 4)
    ref = np.concatenate([_dense(w.token_ids)[-w.num_scored:] for w in windows])
    np.testing.assert_allclose(out.token_logprobs, ref, atol=1e-4)
    if n < MAX_LEN:
        assert abs(out.loglik - _dense([EOS] + doc)[1:].sum()) < 1e-4
    assert abs(out_short.loglik - _dense([EOS] + short)[1:].sum()) < 1e-4
    assert llm.last_score_summary.tokens_scored == n + 2


def test_rolling_text_and_errors(llm):
    text = "hello world, " * 5  # 65 characters: 5 windows
    out = llm.score_rolling(text, use_tqdm=False)[0]
    assert out.token_ids == llm.tokenizer.encode(text, add_bos=False)
    assert out.num_tokens == len(text)
    empty = llm.score_rolling([[]], use_tqdm=False)[0]
    assert (empty.num_tokens, empty.loglik, empty.num_windows) == (0, 0.0, 0)
    with pytest.raises(ValueError, match=r"documents\[1\]=3.5 must be a list of token ids"):
        llm.score_rolling(["ab", 3.5], use_tqdm=False)
    assert not llm.engine.has_unfinished()


# -- jaxserve-score ------------------------------------------------------------------------------

ENGINE_FLAGS = ["--chunk_size=8", "--max_chunk_seqs=2", "--chunk_align=2", "--max_decode_slots=2",
                "--page_size=4", f"--max_model_len={MAX_LEN}", "--chunk_buckets=1",
                "--decode_buckets=1"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def _score_cli(*args, timeout=300):
    return run_cli("score", *args, timeout=timeout)


def test_score_cli_end_to_end_with_bad_lines_and_resume(tiny_folder, tmp_path):
    pairs = _pairs(4, seed=1)
    doc = np.random.default_rng(7).integers(0, TINY.vocab_size, 2 * MAX_LEN).tolist()
    lines = [
        json.dumps({"context": pairs[0][0], "continuation": pairs[0][1], "id": "a"}),
        "{not json",
        json.dumps({"context": pairs[1][0], "continuation": pairs[1][1]}),
        json.dumps({"context": [1, 2], "continuation": []}),
        "",
        json.dumps({"text": doc}),
        json.dumps({"context": [1] * 10, "continuation": [2] * 6}),
        json.dumps({"context": "text", "continuation": "needs a tokenizer"}),
        json.dumps({"context": [4], "continuation": [5], "temperature": 0}),
        json.dumps({"context": pairs[2][0], "continuation": pairs[2][1]}),
        json.dumps({"text": []}),
        json.dumps({"context": pairs[3][0], "continuation": pairs[3][1]}),
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    args = [f"--model={tiny_folder}", f"--input={inp}", f"--output={out}", *ENGINE_FLAGS]
    p = _score_cli(*args)
    assert p.returncode == 0, p.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in recs] == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]
    errors = {r["line"]: r["error"] for r in recs if "error" in r}
    assert errors == {
        2: "not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        4: "the continuation [] is empty (context=[1, 2])",
        7: "context + continuation is 16 tokens (10 + 6); max_model_len=16 scores at most 15 "
           "(the engine keeps room for one generated token)",
        8: "this model has no tokenizer: give token-id lists",
        9: "unknown field(s) ['temperature']: give \"context\" and \"continuation\", or \"text\"",
    }
    for n in errors:
        assert f"line {n}: skipped" in p.stderr
    by_line = {r["line"]: r for r in recs}
    for n, (ctx, cont) in zip([1, 3, 10, 12], pairs):
        ref = _dense(ctx + cont)[len(ctx):]
        np.testing.assert_allclose(by_line[n]["token_logprobs"], ref, atol=1e-4)
        assert abs(by_line[n]["loglik"] - ref.sum()) < 1e-4
        assert by_line[n]["num_tokens"] == len(cont)
    assert by_line[1]["id"] == "a"
    windows = rolling_windows(doc, EOS, MAX_LEN)
    ref = sum(_dense(w.token_ids)[-w.num_scored:].sum() for w in windows)
    assert (by_line[6]["num_tokens"], by_line[6]["num_windows"]) == (len(doc), len(windows))
    assert abs(by_line[6]["loglik"] - ref) < 1e-4
    assert (by_line[11]["num_tokens"], by_line[11]["loglik"]) == (0, 0.0)
    assert "Tokens scored" in p.stdout

    # Resume: a run that stopped after one line (and mid-way through writing the next) ends
    # with the same file.
    full = out.read_text()
    out.write_text(full.splitlines(keepends=True)[0] + full.splitlines()[1][:7])
    again = _score_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "resuming: 1 line(s) already in" in again.stderr
    got = [json.loads(x) for x in out.read_text().splitlines()]
    want = [json.loads(x) for x in full.splitlines()]
    assert [r["line"] for r in got] == [r["line"] for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        if "loglik" in w:
            assert abs(g["loglik"] - w["loglik"]) < 1e-5
    assert "nothing left to do" in _score_cli(*args).stderr

    # An output written for another input is refused before the model loads.
    inp.write_text("\n".join(lines[:2] + [json.dumps({"text": [1, 2, 3]})] + lines[3:]) + "\n")
    other = _score_cli(*args)
    assert other.returncode == 2
    assert "its input_sha1 differs from input line 3's" in other.stderr
    assert "another --input file" in other.stderr


def test_score_cli_refuses_bad_flags_before_loading(tiny_folder, tmp_path):
    p = _score_cli(f"--model={tiny_folder}", "--input=/nonexistent.jsonl", *ENGINE_FLAGS)
    assert p.returncode == 2
    assert "jaxserve-score: error: --input='/nonexistent.jsonl': no such file" in p.stderr
    p = _score_cli(f"--model={tiny_folder}", "--chunk_size=7", *ENGINE_FLAGS[1:])
    assert p.returncode == 2 and "chunk_size=7 must be a multiple of chunk_align=2" in p.stderr


def test_score_cli_interrupted_keeps_finished_lines_and_resumes(tiny_folder, tmp_path):
    import signal

    from test_cli_robustness import _wait_for_lines

    pairs = _pairs(1500, seed=2)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"context": c, "continuation": k}) + "\n"
                           for c, k in pairs))
    out = tmp_path / "out.jsonl"
    args = [f"--model={tiny_folder}", f"--input={inp}", f"--output={out}", *ENGINE_FLAGS]
    proc = subprocess.Popen([sys.executable, "-m", "jaxserve.cli.score", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    _wait_for_lines(out, 5, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "jaxserve-score: interrupted by SIGINT" in err and "Traceback" not in err
    first = [json.loads(x) for x in out.read_text().splitlines()]
    assert 5 <= len(first) < len(pairs)
    p = _score_cli(*args)
    assert p.returncode == 0, p.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in recs] == list(range(1, len(pairs) + 1))
    for r in recs[::271]:
        ctx, cont = pairs[r["line"] - 1]
        assert abs(r["loglik"] - _dense(ctx + cont)[len(ctx):].sum()) < 1e-4


def test_is_greedy_reads_the_top1_id_so_a_tie_goes_to_the_lowest_id():
    from jaxserve.outputs import RequestMetrics, RequestOutput
    from jaxserve.scoring import window_scores

    def out(entries):
        return RequestOutput("r", None, [], "", [], "length", None, [None, *entries],
                             RequestMetrics(0.0), finished=True)

    w = Window([1, 7, 5], 2)
    # Built as the engine builds them: the top-1 first, then the actual token's own entry.
    tie = out([{5: -1.0, 7: -1.0}, {5: -0.5}])  # 7 ties with 5: greedy decoding picks 5
    assert window_scores(tie, w) == ([-1.0, -0.5], False)
    top = out([{7: -1.0}, {5: -0.5}])
    assert window_scores(top, w) == ([-1.0, -0.5], True)
