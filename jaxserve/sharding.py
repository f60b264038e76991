"""Tensor parallelism over a `jax.sharding.Mesh`: the one table that says how each array is split.

Mesh axes: `model` splits attention heads, the MLP hidden dimension, the vocabulary and the KV
cache's KV heads (Megatron-style: column-parallel q/k/v and gate/up, row-parallel o and down,
so each layer needs one all-reduce after o_proj and one after down_proj, which XLA inserts).
`data` replicates the weights: each data replica computes the same step (a place for
data-parallel serving later; today it only adds redundancy, so give it 1 unless you mean it).

Fallbacks, never silent about correctness: KV heads that do not divide the `model` axis are
replicated (each device computes all of K/V, which is cheap next to the MLP); a vocabulary that
does not divide is replicated. Query heads or an MLP width that do not divide are an error
naming both numbers. Everything else (norms, biases of replicated projections) is replicated.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve.config import ModelConfig

MESH_AXES = ("data", "model")


def parse_mesh_shape(text: str) -> dict[str, int]:
    """'model=8' or 'data=2,model=4' -> {'data': 2, 'model': 4} (missing axes are 1)."""
    shape = {"data": 1, "model": 1}
    if not text:
        return shape
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"bad mesh_shape entry {part!r} in {text!r}: want AXIS=N with AXIS "
                             f"in {MESH_AXES} and N >= 1")
        shape[name] = int(value)
    return shape


def make_mesh(shape: dict[str, int], devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    n = math.prod(shape[a] for a in MESH_AXES)
    if n > len(devices):
        raise ValueError(f"mesh_shape {shape} needs {n} devices; only {len(devices)} are visible")
    grid = np.asarray(devices[:n], dtype=object).reshape([shape[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Partition specs by tensor name (Hugging Face layout), for one model on one mesh."""

    model_cfg: ModelConfig
    model_axis_size: int

    def __post_init__(self):
        n, c = self.model_axis_size, self.model_cfg
        if c.num_heads % n:
            raise ValueError(f"num_heads={c.num_heads} must be divisible by the mesh's model "
                             f"axis ({n})")
        if c.intermediate_size % n:
            raise ValueError(f"intermediate_size={c.intermediate_size} must be divisible by the "
                             f"mesh's model axis ({n})")

    @property
    def shard_kv(self) -> bool:
        return self.model_cfg.num_kv_heads % self.model_axis_size == 0

    @property
    def shard_vocab(self) -> bool:
        return self.model_cfg.vocab_size % self.model_axis_size == 0

    def spec(self, name: str, ndim: int) -> P:
        """The PartitionSpec of one parameter, by its Hugging Face tensor name."""
        kv = "model" if self.shard_kv else None
        vocab = "model" if self.shard_vocab else None
        table = [  # (pattern, spec of the weight [out, in], spec of a bias [out])
            (r"self_attn\.q_proj", P("model", None), P("model")),
            (r"self_attn\.[kv]_proj", P(kv, None), P(kv)),
            (r"self_attn\.o_proj", P(None, "model"), P()),
            (r"mlp\.(gate|up)_proj", P("model", None), P("model")),
            (r"mlp\.down_proj", P(None, "model"), P()),
            (r"embed_tokens", P(vocab, None), P()),
            (r"lm_head", P(vocab, None), P()),
        ]
        for pattern, weight_spec, bias_spec in table:
            if re.search(pattern, name):
                return weight_spec if ndim == 2 else bias_spec
        return P()  # norms: small, replicated

    def kv_cache_spec(self) -> P:
        """[layers, pages, page_size, kv_heads, head_dim]."""
        return P(None, None, None, "model" if self.shard_kv else None, None)


def param_shardings(rules: ShardingRules, mesh: Mesh, abstract: nnx.State) -> nnx.State:
    """A pytree of NamedShardings with the params' structure."""
    return nnx.map_state(
        lambda path, v: v.replace(NamedSharding(
            mesh, rules.spec(".".join(map(str, path)), len(v.get_value().shape)))),
        abstract)


def shard_params(params: nnx.State, shardings: nnx.State) -> nnx.State:
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated array's value on this host (multi-host arrays are not fully addressable)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the engine's arrays live on a mesh: params by the table, the cache by KV heads,
    every step input and output replicated (all hosts build the same batch)."""

    mesh: Mesh
    rules: ShardingRules
    params: nnx.State  # NamedShardings with the params' structure
    cache: NamedSharding
    replicated: NamedSharding


def make_placement(model_cfg: ModelConfig, mesh_shape: str, abstract_params: nnx.State,
                   devices=None) -> Placement:
    shape = parse_mesh_shape(mesh_shape)
    mesh = make_mesh(shape, devices)
    rules = ShardingRules(model_cfg, shape["model"])
    return Placement(mesh=mesh, rules=rules,
                     params=param_shardings(rules, mesh, abstract_params),
                     cache=NamedSharding(mesh, rules.kv_cache_spec()),
                     replicated=replicated(mesh))
