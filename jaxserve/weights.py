"""Hugging Face safetensors -> params, params -> safetensors, and orbax save / restore.

Params are the `nnx.State` of `LlamaForCausalLM`, whose flattened state paths joined with "." are
Hugging Face's tensor names (`model.layers.0.self_attn.q_proj.weight`), so loading is a lookup by
name against `abstract_params(cfg, dtype)`: every expected tensor must be found with its exact
shape, and nothing unexpected may be left over.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from jaxserve.config import ModelConfig
from jaxserve.models.functional import abstract_params, to_jnp_dtype

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Buffers old checkpoints carry that the model recomputes (HF's loader drops them too).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16),
                 np.dtype(np.float64))


def tensor_name(path: tuple) -> str:
    """An nnx state path -> its Hugging Face tensor name."""
    return ".".join(str(k) for k in path)


def _shard_files(path: str) -> list[str]:
    index_path = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{index_path!r} is not valid JSON: {e}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not weight_map or not isinstance(weight_map, dict):
            raise ValueError(f"{index_path!r} has no weight_map")
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        for file in files:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"shard {file!r} named in {index_path!r} does not exist")
        return files
    single = os.path.join(path, SAFETENSORS_FILE)
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(
        f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in model folder {path!r}")


def _tensor_locations(files: list[str]) -> dict[str, str]:
    """Tensor name -> the file that holds it, across all shards."""
    where: dict[str, str] = {}
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                if name in where:
                    raise ValueError(f"tensor {name!r} is in both {where[name]!r} and {file!r}")
                where[name] = file
    return where


@contextlib.contextmanager
def _open(file: str):
    """`safe_open`, with the file's path in any error (a corrupt or truncated file)."""
    try:
        with safe_open(file, framework="numpy") as f:
            yield _Named(f, file)
    except SafetensorError as e:
        raise ValueError(f"{file!r} is not a readable safetensors file (corrupt or truncated?): "
                         f"{e}") from None


class _Named:
    """A safetensors handle whose read errors name the file."""

    def __init__(self, handle, file: str):
        self._f, self._file = handle, file

    def keys(self):
        return self._f.keys()

    def get_slice(self, name: str):
        return self._f.get_slice(name)

    def get_tensor(self, name: str) -> np.ndarray:
        try:
            return self._f.get_tensor(name)
        except (SafetensorError, ValueError, OSError) as e:
            raise ValueError(f"tensor {name!r} in {self._file!r} cannot be read (corrupt or "
                             f"truncated file?): {e}") from None


def load_model(path: str | os.PathLike, dtype="float32", shardings: Any = None, *,
               allow_nonfinite: bool = False) -> tuple[ModelConfig, nnx.State]:
    """Reads a Hugging Face model folder (config.json + safetensors, single or sharded).

    Tensors stored as float32, bfloat16 or float16 are converted to `dtype` on the host. A
    tensor holding NaN or Inf (after the conversion) is an error naming it, unless
    `allow_nonfinite` (for debugging a broken checkpoint).
    `shardings` (a pytree of shardings with the params' structure, e.g. a
    `sharding.Placement.params`): each tensor goes straight from the host to its shards, so no
    device ever holds a whole copy of the model.
    """
    path = os.fspath(path)
    cfg = ModelConfig.from_pretrained(path)
    target = np.dtype(to_jnp_dtype(dtype))
    abstract = abstract_params(cfg, dtype)
    where = _tensor_locations(_shard_files(path))

    expected = {tensor_name(p): v.get_value().shape for p, v in nnx.to_flat_state(abstract)}
    missing = [name for name in expected if name not in where]
    if missing:
        raise ValueError(
            f"checkpoint {path!r} lacks {len(missing)} tensor(s) the model needs: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    extra = [name for name in where if name not in expected and not _ignorable(name, cfg)]
    if extra:
        raise ValueError(
            f"checkpoint {path!r} has {len(extra)} tensor(s) the model does not use: "
            f"{extra[:5]}{' ...' if len(extra) > 5 else ''}")

    arrays: dict[str, np.ndarray] = {}
    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(where[name], []).append(name)
    for file, names in by_file.items():
        with _open(file) as f:
            for name in names:
                found = tuple(f.get_slice(name).get_shape())
                if found != tuple(expected[name]):
                    raise ValueError(
                        f"tensor {name!r} has shape {found} in {file!r}, expected "
                        f"{tuple(expected[name])} from config.json")
                arrays[name] = _convert(name, f.get_tensor(name), target)
                if not allow_nonfinite:
                    _check_finite(name, file, arrays[name])

    if shardings is None:
        return cfg, nnx.map_state(
            lambda p, v: v.replace(jnp.asarray(arrays.pop(tensor_name(p)))), abstract)
    placed = {tensor_name(p): v.get_value() for p, v in nnx.to_flat_state(shardings)}
    return cfg, nnx.map_state(
        lambda p, v: v.replace(jax.device_put(arrays.pop(tensor_name(p)),
                                              placed[tensor_name(p)])), abstract)


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    if name.endswith(_IGNORED_SUFFIXES):
        return True
    # Some tied checkpoints also store the (identical) head; HF ignores it, so do we.
    return cfg.tie_word_embeddings and name == "lm_head.weight"


def _convert(name: str, array: np.ndarray, target: np.dtype) -> np.ndarray:
    if array.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"tensor {name!r} has unsupported dtype {array.dtype} on disk")
    return array.astype(target, copy=False)


def _check_finite(name: str, file: str, array: np.ndarray) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        bad = array.size - int(np.count_nonzero(finite))
        raise ValueError(
            f"tensor {name!r} in {file!r} holds {bad} non-finite value(s) (NaN or Inf) after "
            f"conversion to {array.dtype}; the model would generate garbage (load_model("
            f"allow_nonfinite=True) / --allow_nonfinite_weights loads it anyway, for debugging)")


def save_safetensors(path: str | os.PathLike, params: nnx.State) -> str:
    """Writes `params` as `<path>/model.safetensors` with Hugging Face tensor names."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = {tensor_name(p): np.ascontiguousarray(jax.device_get(v.get_value()))
               for p, v in nnx.to_flat_state(params)}
    file = os.path.join(path, SAFETENSORS_FILE)
    save_file(tensors, file, metadata={"format": "pt"})  # transformers wants the format key
    return file


def save_checkpoint(path: str | os.PathLike, params: nnx.State) -> None:
    """Saves converted params with orbax (works on sharded arrays: each host writes its part)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(os.fspath(path)), params)
        ckptr.wait_until_finished()


def restore_checkpoint(path: str | os.PathLike, cfg: ModelConfig, dtype="float32",
                       shardings: Any = None) -> nnx.State:
    """Restores params saved by `save_checkpoint`, cast to `dtype`.

    `shardings`: None (default device), one `jax.sharding.Sharding` for every array, or a pytree
    of shardings with the params' structure (e.g. from `nnx.get_named_sharding`); each array is
    then read straight into its target sharding.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no orbax checkpoint at {path!r}")
    abstract = abstract_params(cfg, dtype)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), abstract)
    else:
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, target)
