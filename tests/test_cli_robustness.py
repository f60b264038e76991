"""jaxserve-generate under bad input and interruption: flags and files refused before the model
loads, bad lines recorded and skipped, Ctrl-C/SIGTERM keep the finished lines, a rerun resumes
(issue 11)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from engine_helpers import TINY, dense_greedy, hf_config, tiny_params, write_tiny_model
from jaxserve.cli import output_file

ENGINE = ["--chunk_size=8", "--max_decode_slots=2", "--page_size=8", "--max_model_len=64"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def _cmd(*args):
    return [sys.executable, "-m", "jaxserve.cli.generate", *args]


def _run(*args, timeout=300):
    return subprocess.run(_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("flag, message", [
    ("--temperature=-1", "--temperature: temperature=-1.0 must be >= 0"),
    ("--top_p=0", "--top_p: top_p=0.0 must be in (0, 1]"),
    ("--max_tokens=0", "--max_tokens: max_tokens=0 must be an integer >= 1"),
    ("--stop=", "--stop: stop=('',) must not contain an empty string"),
    ("--stop_token_ids=a,b", "--stop_token_ids: 'a' is not a token id"),
    ("--prompts=/nonexistent/in.jsonl", "--prompts='/nonexistent/in.jsonl': no such file"),
    ("--chunk_size=100", "chunk_size=100 must be a multiple of chunk_align=8"),
])
def test_bad_flags_are_refused_before_loading(tiny_folder, flag, message):
    p = _run(f"--model={tiny_folder}", *ENGINE, flag)
    assert p.returncode == 2, p.stderr
    assert f"jaxserve-generate: error: {message}" in p.stderr
    assert "Traceback" not in p.stderr and "Executables compiled" not in p.stdout


def test_a_model_that_fails_to_load_exits_1_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config(TINY)))
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    p = _run(f"--model={tmp_path}", *ENGINE)
    assert p.returncode == 1, p.stderr
    assert f"{str(tmp_path / 'model.safetensors')!r}" in p.stderr
    assert "Traceback" not in p.stderr


def _prompts(path, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    ids = [[rng.randrange(TINY.vocab_size) for _ in range(rng.randrange(1, 20))]
           for _ in range(n)]
    path.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in ids))
    return ids


def test_bad_lines_are_recorded_and_the_rest_runs(tiny_folder, tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_bytes(b"\n".join([
        json.dumps({"prompt_token_ids": [5, 6, 7]}).encode(),
        json.dumps({"prompt_token_ids": [1, 2], "stop": [5]}).encode(),
        b'{"prompt": "caf\xc3 au lait"}',  # invalid UTF-8
        json.dumps({"prompt_token_ids": [True, False]}).encode(),
        json.dumps({"prompt_token_ids": [1.7]}).encode(),
        json.dumps({"prompt_token_ids": [4], "ignore_eos": "no"}).encode(),
        json.dumps({"prompt_token_ids": [4, 4], "temperature": "0.5"}).encode(),
        json.dumps({"prompt_token_ids": [9, 8]}).encode(),
    ]) + b"\n")
    out = tmp_path / "out.jsonl"
    p = _run(f"--model={tiny_folder}", f"--prompts={prompts}", f"--output={out}", *ENGINE,
             "--temperature=0", "--max_tokens=4", "--ignore_eos")
    assert p.returncode == 0, p.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in recs] == list(range(1, 9))
    errors = {r["line"]: r["error"] for r in recs if "error" in r}
    assert errors == {
        2: "stop[0]=5 must be a string, got int",
        3: "not valid UTF-8 (byte 0xc3 at column 16)",
        4: "prompt_token_ids[0]=True is not a token id (an integer), got bool",
        5: "prompt_token_ids[0]=1.7 is not a token id (an integer), got float",
        6: "ignore_eos='no' must be true or false, got str",
        7: "temperature='0.5' must be a number >= 0 (0 = greedy), got str",
    }
    for n in errors:
        assert f"line {n}: skipped" in p.stderr
    assert recs[0]["token_ids"] == dense_greedy(TINY, tiny_params(), [5, 6, 7], 4)
    assert recs[7]["token_ids"] == dense_greedy(TINY, tiny_params(), [9, 8], 4)


def _wait_for_lines(path, n: int, proc, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.communicate()}")
        time.sleep(0.05)
    pytest.fail("no output appeared")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_keeps_finished_lines_and_a_rerun_resumes(tiny_folder, tmp_path, sig, code):
    prompts = tmp_path / "in.jsonl"
    ids = _prompts(prompts, 300)
    out = tmp_path / "out.jsonl"
    args = [f"--model={tiny_folder}", f"--prompts={prompts}", f"--output={out}", *ENGINE,
            "--temperature=0", "--max_tokens=12", "--ignore_eos"]
    proc = subprocess.Popen(_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    _wait_for_lines(out, 5, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"interrupted by {sig.name}" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err
    first = [json.loads(x) for x in out.read_text().splitlines()]  # every line whole
    assert 5 <= len(first) < 300
    p = _run(*args)
    assert p.returncode == 0, p.stderr
    assert f"resuming: {len(first)} line(s) already in" in p.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in recs] == list(range(1, 301))  # each once, in order
    for r in recs[:: 37]:
        assert r["token_ids"] == dense_greedy(TINY, tiny_params(), ids[r["line"] - 1], 12)
    again = _run(*args)
    assert again.returncode == 0 and "nothing left to do" in again.stderr


def test_resume_refuses_an_output_of_another_input(tmp_path):
    out = tmp_path / "out.jsonl"
    lines = [b'{"prompt": "a"}', b'{"prompt": "b"}']
    out.write_text(json.dumps({"line": 2, "prompt": "not b", "text": ""}) + "\n")
    with pytest.raises(ValueError, match="prompt differs from input line 2"):
        output_file.read_done(str(out), lines, {1: "a", 2: "b"})
    out.write_text(json.dumps({"line": 7, "text": ""}) + "\n")
    with pytest.raises(ValueError, match=r"names no line of the input \(7\)"):
        output_file.read_done(str(out), lines, {1: "a", 2: "b"})
    out.write_text("garbage\n")
    with pytest.raises(ValueError, match="is not JSON"):
        output_file.read_done(str(out), lines, {})


def test_resume_drops_a_line_cut_short(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"line": 1, "text": "x"}) + "\n" + '{"line": 2, "te')
    done = output_file.read_done(str(out), [b"", b""], {})
    assert set(done) == {1}
    assert out.read_text() == json.dumps({"line": 1, "text": "x"}) + "\n"


def test_ordered_writer_waits_for_earlier_lines_and_flushes_all_on_close(tmp_path):
    out = tmp_path / "out.jsonl"
    w = output_file.OrderedWriter(str(out), [1, 2, 3, 5])
    w.add({"line": 2})
    w.add({"line": 5})
    assert out.read_text() == ""
    w.add({"line": 1})
    assert [json.loads(x)["line"] for x in out.read_text().splitlines()] == [1, 2]
    w.close()  # interrupted before line 3: line 5 is kept anyway
    assert [json.loads(x)["line"] for x in out.read_text().splitlines()] == [1, 2, 5]
    assert w.out_of_order  # some lines were written before earlier ones finished
