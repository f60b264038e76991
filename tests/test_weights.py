"""Checkpoint loading errors, sharded loads, safetensors and orbax round trips, forward errors."""

import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxserve.models.dense import forward_dense
from jaxserve.weights import (load_model, restore_checkpoint, save_checkpoint, save_safetensors,
                              tensor_name)

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"


def copy_fixture(name, tmp_path) -> pathlib.Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def edit_tensors(folder: pathlib.Path, edit) -> None:
    file = folder / "model.safetensors"
    with safe_open(file, framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def flat(params) -> dict:
    from flax import nnx
    return {tensor_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}


def assert_params_equal(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        assert fa[name].dtype == fb[name].dtype, name
        np.testing.assert_array_equal(fa[name], fb[name], err_msg=name)


def test_state_names_are_hf_names():
    cfg, params = load_model(FIXTURES / "llama_gqa")
    with safe_open(FIXTURES / "llama_gqa" / "model.safetensors", framework="numpy") as f:
        assert set(flat(params)) == set(f.keys())
    assert "model.embed_tokens.weight" in flat(params)


def test_folder_without_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_model(tmp_path)


def test_folder_without_safetensors(tmp_path):
    shutil.copy(FIXTURES / "llama_gqa" / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    folder = copy_fixture("llama_gqa", tmp_path)
    edit_tensors(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=re.escape("model.layers.1.mlp.up_proj.weight")):
        load_model(folder)


def test_misshaped_tensor_names_both_shapes(tmp_path):
    folder = copy_fixture("llama_gqa", tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"  # [2 kv heads * 16, 64]
    edit_tensors(folder, lambda t: t.update({name: np.zeros((16, 64), np.float32)}))
    with pytest.raises(ValueError, match=re.escape(name)) as err:
        load_model(folder)
    assert "(16, 64)" in str(err.value) and "(32, 64)" in str(err.value)


def test_extra_tensor_is_an_error(tmp_path):
    folder = copy_fixture("llama_gqa", tmp_path)
    name = "model.layers.0.self_attn.o_proj.bias"
    edit_tensors(folder, lambda t: t.update({name: np.zeros((64,), np.float32)}))
    with pytest.raises(ValueError, match=re.escape(name)):
        load_model(folder)


def test_integer_tensor_is_an_error(tmp_path):
    folder = copy_fixture("llama_gqa", tmp_path)
    name = "model.norm.weight"
    edit_tensors(folder, lambda t: t.update({name: np.ones((64,), np.int32)}))
    with pytest.raises(ValueError, match=re.escape(name) + ".*int32"):
        load_model(folder)


def test_harmless_extras_are_ignored(tmp_path):
    folder = copy_fixture("llama_tied", tmp_path)

    def add(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()  # tied head stored anyway
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones((8,), np.float32)
    edit_tensors(folder, add)
    _, params = load_model(folder)
    _, want = load_model(FIXTURES / "llama_tied")
    assert "lm_head.weight" not in flat(params)
    assert_params_equal(params, want)


def test_lm_head_of_untied_model_is_required(tmp_path):
    folder = copy_fixture("llama_gqa", tmp_path)
    edit_tensors(folder, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_model(folder)


def test_sharded_load_equals_unsharded(tmp_path):
    sharded = FIXTURES / "qwen2_bias"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg, params = load_model(sharded)
    single = tmp_path / "single"
    save_safetensors(single, params)
    shutil.copy(sharded / "config.json", single)
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "model.safetensors"]
    cfg2, params2 = load_model(single)
    assert cfg2 == cfg
    assert_params_equal(params, params2)


def test_index_naming_a_missing_shard(tmp_path):
    folder = copy_fixture("qwen2_bias", tmp_path)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        load_model(folder)


def test_bfloat16_on_disk_and_save_keeps_dtype(tmp_path):
    cfg, params = load_model(FIXTURES / "mistral_bf16", dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    _, params32 = load_model(FIXTURES / "mistral_bf16", dtype="float32")
    for name, x in flat(params32).items():  # bf16 -> f32 is exact, so back is lossless
        np.testing.assert_array_equal(x.astype(jnp.bfloat16), flat(params)[name])
    file = save_safetensors(tmp_path / "out", params)
    with safe_open(file, framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="float16"):
        load_model(FIXTURES / "llama_gqa", dtype="float16")


def test_orbax_round_trip(tmp_path):
    cfg, params = load_model(FIXTURES / "qwen3_qknorm")
    save_checkpoint(tmp_path / "ckpt", params)
    restored = restore_checkpoint(tmp_path / "ckpt", cfg)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    assert_params_equal(restored, params)

    as_bf16 = restore_checkpoint(tmp_path / "ckpt", cfg, dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(as_bf16)} == {jnp.dtype(jnp.bfloat16)}

    mesh = jax.make_mesh((1,), ("model",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda _: sharding, params)
    placed = restore_checkpoint(tmp_path / "ckpt", cfg, shardings=shardings)
    assert all(leaf.sharding == sharding for leaf in jax.tree.leaves(placed))
    assert_params_equal(placed, params)


def test_restore_missing_checkpoint(tmp_path):
    cfg, _ = load_model(FIXTURES / "llama_mqa")
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        restore_checkpoint(tmp_path / "nothing_here", cfg)


@pytest.mark.parametrize("ids, match", [
    ([3, 256, 5], "token id 256"),
    ([-1], "token id -1"),
    ([], "non-empty"),
    ([[1, 2]], "non-empty 1-D"),
    ([1.5], "integers"),
])
def test_forward_dense_rejects_bad_tokens(ids, match):
    cfg, params = load_model(FIXTURES / "llama_gqa")
    with pytest.raises(ValueError, match=match):
        forward_dense(cfg, params, ids)


@pytest.mark.parametrize("cut", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_names_the_file(tmp_path, cut):
    folder = copy_fixture("llama_gqa", tmp_path)
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x01" * 64,
                      "empty": b""}[cut])
    with pytest.raises(ValueError, match=re.escape(repr(str(file))) + ".*corrupt or truncated"):
        load_model(folder)


@pytest.mark.parametrize("text, match", [
    ('{"architectures": ', "is not valid JSON"),
    ('[1, 2]', "holds a JSON list, not an object"),
    ('{"architectures": ["LlamaForCausalLM"]}', "lacks the field"),
])
def test_corrupt_config_json_names_the_file(tmp_path, text, match):
    folder = copy_fixture("llama_gqa", tmp_path)
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(repr(str(folder / "config.json"))) + ".*"
                       + match):
        load_model(folder)


def test_corrupt_index_and_generation_config_name_the_file(tmp_path):
    folder = copy_fixture("llama_gqa", tmp_path)
    (folder / "generation_config.json").write_bytes(b"\xff{")
    with pytest.raises(ValueError, match="generation_config.json' is not valid JSON"):
        load_model(folder)
    (folder / "generation_config.json").unlink()
    (folder / "model.safetensors.index.json").write_text("{")
    with pytest.raises(ValueError, match="model.safetensors.index.json' is not valid JSON"):
        load_model(folder)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
    folder = copy_fixture("llama_gqa", tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"

    def poison(t):
        t[name] = t[name].copy()
        t[name].flat[3] = bad
    edit_tensors(folder, poison)
    with pytest.raises(ValueError, match=re.escape(f"tensor {name!r} in ") + ".*1 non-finite"):
        load_model(folder)
    _, params = load_model(folder, allow_nonfinite=True)  # for debugging
    assert not np.isfinite(flat(params)[name]).all()


def test_float32_overflowing_bfloat16_is_refused(tmp_path):
    folder = copy_fixture("llama_gqa", tmp_path)
    name = "model.norm.weight"

    def huge(t):
        t[name] = t[name].copy()
        t[name][0] = np.float32(3.4e38)  # finite in float32, Inf in bfloat16
    edit_tensors(folder, huge)
    load_model(folder)
    with pytest.raises(ValueError, match=re.escape(repr(name)) + ".*bfloat16"):
        load_model(folder, dtype="bfloat16")
