"""jaxserve-generate end to end, as a user runs it (a subprocess with absl flags)."""

from __future__ import annotations

import json

import pytest

from engine_helpers import TINY, dense_greedy, run_cli, tiny_params, write_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def _run(*args, timeout=300):
    return run_cli("generate", *args, timeout=timeout)


def test_generate_jsonl_with_bad_lines(tiny_folder, tmp_path):
    lines = [
        json.dumps({"prompt_token_ids": [5, 6, 7]}),
        "{not json",
        json.dumps({"prompt_token_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "max_tokens": 3}),
        json.dumps({"prompt_token_ids": [1, 500]}),
        "",
        json.dumps({"prompt": "needs a tokenizer"}),
        json.dumps({"prompt_token_ids": [9, 9], "temperature": -1}),
        json.dumps({"prompt_token_ids": [4], "logprobs": 2, "prompt_logprobs": 1}),
    ]
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    p = _run(f"--model={tiny_folder}", f"--prompts={prompts}", f"--output={out}",
             "--temperature=0", "--max_tokens=5", "--ignore_eos", "--chunk_size=8",
             "--max_decode_slots=2", "--page_size=8", "--max_model_len=64")
    assert p.returncode == 0, p.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in recs] == [1, 2, 3, 4, 6, 7, 8]
    errors = {r["line"]: r["error"] for r in recs if "error" in r}
    assert set(errors) == {2, 4, 6, 7}
    assert "not valid JSON" in errors[2] and "token id 500" in errors[4]
    assert "tokenizer" in errors[6] and "temperature=-1" in errors[7]
    for n in (2, 4, 6, 7):
        assert f"line {n}: skipped" in p.stderr
    good = {r["line"]: r for r in recs if "error" not in r}
    assert good[1]["token_ids"] == dense_greedy(TINY, tiny_params(), [5, 6, 7], 5)
    assert len(good[3]["token_ids"]) == 3 and good[3]["finish_reason"] == "length"
    assert len(good[8]["logprobs"]) == 5 and good[8]["prompt_logprobs"] == [None]
    assert "Executables compiled" in p.stdout and "Useful-token fraction" in p.stdout
    assert "Compiles after warm-up" in p.stdout


def test_generate_demo_model_default_prompts():
    p = _run("--max_tokens=12", "--temperature=0", "--max_model_len=256", "--chunk_size=64",
             "--max_decode_slots=4")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("----- line") == 6
    assert "Requests" in p.stdout
