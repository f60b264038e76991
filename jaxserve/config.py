"""Frozen, validated configuration: the model (from a Hugging Face config.json) and the engine.

Defaults live here and only here; `cli/` maps flags onto these dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: `theta` plus the optional scaling of the `linear` or `llama3` kind."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in _SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope scaling type {self.rope_type!r}; jaxserve implements "
                f"{_SUPPORTED_ROPE_TYPES}")
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError(f"bad rope parameters: {self.theta=} {self.factor=}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on q/k/v (never on o)
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rope
    sliding_window: int | None = None  # only legal where it never bites (engine checks)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: "
                f"{SUPPORTED_ARCHITECTURES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be divisible by num_kv_heads="
                f"{self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        return _parse_hf_config(hf)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no config.json in model folder {str(path)!r}")
        hf = _read_json(config_path)
        if not isinstance(hf, dict):
            raise ValueError(f"{config_path!r} holds a JSON {type(hf).__name__}, not an object")
        extra = _read_generation_ids(path)
        if extra:
            hf = {**hf, **extra}
        try:
            return _parse_hf_config(hf)
        except KeyError as e:
            raise ValueError(f"{config_path!r} lacks the field {e.args[0]!r}") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{config_path!r}: {e}") from None


def _read_json(path: str):
    """A JSON file's content; a ValueError names the file when it is not JSON (or not UTF-8)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path!r} is not valid JSON: {e}") from None


def _read_generation_ids(path) -> dict[str, Any]:
    """generation_config.json may carry a richer eos list (Llama 3 instruct) than config.json."""
    gen_path = os.path.join(path, "generation_config.json")
    if not os.path.isfile(gen_path):
        return {}
    gen = _read_json(gen_path)
    if not isinstance(gen, dict):
        raise ValueError(f"{gen_path!r} holds a JSON {type(gen).__name__}, not an object")
    return {k: gen[k] for k in ("bos_token_id", "eos_token_id") if gen.get(k) is not None}


def _parse_rope(hf: dict[str, Any]) -> RopeConfig:
    # transformers 5.x writes a `rope_parameters` block that holds theta too; 4.x checkpoints
    # carry `rope_theta` plus an optional `rope_scaling` dict. Accept both.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("unsupported option partial_rotary_factor != 1.0")
    kwargs: dict[str, Any] = {"theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        kwargs["factor"] = float(merged["factor"])
    if rope_type == "llama3":
        kwargs["low_freq_factor"] = float(merged["low_freq_factor"])
        kwargs["high_freq_factor"] = float(merged["high_freq_factor"])
        kwargs["original_max_position_embeddings"] = int(
            merged["original_max_position_embeddings"])
    return RopeConfig(**kwargs)


def _eos_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _parse_hf_config(hf: dict[str, Any]) -> ModelConfig:
    archs = hf.get("architectures") or []
    if len(archs) != 1:
        raise ValueError(f"config.json must name exactly one architecture, got {archs!r}")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r}; supported: {SUPPORTED_ARCHITECTURES}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}; only 'silu' is implemented")
    if hf.get("mlp_bias"):
        raise ValueError("unsupported option mlp_bias=True")
    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or hidden // num_heads
    sliding = None
    if arch == "MistralForCausalLM":
        sliding = hf.get("sliding_window")
    elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and hf.get("use_sliding_window"):
        sliding = hf.get("sliding_window")
        # Qwen applies the window only above max_window_layers; refuse rather than guess.
        if sliding is not None and hf.get("max_window_layers", 0) < hf["num_hidden_layers"]:
            raise ValueError(
                f"unsupported option use_sliding_window=True with sliding_window={sliding}")
    attention_bias = bool(hf.get("attention_bias", arch == "Qwen2ForCausalLM"))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=_parse_rope(hf),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        qk_norm=arch == "Qwen3ForCausalLM",
        sliding_window=int(sliding) if sliding is not None else None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_tuple(hf.get("eos_token_id")),
    )


ATTENTION_BACKENDS = ("auto", "xla", "cpu", "pallas_tpu", "pallas_gpu")
# hf: Hugging Face's [out, in] projections as loaded; fused: q/k/v and gate/up fused;
# fused_in_out: fused and stored [in, out]; fused_native and fused_in_out_native: fused ([out,
# in], resp. [in, out]), with decode-sized products (<= 64 rows) on the native skinny matmul
# (jaxserve/native/matmul.cc, AVX-512 CPUs), which streams float32 [out, in] weights fastest;
# fused_panels: fused, stored as 16-column panels (shape [ceil(out / 16), in, 16], the lines in
# blocks of 256 inputs: see native/matmul.py to_panels) that the native kernel reads for every
# product (float32; prefill products 3-5% faster than fused_native's);
# auto: on a CPU that can build it fused_panels (float32) or fused_in_out_native (bfloat16),
# fused_in_out on another CPU, hf elsewhere.
WEIGHT_LAYOUTS = ("auto", "hf", "fused", "fused_in_out", "fused_native", "fused_in_out_native",
                  "fused_panels")
