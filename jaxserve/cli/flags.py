"""absl flags shared by the jaxserve binaries, mapped once onto the config dataclasses.

Defaults come from the dataclasses themselves, so they live in exactly one place.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from jaxserve.config import ATTENTION_BACKENDS, DTYPES, WEIGHT_LAYOUTS, EngineConfig
from jaxserve.sampling_params import SamplingParams

_E = EngineConfig
_S = SamplingParams


def define_engine_flags() -> None:
    flags.DEFINE_string("model", None, "Hugging Face model folder (default: the demo model).")
    flags.DEFINE_string("checkpoint", None,
                        "Orbax checkpoint of converted params to restore (jaxserve.cli.convert).")
    flags.DEFINE_string("mesh_shape", _E.mesh_shape,
                        "Device mesh, e.g. model=8 or data=2,model=4 ('' = one device).")
    flags.DEFINE_boolean("distributed", False,
                         "Call jax.distributed.initialize() first (multi-host TPU pods).")
    flags.DEFINE_integer("chunk_size", _E.chunk_size,
                         "Prompt tokens per step (the packed chunk region); 0 = no chunking.")
    flags.DEFINE_integer("max_chunk_seqs", _E.max_chunk_seqs,
                         "Most sequences whose prompt chunks share one step.")
    flags.DEFINE_integer("chunk_align", _E.chunk_align,
                         "Each chunk starts at a multiple of this many rows (1 = tight).")
    flags.DEFINE_integer("max_decode_slots", _E.max_decode_slots,
                         "Decode slots per step (= most sequences running at once).")
    flags.DEFINE_integer("chunk_buckets", _E.chunk_buckets,
                         "Chunk-region sizes compiled (k/n of --chunk_size, k = 1..n).")
    flags.DEFINE_integer("decode_buckets", _E.decode_buckets,
                         "Decode-step sizes compiled (halving from --max_decode_slots).")
    flags.DEFINE_integer("page_size", _E.page_size, "Tokens per KV-cache page.")
    flags.DEFINE_integer("num_pages", _E.num_pages, "KV-cache pages; 0 = enough for all slots.")
    flags.DEFINE_integer("max_model_len", _E.max_model_len,
                         "Longest sequence (prompt + output); 0 = the model's.")
    flags.DEFINE_enum("dtype", _E.dtype, DTYPES, "Weights and KV-cache dtype.")
    flags.DEFINE_enum("attention", _E.attention, ATTENTION_BACKENDS, "Attention backend.")
    flags.DEFINE_boolean("pallas_interpret", _E.pallas_interpret,
                         "Run Pallas kernels in interpret mode (CPU testing).")
    flags.DEFINE_integer("max_logprobs", _E.max_logprobs, "Most top logprobs a request may ask.")
    flags.DEFINE_integer("seed", _E.seed, "Seed for requests that give none.")
    flags.DEFINE_enum("weight_layout", _E.weight_layout, WEIGHT_LAYOUTS,
                      "Serving layout of the projection weights (auto: by platform).")
    flags.DEFINE_boolean("enable_prefix_caching", _E.enable_prefix_caching,
                         "Share and keep full KV pages of common prefixes (LRU eviction).")
    flags.DEFINE_boolean("async_scheduling", _E.async_scheduling,
                         "Launch step N+1 before reading step N back (throughput) instead of "
                         "reading each step back at once (latency under arrivals). Default: "
                         "pipelined where no request can arrive meanwhile (offline runs).")
    flags.DEFINE_boolean("batch_invariant", _E.batch_invariant,
                         "Bit-identical results whatever shares the step: every matmul on the "
                         "native row-invariant kernel (AVX-512 CPU). Unset: on where it can "
                         "run (float32, native kernels: no slower there), off elsewhere.")


def define_sampling_flags() -> None:
    flags.DEFINE_integer("max_tokens", _S.max_tokens, "Output tokens per request at most.")
    flags.DEFINE_float("temperature", _S.temperature, "0 = greedy.")
    flags.DEFINE_integer("top_k", _S.top_k, "0 = off.")
    flags.DEFINE_float("top_p", _S.top_p, "1 = off.")
    flags.DEFINE_float("min_p", _S.min_p, "0 = off.")
    flags.DEFINE_integer("sampling_seed", None, "Seed of every request (default: drawn).")
    flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
    flags.DEFINE_list("stop_token_ids", [], "Comma-separated stop token ids.")
    flags.DEFINE_boolean("ignore_eos", _S.ignore_eos, "Keep generating past EOS.")
    flags.DEFINE_integer("logprobs", None, "Top logprobs per output token.")
    flags.DEFINE_integer("prompt_logprobs", None, "Top logprobs per prompt token.")


def engine_options(fv: flags.FlagValues) -> dict:
    return {f.name: fv[f.name].value for f in dataclasses.fields(EngineConfig)}


# The flag that sets each SamplingParams field (where the names differ).
_SAMPLING_FLAG = {"seed": "sampling_seed"}


def sampling_defaults(fv: flags.FlagValues) -> dict:
    """The sampling flags as SamplingParams fields, each checked: a ValueError names the flag
    and its value (`--temperature=-1`, `--stop=` and `--stop_token_ids=a,b` are refused)."""
    ids = []
    for t in fv.stop_token_ids:
        try:
            ids.append(int(t))
        except ValueError:
            raise ValueError(f"--stop_token_ids: {t!r} is not a token id (an integer)") from None
    d = {
        "max_tokens": fv.max_tokens, "temperature": fv.temperature, "top_k": fv.top_k,
        "top_p": fv.top_p, "min_p": fv.min_p, "seed": fv.sampling_seed,
        "stop": tuple(fv.stop) or None, "stop_token_ids": tuple(ids) or None,
        "ignore_eos": fv.ignore_eos, "logprobs": fv.logprobs,
        "prompt_logprobs": fv.prompt_logprobs,
    }
    for name, value in d.items():
        try:
            SamplingParams(**{name: value})
        except ValueError as e:
            raise ValueError(f"--{_SAMPLING_FLAG.get(name, name)}: {e}") from None
    return d


def checked_engine_config(fv: flags.FlagValues, model_cfg=None) -> EngineConfig:
    """EngineConfig from the engine flags, checked (and, given the model's config, resolved
    against it) before anything loads or compiles."""
    cfg = EngineConfig(**engine_options(fv))
    if model_cfg is not None:
        cfg.resolve(model_cfg)
    if cfg.seed < 0:
        raise ValueError(f"--seed={cfg.seed} must be an integer >= 0")
    return cfg
