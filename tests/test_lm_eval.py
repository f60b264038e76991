"""The lm-evaluation-harness backend end to end, with the real `lm_eval` package on local tasks
written here (task YAML + JSONL; nothing from a hub) and the demo model: its numbers are checked
against direct `LLM.score` / `score_rolling` / `generate` calls on the same arguments."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")

from jaxserve import SamplingParams  # noqa: E402
from jaxserve.lm_eval_adapter import JaxserveLM  # noqa: E402

# Small, fast engine settings for the demo model (one executable of each kind).
MODEL_ARGS = dict(chunk_size=128, max_decode_slots=4, max_model_len=256, chunk_buckets=1,
                  decode_buckets=1)
DOCS = [{"q": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"],
         "label": 0},
        {"q": "import", "choices": [" os", " sys\nimport re"], "label": 1},
        {"q": "for i in range(10):\n   ", "choices": [" print(i)", " pass"], "label": 0}]


def _tasks(folder) -> None:
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    data = {"data_files": {"test": str(folder / "docs.jsonl")}}
    common = {"dataset_path": "json", "dataset_kwargs": data, "test_split": "test"}
    tasks = {
        "js_mc": {**common, "output_type": "multiple_choice", "doc_to_text": "{{q}}",
                  "doc_to_choice": "{{choices}}", "doc_to_target": "label",
                  "metric_list": [{"metric": "acc"}]},
        "js_rolling": {**common, "output_type": "loglikelihood_rolling", "doc_to_text": "",
                       "doc_to_target": "{{q}}", "metric_list": [{"metric": "word_perplexity"}]},
        "js_gen": {**common, "output_type": "generate_until", "doc_to_text": "{{q}}",
                   "doc_to_target": "{{choices[label]}}",
                   "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
                   "metric_list": [{"metric": "exact_match"}]},
    }
    for name, spec in tasks.items():
        (folder / f"{name}.yaml").write_text(json.dumps({"task": name, **spec}))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("tasks")
    _tasks(folder)
    lm = JaxserveLM(use_tqdm=False, **MODEL_ARGS)
    res = lm_eval.simple_evaluate(model=lm, tasks=["js_mc", "js_rolling", "js_gen"],
                                  task_manager=TaskManager(include_path=str(folder)),
                                  log_samples=True, bootstrap_iters=0)
    return lm, res, folder


def test_loglikelihood_equals_direct_scores(evaluated):
    lm, res, _ = evaluated
    samples = res["samples"]["js_mc"]
    assert len(samples) == len(DOCS)
    for s in samples:
        pairs = [tuple(a) for a in s["arguments"]]
        direct = lm.llm.score(pairs, use_tqdm=False)
        got = [r[0] for r in s["resps"]]  # one (loglik, is_greedy) per choice
        assert [tuple(g) for g in got] == [(o.loglik, o.is_greedy) for o in direct]
        pred = max(range(len(direct)), key=lambda i: direct[i].loglik)
        assert s["acc"] == float(pred == s["doc"]["label"])
    assert res["results"]["js_mc"]["acc,none"] == pytest.approx(
        sum(s["acc"] for s in samples) / len(samples))


def test_rolling_equals_direct_scores(evaluated):
    lm, res, _ = evaluated
    samples = res["samples"]["js_rolling"]
    for s in samples:
        text = s["arguments"][0][0]
        # lm-eval's backends encode a document as the tokenizer does (with its BOS).
        direct = lm.llm.score_rolling([text], add_bos=True, use_tqdm=False)[0]
        assert s["resps"][0][0] == direct.loglik
        assert math.isfinite(direct.loglik) and direct.loglik < 0


def test_generate_until_equals_direct_generation(evaluated):
    lm, res, _ = evaluated
    for s in res["samples"]["js_gen"]:
        context = s["arguments"][0][0]
        direct = lm.llm.generate([context], SamplingParams(max_tokens=8, temperature=0,
                                                           stop=["\n"]), use_tqdm=False)[0]
        assert s["resps"][0][0] == direct.text
        assert "\n" not in direct.text


def test_registry_name_and_unknown_model_args(evaluated):
    from lm_eval.api.registry import get_model

    cls = get_model("jaxserve")
    assert cls is JaxserveLM
    # Registering jaxserve first hides none of lm-eval's own backends.
    assert get_model("dummy").__name__ == "DummyLM"
    with pytest.raises(ValueError, match="chunk_sz"):
        cls.create_from_arg_string("chunk_sz=64")


def test_add_bos_token_false_scores_without_bos(evaluated, monkeypatch):
    """model_args `add_bos_token=False` (lm-eval's meaning) reaches every request kind."""
    lm, _, _ = evaluated
    import jaxserve.lm_eval_adapter as adapter

    monkeypatch.setattr(adapter, "LLM", lambda *a, **k: lm.llm)
    no_bos = JaxserveLM.create_from_arg_string("add_bos_token=False,use_tqdm=False")
    assert not no_bos.add_bos and lm.add_bos

    class Req:
        def __init__(self, *args):
            self.args = args

    pair = ("def add(a, b):", " return a")
    got = no_bos.loglikelihood([Req(*pair)])[0]
    want = lm.llm.score([pair], add_bos=False, use_tqdm=False)[0]
    assert got == (want.loglik, want.is_greedy)
    assert want.context_token_ids[0] != lm.llm.tokenizer.bos_token_id
    assert got != lm.loglikelihood([Req(*pair)])[0]  # with the BOS: another score
    assert no_bos.loglikelihood_rolling([Req("x = 1\n")]) == [
        lm.llm.score_rolling(["x = 1\n"], add_bos=False, use_tqdm=False)[0].loglik]


def test_matches_lm_evals_own_hf_backend(evaluated):
    """The same tasks through lm-eval's `hf` backend (transformers + torch, float32, on the CPU)
    on the demo model's folder: the same log-likelihoods to float32 rounding, the same
    choices and accuracy. Runs where transformers and torch are installed (not in CI's
    `[test]`: torch is several hundred MB)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lm_eval.tasks import TaskManager

    from jaxserve.llm import DEMO_MODEL_PATH

    lm, res, folder = evaluated
    hf = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={DEMO_MODEL_PATH},dtype=float32,device=cpu",
        tasks=["js_mc", "js_rolling"], task_manager=TaskManager(include_path=str(folder)),
        log_samples=True, bootstrap_iters=0)
    diffs = []
    for task in ("js_mc", "js_rolling"):
        ours = {s["doc_id"]: s for s in res["samples"][task]}
        for s in hf["samples"][task]:
            mine = ours[s["doc_id"]]
            assert [a[:2] for a in s["arguments"]] == [a[:2] for a in mine["arguments"]]
            for (hf_ll, *hf_rest), (ll, *rest) in zip([r[0] if isinstance(r[0], (list, tuple))
                                                       else [r[0]] for r in s["resps"]],
                                                      [r[0] if isinstance(r[0], (list, tuple))
                                                       else [r[0]] for r in mine["resps"]]):
                diffs.append(abs(hf_ll - ll))
                assert abs(hf_ll - ll) <= 1e-4 * max(1.0, abs(ll)), (task, hf_ll, ll)
                assert hf_rest == rest  # is_greedy, for loglikelihood
    assert hf["results"]["js_mc"]["acc,none"] == res["results"]["js_mc"]["acc,none"]
    print(f"largest |loglik difference| vs lm-eval's hf backend: {max(diffs):.2e}")


@pytest.mark.slow
def test_command_line(evaluated, tmp_path):
    # lm-eval's own command line and flags, with the jaxserve backend registered first.
    _, res, folder = evaluated
    args = ",".join(f"{k}={v}" for k, v in MODEL_ARGS.items())
    out = subprocess.run(
        [sys.executable, "-m", "jaxserve.cli.lm_eval", "--model", "jaxserve", "--model_args",
         args, "--tasks", "js_mc", "--include_path", str(folder), "--output_path",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "js_mc" in out.stdout and "acc" in out.stdout
