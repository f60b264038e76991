"""ModelConfig parsing of HF config.json (both transformers 4.x and 5.x styles) and EngineConfig."""

import json
import pathlib
import re
import shutil

import pytest

from jaxserve.config import EngineConfig, ModelConfig, RopeConfig

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"


def hf_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


def test_llama_gqa_v5_style():
    cfg = ModelConfig.from_pretrained(FIXTURES / "llama_gqa")
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim) == (4, 2, 2, 16)
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size) == (64, 2, 256)
    assert cfg.rope == RopeConfig(theta=10000.0)
    assert cfg.rms_norm_eps == 1e-5
    assert not cfg.tie_word_embeddings and not cfg.attention_bias and not cfg.qk_norm
    assert cfg.sliding_window is None
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))


def test_llama3_rope_v4_style_equals_v5_style():
    hf = hf_config("llama3_rope")
    assert "rope_scaling" in hf and "rope_parameters" not in hf
    cfg = ModelConfig.from_hf_dict(hf)
    assert cfg.rope == RopeConfig(theta=10000.0, rope_type="llama3", factor=8.0,
                                  low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=64)
    v5 = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**hf["rope_scaling"], "rope_theta": hf["rope_theta"]}
    assert ModelConfig.from_hf_dict(v5) == cfg


def test_v4_style_without_scaling_and_old_type_key():
    cfg = ModelConfig.from_pretrained(FIXTURES / "llama_tied")
    assert cfg.tie_word_embeddings
    assert cfg.rope == RopeConfig(theta=500000.0)
    hf = hf_config("llama_gqa")
    del hf["rope_parameters"]
    hf.update(rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0})  # pre-4.45 key
    assert ModelConfig.from_hf_dict(hf).rope == RopeConfig(theta=1e4, rope_type="linear",
                                                           factor=2.0)


def test_qwen2_biases_and_qwen3_qk_norm():
    qwen2 = ModelConfig.from_pretrained(FIXTURES / "qwen2_bias")
    assert qwen2.attention_bias and not qwen2.qk_norm
    assert qwen2.rope.theta == 1e6
    qwen3 = ModelConfig.from_pretrained(FIXTURES / "qwen3_qknorm")
    assert qwen3.qk_norm and not qwen3.attention_bias
    assert qwen3.head_dim == 32 and qwen3.num_heads * qwen3.head_dim != qwen3.hidden_size
    llama = hf_config("llama_gqa")
    assert ModelConfig.from_hf_dict({**llama, "attention_bias": True}).attention_bias


def test_mqa_and_mistral():
    mqa = ModelConfig.from_pretrained(FIXTURES / "llama_mqa")
    assert (mqa.num_kv_heads, mqa.q_per_kv, mqa.vocab_size) == (1, 4, 200)
    mistral = ModelConfig.from_pretrained(FIXTURES / "mistral_bf16")
    assert mistral.architecture == "MistralForCausalLM" and mistral.sliding_window is None


def test_mistral_sliding_window_only_where_it_never_bites():
    cfg = ModelConfig.from_hf_dict({**hf_config("mistral_bf16"), "sliding_window": 64})
    assert cfg.sliding_window == 64
    with pytest.raises(ValueError, match="sliding_window=64"):
        EngineConfig(max_model_len=128, chunk_size=32).resolve(cfg)
    assert EngineConfig(max_model_len=64, chunk_size=32).resolve(cfg).max_model_len == 64


def test_generation_config_eos_list(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(FIXTURES / "llama_gqa", folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert ModelConfig.from_pretrained(folder).eos_token_ids == (2, 7)


@pytest.mark.parametrize("edit, match", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"architectures": []}, "exactly one architecture"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"num_key_value_heads": 3}, "num_kv_heads=3"),
    ({"num_attention_heads": 0}, "num_heads=0"),
    ({"head_dim": 15}, "head_dim=15"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                          "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
])
def test_unsupported_configs_name_the_value(edit, match):
    base = hf_config("llama3_rope" if "rope_scaling" in edit else "llama_gqa")  # 4.x / 5.x
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_dict({**base, **edit})


def test_qwen_sliding_window_refused():
    hf = {**hf_config("qwen2_bias"), "use_sliding_window": True, "sliding_window": 32,
          "max_window_layers": 0}
    with pytest.raises(ValueError, match="use_sliding_window"):
        ModelConfig.from_hf_dict(hf)


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        ModelConfig.from_pretrained(tmp_path)


def test_engine_config_resolve_defaults():
    cfg = ModelConfig.from_pretrained(FIXTURES / "llama_gqa")  # max_position_embeddings 256
    eng = EngineConfig(chunk_size=64, max_decode_slots=4, page_size=16).resolve(cfg)
    assert eng.max_model_len == 256 and eng.pages_per_seq == 16
    assert eng.num_pages == 1 + 4 * 16
    assert eng.num_seqs == 8 + 4 and eng.chunk_tokens == 64
    # Unchunked: the region holds a whole max_model_len prompt, rounded up to chunk_align rows.
    assert EngineConfig(chunk_size=0, max_model_len=100).resolve(cfg).chunk_tokens == 104
    # A budget above max_model_len is legal: several sequences' chunks pack into it.
    assert EngineConfig(chunk_size=512, max_model_len=128).resolve(cfg).chunk_tokens == 512


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="float16"), "dtype='float16'"),
    (dict(attention="cuda"), "attention='cuda'"),
    (dict(page_size=0), "page_size=0"),
    (dict(chunk_size=-1), "chunk_size=-1"),
    (dict(max_chunk_seqs=1.5), "max_chunk_seqs=1.5"),
    (dict(max_chunk_seqs=0), "max_chunk_seqs=0"),
    (dict(chunk_align=0), "chunk_align=0"),
])
def test_engine_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        EngineConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_pages=4, max_model_len=128, chunk_size=64), "num_pages=4"),
    (dict(max_model_len=512), "max_model_len=512"),
    (dict(chunk_size=300), "chunk_size=300 must be a multiple of chunk_align=8"),
])
def test_engine_config_resolve_errors(kwargs, match):
    cfg = ModelConfig.from_pretrained(FIXTURES / "llama_gqa")
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs).resolve(cfg)