# The layouts batch_invariant can run with (the native kernel reads all three).
BATCH_INVARIANT_LAYOUTS = ("auto", "fused_native", "fused_in_out_native", "fused_panels")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The static shape of every step and the cache, fixed at start-up.

    One step holds a chunk region of `chunk_size` prompt tokens (the step's prefill token budget,
    Sarathi-Serve's "chunk size") plus `max_decode_slots` decode tokens; a step with fewer
    decodes gives the chunks the decode rows it leaves idle (`chunk_rows_beside`: 528 chunk
    rows with no decode, 520 beside up to 8, each one more executable), so a step never
    computes more than chunk_size + max_decode_slots rows and a prompt prefilling alone leaves
    none idle. The chunk region is
    packed: up to `max_chunk_seqs` sequences' prompt chunks share it back to back, each starting
    at a multiple of `chunk_align` rows, and one sequence may take all of it. `chunk_size=0`
    turns chunking off: the region is then `max_model_len` tokens and a prompt is prefilled whole
    in one step (the stalling baseline).
    """

    chunk_size: int = 512
    max_chunk_seqs: int = 8
    # Why align at all: the XLA reference gathers a sequence's keys once per block of this many
    # rows (1 would gather them per row); the padding it costs is at most chunk_align - 1 rows a
    # segment. 1 = pack tightly.
    chunk_align: int = 8
    max_decode_slots: int = 16
    # Steps compiled in several sizes so that light load does not pay for the full shape: the
    # chunk region in this many evenly spaced sizes (512: 128, 256, 384, 512) and the
    # decode-only step in halvings (16, 8); each step runs in the smallest that holds its
    # work. Even spacing bounds the padding a step computes to chunk_size / chunk_buckets rows
    # (halvings would waste up to half the region). 1 = one size each.
    chunk_buckets: int = 4
    decode_buckets: int = 2
    page_size: int = 16
    num_pages: int = 0  # 0: enough for every decode slot at max_model_len, plus the trash page
    max_model_len: int = 0  # 0: the model's max_position_embeddings
    dtype: str = "float32"
    attention: str = "auto"
    pallas_interpret: bool = False
    max_logprobs: int = 20
    seed: int = 0
    weight_layout: str = "auto"
    mesh_shape: str = ""  # e.g. "model=8" or "data=2,model=4"; "" = one device, no mesh
    # Full KV pages shared between sequences with the same prefix and kept after use (evicted
    # least recently used); see scheduler.py. A request asking prompt logprobs computes its
    # prompt from `prompt_logprobs_start - 1` on.
    enable_prefix_caching: bool = True
    # True: each `Engine.step()` launches step N+1 before reading step N back (the host plans
    # while the device runs). False: a step is read back in the call that launched it, so a
    # request added between calls joins the very next step (one step less to first token under
    # arrivals) at the cost of the host's planning time per step (~1-4 ms). None: pipelined
    # only where no request can arrive meanwhile (`step(offline=True)`: LLM.generate/score and
    # the CLIs; a server's loop stays unpipelined, vLLM's default).
    async_scheduling: bool | None = None
    # Every matmul on one row-invariant kernel (the native one, CPU with AVX-512), so a
    # request's tokens and logprobs are the same to the bit alone or in a crowd, in a mixed or
    # a decode-only step, prefix cached or computed (see WeightLayout.row_invariant). None
    # (default): on where it can run, float32 on one AVX-512 CPU with the native kernels, where
    # it costs nothing (the native tall path is as fast as XLA's dot at prefill sizes:
    # benchmarks/reproducibility.py); off elsewhere (bfloat16: XLA's AMX dot is 4-6x the
    # kernel's speed at prefill sizes; GPU, TPU, a mesh: no such kernel). False: prefill
    # products on XLA's dot. True: required (an error where it cannot run).
    batch_invariant: bool | None = None

    def __post_init__(self):
        integer = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        for name in ("max_chunk_seqs", "chunk_align", "max_decode_slots", "page_size",
                     "chunk_buckets", "decode_buckets"):
            value = getattr(self, name)
            if not integer(value) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name in ("chunk_size", "num_pages", "max_model_len", "max_logprobs"):
            value = getattr(self, name)
            if not integer(value) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative integer")
        if not integer(self.seed) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be an integer >= 0 (the engine's seed)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {DTYPES}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching={self.enable_prefix_caching!r} must be a "
                             f"bool")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling={self.async_scheduling!r} must be a bool or "
                             f"None (pipelined where no request can arrive meanwhile)")
        if self.batch_invariant is not None and not isinstance(self.batch_invariant, bool):
            raise ValueError(f"batch_invariant={self.batch_invariant!r} must be a bool or None "
                             f"(None: on where it is about free)")
        if self.batch_invariant:
            # It runs every matmul and attention on the native CPU kernels (one device).
            clash = [f"{name}={getattr(self, name)!r} (use {want})" for name, ok, want in (
                ("weight_layout",
                 self.weight_layout in BATCH_INVARIANT_LAYOUTS,
                 "'auto', 'fused_native', 'fused_in_out_native' or 'fused_panels'"),
                ("attention", self.attention in ("auto", "cpu"), "'auto' or 'cpu'"),
                ("mesh_shape", not self.mesh_shape, "''")) if not ok]
            if clash:
                raise ValueError(f"batch_invariant=True runs every matmul and attention on the "
                                 f"native CPU kernels, one device: it cannot be combined with "
                                 f"{', '.join(clash)}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={self.attention!r} must be one of {ATTENTION_BACKENDS}")
        if self.weight_layout not in WEIGHT_LAYOUTS:
            raise ValueError(
                f"weight_layout={self.weight_layout!r} must be one of {WEIGHT_LAYOUTS}")

    def resolve(self, model: ModelConfig) -> "EngineConfig":
        """Fills the 0 = automatic fields against a model and checks the combination."""
        max_len = self.max_model_len or model.max_position_embeddings
        if max_len > model.max_position_embeddings:
            raise ValueError(
                f"max_model_len={max_len} exceeds the model's max_position_embeddings="
                f"{model.max_position_embeddings}")
        if model.sliding_window is not None and max_len > model.sliding_window:
            raise ValueError(
                f"max_model_len={max_len} exceeds the model's sliding_window="
                f"{model.sliding_window}, which jaxserve does not implement; set "
                f"max_model_len <= {model.sliding_window}")
        # A budget above max_model_len is fine: packed chunks of several sequences fill it.
        if self.chunk_size % self.chunk_align:
            raise ValueError(f"chunk_size={self.chunk_size} must be a multiple of "
                             f"chunk_align={self.chunk_align}")
        pages_per_seq = math.ceil(max_len / self.page_size)
        num_pages = self.num_pages or 1 + self.max_decode_slots * pages_per_seq
        if num_pages - 1 < pages_per_seq:
            raise ValueError(
                f"num_pages={num_pages} is too small for one sequence of max_model_len="
                f"{max_len}: it needs {pages_per_seq} pages of page_size={self.page_size} "
                f"plus the reserved trash page")
        return dataclasses.replace(self, max_model_len=max_len, num_pages=num_pages)

    @property
    def chunk_tokens(self) -> int:
        """Rows of the chunk region, B: the budget, or max_model_len (rounded up to chunk_align)
        when chunking is off."""
        if self.chunk_size:
            return self.chunk_size
        return -(-self.max_model_len // self.chunk_align) * self.chunk_align

    def chunk_rows_beside(self, num_decodes: int) -> int:
        """Rows of the chunk region in a step holding `num_decodes` decodes: chunk_size plus the
        decode rows the step leaves idle (its decode region is the smallest decode-only size
        that holds them, or none), rounded down to chunk_align, so the step's rows stay within
        chunk_size + max_decode_slots (vLLM shares its max_num_batched_tokens the same way).
        chunk_tokens when chunking is off."""
        if not self.chunk_size:
            return self.chunk_tokens
        held = min(d for d in (0,) + self.decode_bucket_sizes if d >= num_decodes)
        return ((self.chunk_size + self.max_decode_slots - held)
                // self.chunk_align * self.chunk_align)

    @property
    def wide_chunk_regions(self) -> tuple[tuple[int, int], ...]:
        """(chunk rows, decode rows) of the mixed steps compiled for fewer decodes than
        max_decode_slots, whose chunk region is larger than chunk_size (528 rows with none and
        520 with 8 at the defaults)."""
        return tuple((self.chunk_rows_beside(d), d) for d in (0,) + self.decode_bucket_sizes
                     if self.chunk_rows_beside(d) > self.chunk_tokens)

    @property
    def chunk_bucket_sizes(self) -> tuple[int, ...]:
        """Chunk-region sizes compiled, ascending: k/n of the region for k = 1..n
        (n = chunk_buckets), each rounded up to a multiple of chunk_align."""
        b, a, n = self.chunk_tokens, self.chunk_align, self.chunk_buckets
        return tuple(sorted({min(b, -(-b * k // (n * a)) * a) for k in range(1, n + 1)}))

    @property
    def decode_bucket_sizes(self) -> tuple[int, ...]:
        """Decode-only step sizes compiled, ascending (halving from max_decode_slots)."""
        d = self.max_decode_slots
        return tuple(sorted({max(1, -(-d // (1 << i))) for i in range(self.decode_buckets)}))

    @property
    def pages_per_seq(self) -> int:
        return math.ceil(self.max_model_len / self.page_size)

    @property
    def num_seqs(self) -> int:
        """Sequences one step can hold: chunk sequences first, then decode slots."""
        return self.max_chunk_seqs + self.max_decode_slots
