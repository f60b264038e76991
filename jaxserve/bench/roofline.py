"""The machine's measured limits, and how close the run's steps came to them.

Peak compute is measured, not looked up: the best of a few large square GEMMs in the run's
dtype (jitted); memory bandwidth is measured two ways: the read bandwidth (the best of a few
jitted sums over a large array: reads only, what a decode step's weight streaming needs; XLA
splits the reduction over the CPU's cores: on the 2-core bench VM it reads ~31 GB/s where one core
reads ~16, see benchmarks/decode_bandwidth.py) and the copy bandwidth (a large elementwise `x + 1`
in place: one read and one write of every byte). Then

- MFU of mixed (chunked-prefill) steps = their model FLOPs / their wall time / measured GEMM FLOP/s.
  Model FLOPs per token = 2·(params outside the embedding and the lm_head) + attention
  (4·layers·heads·head_dim·context); the lm_head's 2·vocab·hidden is added for the tokens that
  sample, the only ones the engine computes logits for. A prompt token's context is not visible
  from outside the engine, so each prefill token is charged the run's mean prompt-attention cost
  (exact in total over the run).
- MBU of decode-only steps = (weight bytes + K/V bytes read) / their wall time / measured read
  GB/s (the copy GB/s where a caller's machine dict has no read probe),
  with the K/V read being each decode token's context (prompt + tokens so far) — the bytes the
  math needs, not what a padded attention implementation happens to touch.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.models.functional import abstract_params, to_jnp_dtype


def _best_time(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + first touch
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def _copy_time(nbytes: int, dtype, reps: int) -> tuple[float, int]:
    """Best time of an in-place `x + 1` over `nbytes` (the input donated, so no fresh output
    buffer is paged in each call), and the bytes it moves (read + write)."""
    step = jax.jit(lambda x: x + 1, donate_argnums=0)
    x = step(jnp.ones((nbytes // jnp.dtype(dtype).itemsize,), dtype))  # compile + first touch
    x.block_until_ready()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        x = step(x)
        x.block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best, 2 * x.size * x.dtype.itemsize


def _read_time(nbytes: int, dtype, reps: int) -> tuple[float, int]:
    """Best time of a jitted sum over `nbytes` (read once, nothing written), and the bytes read."""
    x = jnp.ones((nbytes // jnp.dtype(dtype).itemsize,), dtype)
    best = _best_time(jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), x, reps=reps)
    return best, x.size * x.dtype.itemsize


def default_sizes(platform: str) -> tuple[int, int]:
    """(GEMM side, copy bytes): big enough to reach the plateau, small enough to be quick."""
    if platform == "cpu":
        return 2048, 256 * 2**20
    return 8192, 2 * 2**30


def default_read_bytes(platform: str) -> int:
    """Read-probe size: past the caches (the bench VM reports a 480 MiB L3, shared with its
    host; 256 MiB already reads at DRAM speed there), the size of a small model's weights."""
    return 512 * 2**20 if platform == "cpu" else 2 * 2**30


def read_bandwidth(nbytes: int = 0, dtype: str = "float32", reps: int = 10) -> float:
    """The read probe alone: best GB/s of a jitted sum over `nbytes` (0: the platform's
    default size)."""
    nbytes = nbytes or default_read_bytes(jax.devices()[0].platform)
    s, moved = _read_time(nbytes, to_jnp_dtype(dtype), reps)
    return moved / s / 1e9


def gemm_gflops(n: int = 0, dtype: str = "float32", reps: int = 10) -> float:
    """The GEMM probe alone: best GFLOP/s of a jitted n x n x n matmul (0: the platform's
    default size)."""
    n = n or default_sizes(jax.devices()[0].platform)[0]
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    jdtype = to_jnp_dtype(dtype)
    a = jax.random.normal(ka, (n, n), jdtype)
    b = jax.random.normal(kb, (n, n), jdtype)
    return 2 * n**3 / _best_time(jax.jit(lambda a, b: a @ b), a, b, reps=reps) / 1e9


