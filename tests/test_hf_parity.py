"""Logits match Hugging Face transformers on every checkpoint in tests/fixtures/hf/.

The fixtures and their float32 reference logits come from tools/make_hf_fixtures.py, so this
test needs neither torch nor transformers.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from jaxserve.models.dense import forward_dense
from jaxserve.weights import load_model

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())


def reference(name):
    ref = np.load(FIXTURES / name / "reference.npz")
    n = len([k for k in ref.files if k.startswith("ids_")])
    return [(ref[f"ids_{i}"], ref[f"logits_{i}"]) for i in range(n)]


@pytest.mark.parametrize("name", NAMES)
def test_float32_logits_match_hf(name):
    cfg, params = load_model(FIXTURES / name)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    cases = reference(name)
    assert sorted(len(ids) for ids, _ in cases) == [1, 7, 33]
    for ids, want in cases:
        got = np.asarray(forward_dense(cfg, params, ids))
        assert got.shape == want.shape == (len(ids), cfg.vocab_size)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"{name} T={len(ids)}")


def test_bfloat16_load_is_close():
    cfg, params = load_model(FIXTURES / "qwen2_bias", dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    for ids, want in reference("qwen2_bias"):
        got = np.asarray(forward_dense(cfg, params, ids))
        assert got.dtype == np.float32
        # bf16 weights and activations through two layers; logits are O(4).
        np.testing.assert_allclose(got, want, rtol=0, atol=0.25)


def test_fixtures_cover_the_formats():
    """The fixture set keeps exercising each on-disk variant the loader must read."""
    assert {"llama_gqa", "llama3_rope", "mistral_bf16", "qwen2_bias", "qwen3_qknorm",
            "llama_tied", "llama_mqa"} <= set(NAMES)
    assert (FIXTURES / "qwen2_bias" / "model.safetensors.index.json").is_file()
    with safe_open(FIXTURES / "mistral_bf16" / "model.safetensors", framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    v4 = json.loads((FIXTURES / "llama3_rope" / "config.json").read_text())
    assert "rope_parameters" not in v4 and v4["rope_scaling"]["rope_type"] == "llama3"
    v5 = json.loads((FIXTURES / "llama_gqa" / "config.json").read_text())
    assert "rope_scaling" not in v5 and "rope_parameters" in v5
