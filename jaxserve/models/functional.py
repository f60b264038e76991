"""The functional view of the NNX model: params are an `nnx.State` pytree, the structure a graphdef.

Device code takes `params` as an ordinary jit argument and rebuilds the module inside the trace
(`bind`), so step functions stay pure `fn(params, cache, batch)` with the config static.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.llama import HF_LAYOUT, LlamaForCausalLM, WeightLayout
from jaxserve.native.matmul import to_panels

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def to_jnp_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} must be one of {tuple(_DTYPES)}")
        return _DTYPES[dtype]
    return jnp.dtype(dtype)


@functools.lru_cache(maxsize=32)
def _abstract(cfg: ModelConfig, dtype_name: str, layout: WeightLayout):
    model = nnx.eval_shape(lambda: LlamaForCausalLM(
        cfg, dtype=_DTYPES[dtype_name], rngs=nnx.Rngs(0), layout=layout))
    return nnx.split(model)


def _key(dtype) -> str:
    return jnp.dtype(to_jnp_dtype(dtype)).name


def graphdef(cfg: ModelConfig, dtype="float32", layout: WeightLayout = HF_LAYOUT):
    return _abstract(cfg, _key(dtype), layout)[0]


def abstract_params(cfg: ModelConfig, dtype="float32", layout: WeightLayout = HF_LAYOUT
                    ) -> nnx.State:
    """The params' structure with `jax.ShapeDtypeStruct` leaves (no memory)."""
    return _abstract(cfg, _key(dtype), layout)[1]


def init_params(cfg: ModelConfig, seed: int = 0, dtype="float32") -> nnx.State:
    """Random params (normal, 1/sqrt(fan_in)) in Hugging Face's layout: test and bench models."""
    model = LlamaForCausalLM(cfg, dtype=to_jnp_dtype(dtype), rngs=nnx.Rngs(seed))
    return nnx.split(model)[1]


# Products of at most this many rows use the native skinny matmul under `fused_native` and
# `fused_in_out_native` (`fused_panels` runs every product on it):
# decode steps of up to 64 sequences (weight-streaming bound); larger products are GEMMs, where
# XLA's blocked dot does better.
NATIVE_MATMUL_ROWS = 64


def resolve_layout(name: str, platform: str | None = None, native_matmul: bool = False,
                   dtype: str = "float32") -> WeightLayout:
    """An EngineConfig.weight_layout name -> WeightLayout. `auto` decides by platform: on the
    CPU `fused_in_out`, or where the caller says the native matmul can run here
    (`jaxserve.native.matmul_build.supported()` and its library loads) `fused_panels` for
    float32 weights (read in place by the kernel's tall path: 3-5% faster prefill products
    than `fused_native`'s `[out, in]`, decode as fast) and `fused_in_out_native` for bfloat16
    ones (the kernel widens bfloat16 weights one by one on the `[out, in]` path: 0.4-0.75x its
    `[in, out]` path's decode step; panels are float32 only); elsewhere `hf`."""
    if name == "auto":
        cpu = (platform or jax.default_backend()) == "cpu"
        native = "fused_panels" if dtype == "float32" else "fused_in_out_native"
        name = (native if native_matmul else "fused_in_out") if cpu else "hf"
    layouts = {"hf": HF_LAYOUT, "fused": WeightLayout(fused=True),
               "fused_in_out": WeightLayout(fused=True, in_out=True),
               "fused_native": WeightLayout(fused=True, native_rows=NATIVE_MATMUL_ROWS),
               "fused_in_out_native": WeightLayout(fused=True, in_out=True,
                                                   native_rows=NATIVE_MATMUL_ROWS),
               "fused_panels": WeightLayout(fused=True, native_rows=NATIVE_MATMUL_ROWS,
                                            panels=True)}
    if name not in layouts:
        raise ValueError(f"weight_layout={name!r} must be one of {('auto', *layouts)}")
    if name == "fused_panels" and not native_matmul:
        raise ValueError("weight_layout='fused_panels' is read by the native CPU kernel only, "
                         "which cannot run here (it needs an x86 CPU with AVX-512 and a C++ "
                         "compiler); use 'auto'")
    if name == "fused_panels" and dtype != "float32":
        raise ValueError(f"weight_layout='fused_panels' is float32 only (dtype={dtype!r}); use "
                         f"'fused_in_out_native' or 'auto'")
    return layouts[name]


def to_layout(cfg: ModelConfig, params: nnx.State, layout: WeightLayout) -> nnx.State:
    """Converts Hugging Face-layout params to `layout` (fusing, transposing); the serving form."""
    if layout == HF_LAYOUT:
        return params
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(params)}
    leaf = jax.tree_util.tree_leaves(params)[0]

    def value(name: str) -> jax.Array:
        prefix, _, leafname = name.rpartition(".")
        module = prefix.rpartition(".")[2]
        parent = prefix.rpartition(".")[0]
        if module == "qkv_proj":
            parts = [flat[f"{parent}.{m}.{leafname}"] for m in ("q_proj", "k_proj", "v_proj")]
            x = jnp.concatenate(parts, axis=0)
        elif module == "gate_up_proj":
            x = jnp.concatenate([flat[f"{parent}.gate_proj.weight"],
                                 flat[f"{parent}.up_proj.weight"]], axis=0)
        else:
            x = flat[name]
        projection = leafname == "weight" and x.ndim == 2 and module != "embed_tokens"
        if layout.in_out and projection:
            x = x.T
        if layout.panels and projection:
            x = to_panels(x)
        return x

    return nnx.map_state(lambda p, v: v.replace(value(".".join(map(str, p)))),
                         abstract_params(cfg, leaf.dtype, layout))


def bind(cfg: ModelConfig, params: nnx.State, layout: WeightLayout = HF_LAYOUT
         ) -> LlamaForCausalLM:
    """Rebuilds the module around `params` (works on traced arrays inside jit)."""
    leaf = jax.tree_util.tree_leaves(params)[0]
    return nnx.merge(graphdef(cfg, leaf.dtype, layout), params)
