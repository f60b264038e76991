"""Tiny models and a dense greedy oracle shared by the engine tests."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.models import forward_dense, init_params

TINY = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=97, hidden_size=32, intermediate_size=64,
    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64,
    eos_token_ids=(3,))
ORACLE_LEN = 64  # the dense oracle pads every sequence to this (one compile for all)


@functools.lru_cache(maxsize=4)
def tiny_params(seed: int = 0):
    return init_params(TINY, seed=seed)


def dense_logprobs(cfg, params, ids: list[int]) -> np.ndarray:
    """log_softmax of the dense reference at each position of `ids` (padded: causal, so the pad
    after the sequence cannot change what comes before it)."""
    padded = list(ids) + [0] * (ORACLE_LEN - len(ids))
    logits = np.asarray(forward_dense(cfg, params, padded), np.float64)[: len(ids)]
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def dense_greedy(cfg, params, prompt: list[int], max_tokens: int, max_len: int = ORACLE_LEN
                 ) -> list[int]:
    toks = list(prompt)
    out = []
    while len(out) < max_tokens and len(toks) < max_len:
        nxt = int(dense_logprobs(cfg, params, toks)[-1].argmax())
        out.append(nxt)
        toks.append(nxt)
    return out


def char_tokenizer():
    """A real `Tokenizer` for tests whose 97 tokens are single characters (no merges)."""
    import string

    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    from jaxserve.tokenizer import Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation + " \n\t"
    assert len(chars) == TINY.vocab_size
    tok = tokenizers.Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)},
                                                unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return Tokenizer(tok, bos_token_id=None, eos_token_ids=())


def hf_config(cfg) -> dict:
    """A Hugging Face config.json for a ModelConfig (what the CLI tests' model folders hold)."""
    return {
        "architectures": [cfg.architecture], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope.theta, "tie_word_embeddings": cfg.tie_word_embeddings,
        "eos_token_id": list(cfg.eos_token_ids), "hidden_act": "silu",
    }


def write_tiny_model(path):
    """The tiny model as a Hugging Face folder at `path` (weights + config.json); returns it."""
    from jaxserve.weights import save_safetensors

    save_safetensors(path, tiny_params())
    (path / "config.json").write_text(json.dumps(hf_config(TINY)))
    return path


def run_cli(module: str, *args, timeout=300) -> subprocess.CompletedProcess:
    """`python -m jaxserve.cli.<module> args...` as a user runs it, on the CPU."""
    return subprocess.run([sys.executable, "-m", f"jaxserve.cli.{module}", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
