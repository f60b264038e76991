"""The demo model shipped in jaxserve/demo_model/ (made by tools/train_demo_model.py)."""

from __future__ import annotations

import json
import os
import string

import jax
import numpy as np
import pytest

import jaxserve
from jaxserve.config import ModelConfig
from jaxserve.models.dense import forward_dense
from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer
from jaxserve.weights import load_model

DEMO = os.path.join(os.path.dirname(jaxserve.__file__), "demo_model")
SNIPPET = (
    "import os\nimport sys\n\n\ndef main(argv):\n    for name in os.listdir(argv[1]):\n"
    "        if name.endswith('.py'):\n            print(name)\n    return 0\n")
PAD_TO = 64  # one compiled length for every greedy step: causal, so the padding is never seen


@pytest.fixture(scope="module")
def demo():
    cfg, params = load_model(DEMO)
    return cfg, params, Tokenizer.from_pretrained(DEMO)


def test_folder_is_a_complete_hf_model_and_small():
    names = set(os.listdir(DEMO))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "training.json"} <= names
    total = sum(os.path.getsize(os.path.join(DEMO, n)) for n in names)
    assert total < 20e6
    with open(os.path.join(DEMO, "config.json")) as f:
        hf = json.load(f)
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["model_type"] == "llama"


def test_config_and_tokenizer_agree():
    cfg = ModelConfig.from_pretrained(DEMO)
    tok = Tokenizer.from_pretrained(DEMO)
    assert cfg.max_position_embeddings >= 2048
    assert cfg.num_kv_heads < cfg.num_heads  # exercises grouped-query attention
    assert cfg.vocab_size == tok.vocab_size
    assert tok.bos_token_id == cfg.bos_token_id is not None
    assert tok.eos_token_ids == cfg.eos_token_ids != ()
    assert tok.bos_token_id not in tok.eos_token_ids
    ids = tok.encode(SNIPPET)
    assert ids[0] == tok.bos_token_id and tok.decode(ids) == SNIPPET
    assert len(ids) < len(SNIPPET) / 2  # the BPE learned Python's common pieces


def test_training_record():
    with open(os.path.join(DEMO, "training.json")) as f:
        record = json.load(f)
    for key in ("parameters", "tokens_trained", "steps", "train_seconds", "final_train_loss",
                "heldout_loss"):
        assert key in record
    cfg, params = load_model(DEMO)
    assert record["parameters"] == sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert record["heldout_loss"] < 5.0  # untrained: ln(vocab) = 8.3


def test_weights_are_trained(demo):
    """Loaded in the right layout, the model predicts ordinary Python far better than chance."""
    cfg, params, tok = demo
    ids = np.asarray(tok.encode(SNIPPET), np.int32)
    logits = np.asarray(forward_dense(cfg, params, ids), np.float64)[:-1]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
    assert nll < 0.6 * np.log(cfg.vocab_size), nll  # random weights: ~ln(vocab) or worse


def _greedy(cfg, params, prompt_ids: list[int], n: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(n):
        padded = np.zeros(PAD_TO, np.int32)
        padded[:len(ids)] = ids
        logits = forward_dense(cfg, params, padded)
        ids.append(int(np.argmax(np.asarray(logits[len(ids) - 1]))))
    return ids[len(prompt_ids):]


@pytest.mark.parametrize("prompt", ["import os\n", "    def __init__(self"])
def test_greedy_generation_is_deterministic_printable_text(demo, prompt):
    cfg, params, tok = demo
    prompt_ids = tok.encode(prompt)
    out = _greedy(cfg, params, prompt_ids, 16)
    assert _greedy(cfg, params, prompt_ids, 16) == out
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt_ids)
    streamed = "".join(detok.add(t) for t in out) + detok.flush()
    text = tok.decode(out)
    assert streamed == text
    assert len(text) >= 16
    printable = sum(c in string.printable for c in text)
    assert printable >= 0.9 * len(text), repr(text)
