"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) as Flax NNX modules.

Weights keep Hugging Face's names and layouts (`[out, in]` projections), so a checkpoint maps
onto the module state name for name; the engine may convert them once to a serving layout
(`WeightLayout`).

Attention is not part of the modules: every layer calls an `attend` function the caller gives,
`attend(layer, q, k, v, cache) -> (out, cache)`, so one model serves the dense reference (causal
attention over one sequence) and the paged engine step (K/V written to and read from pages).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig, RopeConfig
from jaxserve.native.matmul import PANEL_WIDTH

# attend(layer_index, q f32[T, H, Dh], k [T, KVH, Dh], v [T, KVH, Dh], cache) -> (o [T, H, Dh], cache)
AttendFn = Callable[[int, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """How projection weights are stored. `HF` (the default) is Hugging Face's: separate
    projections, each `[out, in]`. The engine may convert to a serving layout once at start-up:
    `fused` concatenates q/k/v and gate/up into one projection each (fewer, larger matmuls) and
    `in_out` stores `[in, out]`. Together (`fused_in_out`, the CPU default) they made the bench
    job 1.06-1.10x faster than Hugging Face's layout on the 2-core bench VM, measured end to
    end by `benchmarks/offline_job.py --compare_layouts`; per product, XLA's CPU dot reads `[in,
    out]` and `[out, in]` weights at about the same (low) rate at 16 rows
    (`benchmarks/decode_bandwidth.py`).

    `native_rows` (CPU with AVX-512): products of at most this many rows (a decode step's) use
    the native skinny kernel (jaxserve/native/matmul.cc) instead of XLA's dot; 0 never. Decided
    by shape at trace time, so one executable uses one path per product. The kernel reads
    either layout, with the same arithmetic; it streams `[out, in]` weights faster than
    `[in, out]` ones (each strip of output columns is one contiguous block of rows: 1.15-1.35x
    the `[in, out]` path's weights-only decode step of 16 rows,
    benchmarks/results/decode_experiment.md), and `panels` (below, the float32 CPU default
    `fused_panels`) faster still; a tied head (the embedding, `[vocab, hidden]`) runs on the
    kernel's `[out, in]` path. Not for bfloat16: the `[out, in]` path widens the weights one by
    one (0.4-0.75x), so bfloat16 stays on `fused_in_out_native`.

    `row_invariant` (`EngineConfig.batch_invariant`): every product, whatever its rows, runs
    on the native kernel (either layout), whose rows do not depend on each other, so a row's
    result is the same to the bit in a decode-only step of 8 rows, a mixed step of 528 or a
    prompt chunk at any offset. XLA's CPU dot is not: it picks its arithmetic by shape (on the
    bench VM one for 1 row, one for 8-16, another from 24; benchmarks/row_invariance.py). With
    tied embeddings and `[in, out]` weights the head gets an `[in, out]` copy of the embedding
    (`lm_head`); `[out, in]` layouts read the embedding itself."""

    fused: bool = False
    in_out: bool = False
    native_rows: int = 0
    row_invariant: bool = False
    # Projections stored as 16-column panels, [ceil(out / 16), in, 16] in size, the lines in
    # blocks of 256 inputs (`to_panels`; `fused_panels`, float32
    # on the native kernel only, which reads them for every product): a tall product reads
    # them in place where `[out, in]` needs each panel transposed (3-5% of a 528-row product),
    # and a decode product as fast (benchmarks/results/panels_layout.json).
    panels: bool = False

    @property
    def rows_on_native(self) -> int:
        """Products of at most this many rows run on the native kernel (0: none)."""
        return _ALL_ROWS if self.row_invariant or self.panels else self.native_rows


HF_LAYOUT = WeightLayout()
_ALL_ROWS = 2**62


def _dot_f32(x: jax.Array, w: jax.Array, in_out: bool, native_rows: int = 0,
             live_rows: jax.Array | None = None, out_features: int | None = None) -> jax.Array:
    """f32[..., out] = x [..., in] @ w, w [out, in] (or [in, out], or the `panels` layout,
    `to_panels`: [ceil(out / 16), in, 16] in size, which needs `out_features`), f32
    accumulation. Products of at most `native_rows` rows (panels: all) run on the native
    kernel, which computes only `live_rows` (`skinny_matmul`; the others come back 0); XLA's
    dot computes every row."""
    if w.ndim == 3:
        from jaxserve.native.matmul import panels_matmul
        return panels_matmul(x, w, out_features, live_rows=live_rows)
    if native_rows and math.prod(x.shape[:-1]) <= native_rows:
        from jaxserve.native.matmul import skinny_matmul  # the CPU-only path loads it
        return skinny_matmul(x, w, out_in=not in_out, live_rows=live_rows)
    contract = 0 if in_out else 1
    return jax.lax.dot_general(
        x, w, (((x.ndim - 1,), (contract,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(x: jax.Array, w: jax.Array, in_out: bool, native_rows: int = 0,
         live_rows: jax.Array | None = None, out_features: int | None = None) -> jax.Array:
    """x [..., in] @ w in x's dtype (see `_dot_f32`)."""
    return _dot_f32(x, w, in_out, native_rows, live_rows, out_features).astype(x.dtype)


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, rngs: nnx.Rngs,
                 in_out: bool = False, native_rows: int = 0, panels: bool = False):
        scale = 1.0 / math.sqrt(in_features)
        shape = ((-(-out_features // PANEL_WIDTH), in_features, PANEL_WIDTH) if panels
                 else (in_features, out_features) if in_out else (out_features, in_features))
        self.weight = nnx.Param(jax.random.normal(rngs.params(), shape, dtype) * scale)
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None
        self.in_out, self.native_rows = in_out, native_rows
        self.out_features = out_features

    def __call__(self, x: jax.Array, live_rows: jax.Array | None = None) -> jax.Array:
        y = _dot(x, self.weight[...], self.in_out, self.native_rows, live_rows,
                 self.out_features)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Embedding(nnx.Module):
    """A module (not a bare Param) so the state path is HF's `model.embed_tokens.weight`."""

    def __init__(self, num_embeddings: int, features: int, *, dtype, rngs: nnx.Rngs):
        scale = 1.0 / math.sqrt(features)
        self.weight = nnx.Param(
            jax.random.normal(rngs.params(), (num_embeddings, features), dtype) * scale)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in float32 and cast back before the scale, as Hugging Face does.
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> jax.Array:
    """f32[head_dim // 2] inverse frequencies, with `linear` or `llama3` scaling applied."""
    inv = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        # Llama 3.1 "frequency-dependent" scaling (Meta's reference implementation).
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    return inv


def rope_angles(rope: RopeConfig, head_dim: int, positions: jax.Array, dtype) -> jax.Array:
    """[T, 2, head_dim // 2]: cos and sin of the rotation angles of positions i32[T]."""
    freqs = positions.astype(jnp.float32)[:, None] * rope_inv_freq(rope, head_dim)[None, :]
    return jnp.stack([jnp.cos(freqs), jnp.sin(freqs)], axis=1).astype(dtype)


def rope_table(rope: RopeConfig, head_dim: int, max_len: int, dtype) -> jax.Array:
    """`rope_angles` of positions 0..max_len-1. The engine builds it once and the step looks
    positions up: with sin/cos inside the step, XLA fused (duplicated) them into every layer's
    rotation and evaluated them per head (~25 ms of a 528-token CPU step)."""
    return rope_angles(rope, head_dim, jnp.arange(max_len, dtype=jnp.int32), dtype)


def apply_rope(x: jax.Array, rope: jax.Array) -> jax.Array:
    """Rotates x [T, heads, Dh] by rope [T, 2, Dh/2] (cos, sin per token; see `rope_table`),
    the non-interleaved rotate-half form."""
    cos, sin = rope[:, None, 0, :], rope[:, None, 1, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, layout: WeightLayout):
        h, hd = cfg.hidden_size, cfg.head_dim
        lin = functools.partial(Linear, bias=cfg.attention_bias, dtype=dtype, rngs=rngs,
                                in_out=layout.in_out, native_rows=layout.rows_on_native,
                                panels=layout.panels)
        nq, nkv = cfg.num_heads * hd, cfg.num_kv_heads * hd
        if layout.fused:
            self.qkv_proj = lin(h, nq + 2 * nkv)
        else:
            self.q_proj, self.k_proj, self.v_proj = lin(h, nq), lin(h, nkv), lin(h, nkv)
        self.o_proj = Linear(nq, h, bias=False, dtype=dtype, rngs=rngs, in_out=layout.in_out,
                             native_rows=layout.rows_on_native, panels=layout.panels)
        self.fused = layout.fused
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd

    def __call__(self, layer: int, x, rope, attend: AttendFn, cache, live_rows=None):
        t = x.shape[0]
        if self.fused:
            nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            qkv = self.qkv_proj(x, live_rows)
            q, k, v = qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
        else:
            q, k, v = (self.q_proj(x, live_rows), self.k_proj(x, live_rows),
                       self.v_proj(x, live_rows))
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        o, cache = attend(layer, q, k, v, cache)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim), live_rows), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, layout: WeightLayout):
        h, i = cfg.hidden_size, cfg.intermediate_size
        lin = functools.partial(Linear, bias=False, dtype=dtype, rngs=rngs, in_out=layout.in_out,
                                native_rows=layout.rows_on_native, panels=layout.panels)
        if layout.fused:
            self.gate_up_proj = lin(h, 2 * i)
        else:
            self.gate_proj, self.up_proj = lin(h, i), lin(h, i)
        self.down_proj = lin(i, h)
        self.fused, self.intermediate = layout.fused, i

    def __call__(self, x, live_rows=None):
        if self.fused:
            gu = self.gate_up_proj(x, live_rows)
            gate, up = gu[:, : self.intermediate], gu[:, self.intermediate:]
        else:
            gate, up = self.gate_proj(x, live_rows), self.up_proj(x, live_rows)
        return self.down_proj(jax.nn.silu(gate) * up, live_rows)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, layout: WeightLayout):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs, layout=layout)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs, layout=layout)

    def __call__(self, layer: int, x, rope, attend: AttendFn, cache, live_rows=None):
        a, cache = self.self_attn(layer, self.input_layernorm(x), rope, attend, cache, live_rows)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x), live_rows), cache


