"""The device side of the engine: params in their serving layout, the paged KV cache, the
compiled step executables, warm-up and the choice of attention backend and matmul.

`Engine` (the host loop) hands a built `StepBatch` to `Runner.run` and never touches a device
array itself, except to read a step's outputs back.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.attention import AttentionShape, resolve_backend
from jaxserve.config import BATCH_INVARIANT_LAYOUTS, EngineConfig, ModelConfig
from jaxserve.kv_cache import init_cache
from jaxserve.models.functional import (abstract_params, resolve_layout, to_jnp_dtype,
                                        to_layout)
from jaxserve.models.llama import WeightLayout, rope_table
from jaxserve.native.build import NativeBuildError
from jaxserve.sharding import make_placement, shard_params
from jaxserve.step import StepBatch, StepOutput, compile_steps, example_batch


class Runner:
    """Owns everything on the device. `cfg` must be resolved (`EngineConfig.resolve`)."""

    def __init__(self, model_cfg: ModelConfig, params, cfg: EngineConfig):
        self.model_cfg, self.cfg = model_cfg, cfg
        self.backend = resolve_backend(cfg.attention)
        dtype = to_jnp_dtype(cfg.dtype)
        leaf_dtype = jax.tree_util.tree_leaves(params)[0].dtype
        if leaf_dtype != dtype:
            raise ValueError(f"params are {leaf_dtype} but the engine was asked for "
                             f"dtype={cfg.dtype!r}; load the model with the same dtype")
        self.placement = None
        if cfg.mesh_shape:
            # The sharding table speaks Hugging Face's layout: a mesh keeps it.
            if cfg.weight_layout not in ("auto", "hf"):
                raise ValueError(f"weight_layout={cfg.weight_layout!r} cannot be combined with "
                                 f"mesh_shape={cfg.mesh_shape!r}; use 'hf' (or 'auto')")
            self.placement = make_placement(model_cfg, cfg.mesh_shape,
                                            abstract_params(model_cfg, cfg.dtype))
            if self.backend != "xla":
                if cfg.attention != "auto":
                    raise ValueError(f"attention={cfg.attention!r} cannot run on a mesh "
                                     f"(mesh_shape={cfg.mesh_shape!r}) yet: use attention='xla'")
                self.backend = "xla"  # XLA can split the reference across devices; a kernel, not
        # Converted once to the serving layout; the caller's params are left as they are.
        self.batch_invariant = self._resolve_batch_invariant()
        if self.batch_invariant:
            self.layout = dataclasses.replace(
                resolve_layout(cfg.weight_layout, "cpu", native_matmul=True, dtype=cfg.dtype),
                row_invariant=True)
        else:
            self.layout = resolve_layout("hf" if self.placement else cfg.weight_layout,
                                         native_matmul=self._native_matmul_available(),
                                         dtype=cfg.dtype)
        self.params = _serving_params(model_cfg, params, self.layout)
        if self.placement:
            self.params = shard_params(self.params, self.placement.params)
        self.num_top = max(1, min(cfg.max_logprobs, model_cfg.vocab_size))
        self.mixed_shape = AttentionShape(
            chunk_tokens=cfg.chunk_tokens, max_chunk_seqs=cfg.max_chunk_seqs,
            num_decode_slots=cfg.max_decode_slots, page_size=cfg.page_size,
            pages_per_seq=cfg.pages_per_seq, chunk_align=cfg.chunk_align)
        self.cache = init_cache(model_cfg, cfg, dtype,
                                self.placement.cache if self.placement else None)
        self.num_global_seqs = self.mixed_shape.num_seqs
        self._prev_tokens = jnp.zeros((self.num_global_seqs,), jnp.int32)
        self._rope = rope_table(model_cfg.rope, model_cfg.head_dim, cfg.max_model_len, dtype)
        if self.placement:
            self._prev_tokens = jax.device_put(self._prev_tokens, self.placement.replicated)
            self._rope = jax.device_put(self._rope, self.placement.replicated)
        t0 = time.perf_counter()
        self.executables = self._compile()
        self._warm_up()
        self.startup_compile_s = time.perf_counter() - t0

    def _native_matmul_available(self) -> bool:
        """Whether `weight_layout=auto` (or `fused_panels`, which only it reads) may use the
        native matmul: one CPU device, a CPU it supports (checked before building), and a build
        that succeeds (else logged)."""
        if (self.placement or jax.default_backend() != "cpu"
                or self.cfg.weight_layout not in ("auto", "fused_panels")):
            return False
        from jaxserve.native import matmul_build
        if not matmul_build.supported():
            return False
        try:
            matmul_build.load()
        except NativeBuildError as e:
            logging.warning("weight_layout=auto: the native matmul cannot be built here (%s); "
                            "using XLA's dot", e)
            return False
        return True

    def _resolve_batch_invariant(self) -> bool:
        """`EngineConfig.batch_invariant`, decided before anything is converted or compiled:
        False keeps XLA's dot for prefill products; None (default) turns it on for float32
        where the native kernels (matmul and attention) serve the model; True requires them and
        raises with the reason where they cannot run here."""
        cfg = self.cfg
        if cfg.batch_invariant is False:
            return False
        if cfg.batch_invariant is None and (
                cfg.dtype != "float32" or cfg.mesh_shape or cfg.attention not in ("auto", "cpu")
                or cfg.weight_layout not in BATCH_INVARIANT_LAYOUTS):
            return False  # (True with these is refused by EngineConfig)
        from jaxserve.native import build as native_build
        from jaxserve.native import matmul_build
        why = None
        if jax.default_backend() != "cpu":
            why = f"the default backend is {jax.default_backend()!r}, not the CPU"
        elif not matmul_build.supported():
            why = f"this CPU lacks {matmul_build.REQUIRED_FLAGS}"
        else:
            try:
                matmul_build.load()
                native_build.load()
            except NativeBuildError as e:
                why = f"a native kernel cannot be built here ({e})"
        if why and cfg.batch_invariant:
            raise ValueError(f"batch_invariant=True runs every matmul and attention on the "
                             f"native CPU kernels, but {why}; use batch_invariant=False")
        return why is None

    def _compile(self):
        build = functools.partial(
            compile_steps, self.model_cfg, self.layout, self.params, self.cache, self._rope,
            self.mixed_shape, interpret=self.cfg.pallas_interpret, num_top=self.num_top,
            chunk_sizes=self.cfg.chunk_bucket_sizes, decode_sizes=self.cfg.decode_bucket_sizes,
            wide_chunks=self.cfg.wide_chunk_regions, placement=self.placement)
        if self.cfg.attention == "auto" and self.backend != "xla":
            # Decided before compiling, from what is known: a kernel that cannot serve this
            # model here is replaced by the reference, and the log says why. A kernel that
            # passes these checks and then fails to compile is an error, not a slow run.
            reason = self._kernel_unfit()
            if reason:
                logging.warning("attention=auto: %s cannot serve this model (%s); using xla",
                                self.backend, reason)
                self.backend = "xla"
        return build(backend=self.backend)

    def _kernel_unfit(self) -> str | None:
        """Why the chosen kernel cannot serve this model here, or None: the native kernel must
        build; a Pallas kernel's trace-time shape rules (Triton's powers of two, TPU tiles) must
        hold for this model's shapes, checked by tracing attention alone (no compile)."""
        if self.backend == "cpu":
            from jaxserve.native import build as native_build
            try:
                native_build.load()
            except NativeBuildError as e:
                return str(e)
            return None
        from jaxserve.attention import attention_fn
        m, i32 = self.model_cfg, jnp.int32
        k = jax.ShapeDtypeStruct(self.cache.k.shape, self.cache.k.dtype)
        for shape in (self.mixed_shape, self.mixed_shape.decode_only()):
            t, s = shape.num_tokens, shape.num_seqs
            q = jax.ShapeDtypeStruct((t, m.num_heads, m.head_dim), self.cache.k.dtype)
            vec = lambda n: jax.ShapeDtypeStruct((n,), i32)  # noqa: E731
            try:
                attend = attention_fn(self.backend, shape, interpret=self.cfg.pallas_interpret)
                jax.eval_shape(
                    lambda q, k, v, kw: attend(q, k, v, layer=0, **kw), q, k, k,
                    dict(positions=vec(t), q_starts=vec(s), q_lens=vec(s), kv_lens=vec(s),
                         page_table=jax.ShapeDtypeStruct((s, shape.pages_per_seq), i32)))
            except ValueError as e:
                return str(e)
        return None

    def _warm_up(self) -> None:
        """Runs each executable once on an empty batch (it writes only the trash page; its
        sampling branch taken), so first-use work in the runtime happens at start-up, not in
        the first served step."""
        for exe, shape in self.executables.all():
            batch = dataclasses.replace(example_batch(shape), any_samples=np.bool_(True))
            jax.block_until_ready(self.run(exe, batch))

    @property
    def executables_compiled(self) -> int:
        return self.executables.count

    def pick(self, chunk_rows: int, num_decodes: int, mixed: bool):
        """The smallest compiled step that holds this work: (executable, its shape)."""
        return self.executables.pick(chunk_rows, num_decodes, mixed)

    def run(self, exe, batch: StepBatch) -> StepOutput:
        """Dispatches one step (asynchronously) on `exe` (from `pick`): the cache is updated in
        place and the sampled tokens stay on the device for the next step's reads."""
        out, self.cache = exe(self.params, self.cache, batch, self._prev_tokens, self._rope)
        self._prev_tokens = out.next_tokens
        return out


def _serving_params(model_cfg: ModelConfig, params, layout: WeightLayout):
    """`to_layout`, plus, for a row-invariant `[in, out]` layout of a model with tied
    embeddings, the head's `[in, out]` copy of the embedding (`lm_head`, so that every product
    reads one layout): one more vocab x hidden matrix in memory."""
    if not (layout.row_invariant and layout.in_out and model_cfg.tie_word_embeddings):
        return to_layout(model_cfg, params, layout)
    from flax import nnx
    base = to_layout(model_cfg, params, dataclasses.replace(layout, row_invariant=False))
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(base)}
    flat["lm_head.weight"] = flat["model.embed_tokens.weight"].T
    dtype = jax.tree_util.tree_leaves(base)[0].dtype
    return nnx.map_state(lambda p, v: v.replace(flat[".".join(map(str, p))]),
                         abstract_params(model_cfg, dtype, layout))