def measure_machine(dtype: str = "float32", *, matmul_n: int = 0, copy_bytes: int = 0,
                    reps: int = 10, read_bytes: int = 0) -> dict:
    """Platform facts plus measured matmul GFLOP/s, read GB/s and copy GB/s in `dtype`. Best of
    10: on a shared 2-core VM the best of 3 read 100-150 GFLOP/s for a GEMM whose best is ~200."""
    dev = jax.devices()[0]
    n0, b0 = default_sizes(dev.platform)
    n, nbytes = matmul_n or n0, copy_bytes or b0
    jdtype = to_jnp_dtype(dtype)
    gflops = gemm_gflops(n, dtype, reps)
    copy_s, moved = _copy_time(nbytes, jdtype, reps)
    read_n = read_bytes or default_read_bytes(dev.platform)
    read_s, read = _read_time(read_n, jdtype, reps)
    return {
        "platform": dev.platform, "device_kind": dev.device_kind,
        "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__, "dtype": dtype,
        "matmul_n": n, "matmul_gflops": gflops,
        "copy_bytes": nbytes, "mem_gbps": moved / copy_s / 1e9,
        "read_bytes": read_n, "read_gbps": read / read_s / 1e9,
    }


def best_machine(first: dict, second: dict) -> dict:
    """Two `measure_machine` results (before and after a run) as one: the higher of each rate.
    A VM's rates drift within minutes (a 2-core one here read 24 GB/s in one probe and 31 in
    the next), and a depressed probe would flatter every MFU and MBU against it."""
    best = dict(first)
    for key in ("matmul_gflops", "mem_gbps", "read_gbps"):
        if key in first and key in second:
            best[key] = max(first[key], second[key])
    best["probes"] = [{k: d[k] for k in ("matmul_gflops", "mem_gbps", "read_gbps") if k in d}
                      for d in (first, second)]
    return best


def model_costs(cfg: ModelConfig, dtype: str) -> dict:
    """Per-token FLOPs and per-step bytes of a model, from its parameter shapes."""
    total = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(
        abstract_params(cfg, dtype)))
    head = cfg.vocab_size * cfg.hidden_size
    embed = head  # the embedding table: a gather, no FLOPs, only the looked-up rows read
    body = total - embed - (0 if cfg.tie_word_embeddings else head)
    itemsize = jnp.dtype(to_jnp_dtype(dtype)).itemsize
    return {
        "params": total,
        "body_flops_per_token": 2 * body,
        "head_flops_per_sample": 2 * head,
        "attn_flops_per_context_token": 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim,
        "weight_bytes_per_step": (body + head) * itemsize,  # what every step must stream in
        "kv_bytes_per_context_token": 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
        * itemsize,
    }


def _prompt_attention_per_token(costs: dict, prompt_lens: list[int]) -> float:
    """Mean attention FLOPs of one prompt token: position p attends over p + 1 tokens."""
    total = sum(n * (n + 1) / 2 for n in prompt_lens)
    return costs["attn_flops_per_context_token"] * total / max(1, sum(prompt_lens))


def roofline(steps, prompt_lens: list[int], costs: dict, machine: dict, devices: int = 1
             ) -> dict:
    """MFU of mixed steps and MBU of decode-only steps over a run's `StepTiming`s, against
    `devices` times the one-device peaks of `machine` (an engine sharded over a mesh)."""
    attn_prompt = _prompt_attention_per_token(costs, prompt_lens)
    mixed = [s for s in steps if s.kind == "mixed"]
    decode = [s for s in steps if s.kind == "decode"]

    def flops(s) -> float:
        prefill_tokens = s.scheduled_tokens - s.decode_tokens
        return (costs["body_flops_per_token"] * s.scheduled_tokens
                + costs["head_flops_per_sample"] * s.sampled
                + costs["attn_flops_per_context_token"] * s.decode_context_tokens
                + attn_prompt * prefill_tokens)

    def bytes_read(s) -> float:
        return (costs["weight_bytes_per_step"]
                + costs["kv_bytes_per_context_token"] * s.decode_context_tokens)

    mixed_s = sum(s.duration_s for s in mixed)
    decode_s = sum(s.duration_s for s in decode)
    mixed_flops = sum(flops(s) for s in mixed)
    decode_bytes = sum(bytes_read(s) for s in decode)
    achieved_gflops = mixed_flops / mixed_s / 1e9 if mixed_s else float("nan")
    achieved_gbps = decode_bytes / decode_s / 1e9 if decode_s else float("nan")
    return {
        "mixed_steps": len(mixed), "decode_steps": len(decode),
        "mixed_step_ms_median": _median_ms(mixed), "decode_step_ms_median": _median_ms(decode),
        "mixed_gflops": achieved_gflops, "decode_gbps": achieved_gbps,
        "devices": devices,
        "mfu_prefill": achieved_gflops / (devices * machine["matmul_gflops"]),
        "mbu_decode": achieved_gbps / (devices * machine.get("read_gbps", machine["mem_gbps"])),
    }


def _median_ms(steps) -> float:
    return float(np.median([s.duration_s for s in steps]) * 1e3) if steps else float("nan")