class LlamaModel(nnx.Module):
    """The decoder stack; Hugging Face's `model.*` names."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, layout: WeightLayout):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs, layout=layout)
                                for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)


class LlamaForCausalLM(nnx.Module):
    """Hugging Face's `LlamaForCausalLM` (and its Mistral / Qwen2 / Qwen3 siblings)."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 layout: WeightLayout = HF_LAYOUT):
        self.config = cfg
        self.model = LlamaModel(cfg, dtype=dtype, rngs=rngs, layout=layout)
        # The tied head reads the embedding, [vocab, hidden] = [out, in]: on the native kernel
        # where the layout's products are [out, in] ones too.
        self.tied_head_native_rows = 0 if layout.in_out else layout.rows_on_native
        if cfg.tie_word_embeddings and not (layout.row_invariant and layout.in_out):
            self.lm_head = None  # the embedding, [vocab, hidden], doubles as the head
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype,
                                  rngs=rngs, in_out=layout.in_out,
                                  native_rows=layout.rows_on_native, panels=layout.panels)

    def hidden_states(self, token_ids, positions, attend: AttendFn, cache, rope=None,
                      live_rows=None):
        """token_ids i32[T], positions i32[T] -> (final-normed hidden [T, hidden], cache).
        `rope`: a `rope_table` covering every position; without it the angles are computed
        from `positions` (fine for the dense reference, slow inside a CPU step). `live_rows`
        i32[4] (s0, e0, s1, e1): the rows the caller reads are [s0, e0) and [s1, e1); the
        native kernel's products skip the others (their hidden states are then not the
        tokens'; finite). None: every row."""
        x = self.model.embed_tokens.weight[...][token_ids]
        if rope is None:
            angles = rope_angles(self.config.rope, self.config.head_dim, positions, x.dtype)
        else:
            angles = rope[positions]  # [T, 2, Dh/2]
        for i, layer in enumerate(self.model.layers):
            x, cache = layer(i, x, angles, attend, cache, live_rows)
        return self.model.norm(x), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [N, hidden] -> f32[N, vocab]."""
        if self.lm_head is None:
            return _dot_f32(hidden, self.model.embed_tokens.weight[...], in_out=False,
                            native_rows=self.tied_head_native_rows)
        head = self.lm_head
        return _dot_f32(hidden, head.weight[...], head.in_out, head.native_rows,
                        out_features=head.out_features)
