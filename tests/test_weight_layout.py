"""The serving weight layouts compute the same logits as Hugging Face's layout."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import ModelConfig
from jaxserve.models import forward_dense, init_params
from jaxserve.models.dense import causal_attention
from jaxserve.models.functional import bind, resolve_layout, to_layout
from jaxserve.models.llama import WeightLayout

CFG = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=64, hidden_size=32,
                  intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  max_position_embeddings=64, attention_bias=True, qk_norm=True)


@pytest.mark.parametrize("layout", [WeightLayout(fused=True), WeightLayout(in_out=True),
                                    WeightLayout(fused=True, in_out=True)], ids=str)
def test_layout_matches_hf(layout):
    params = init_params(CFG, seed=2)
    ids = jnp.asarray([3, 1, 4, 1, 5, 9, 2, 6], jnp.int32)
    ref = np.asarray(forward_dense(CFG, params, ids))
    model = bind(CFG, to_layout(CFG, params, layout), layout)
    hidden, _ = model.hidden_states(
        ids, jnp.arange(8), lambda layer, q, k, v, c: (causal_attention(q, k, v), c), None)
    np.testing.assert_allclose(np.asarray(model.logits(hidden)), ref, atol=1e-5)


def test_resolve_layout():
    assert resolve_layout("auto", "cpu") == WeightLayout(fused=True, in_out=True)
    assert resolve_layout("auto", "tpu") == WeightLayout()
    with pytest.raises(ValueError, match="weight_layout='bogus'"):
        resolve_layout("bogus")


def test_native_layout_with_tied_head_matches_hf():
    # fused_native: [out, in] products of <= 64 rows, and a tied head (the embedding), on the
    # native kernel.
    import dataclasses

    from jaxserve.native import matmul_build
    if not matmul_build.supported():
        pytest.skip("the native matmul needs an AVX-512 CPU")
    cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
    params = init_params(cfg, seed=3)
    ids = jnp.asarray([3, 1, 4, 1, 5, 9, 2, 6], jnp.int32)
    ref = np.asarray(forward_dense(cfg, params, ids))
    layout = resolve_layout("fused_native")
    model = bind(cfg, to_layout(cfg, params, layout), layout)
    assert model.lm_head is None and model.tied_head_native_rows == layout.native_rows
    hidden, _ = model.hidden_states(
        ids, jnp.arange(8), lambda layer, q, k, v, c: (causal_attention(q, k, v), c), None)
    np.testing.assert_allclose(np.asarray(model.logits(hidden)), ref, atol=1e-5)
