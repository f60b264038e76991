"""The step: one static-shape jitted function over a packed chunk region of B prompt tokens
(shared by up to Sc sequences) + D decode slots.

`step_fn(params, cache, batch) -> (StepOutput, cache)` with the cache donated, so K/V are
written in place. Every executable is built ahead of time at start-up: the mixed step (chunks +
decodes) for each chunk-region size and the decode-only step (B = Sc = 0) for each decode size
(`EngineConfig.chunk_bucket_sizes` / `decode_bucket_sizes`), and a step runs in the smallest
that holds its work, so light load and decode-only steps do not pay for the full shape.
Nothing is compiled after that.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.attention import AttentionShape, attention_fn
from jaxserve.config import ModelConfig
from jaxserve.kv_cache import KVCache
from jaxserve.models.functional import bind
from jaxserve.models.llama import WeightLayout
from jaxserve.sampling import SampleOutput, SamplingInputs, greedy_tokens, sample


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
    """Everything one step reads; T = B + D rows, S = Sc + D sequences. Structure never varies.

    Sequence s < Sc owns chunk rows [q_starts[s], q_starts[s] + q_lens[s]) of the packed region
    [0, B) (each start a multiple of chunk_align); decode sequence Sc + d owns row B + d.
    """

    token_ids: jax.Array  # i32[T]
    # i32[T]; >= 0: take the token from the previous step's `next_tokens` at this index instead
    # (the host schedules step N+1 before step N's tokens have come back).
    prev_index: jax.Array
    positions: jax.Array  # i32[T]
    slot_mapping: jax.Array  # i32[T]; page * page_size + offset; padding -> page 0 (trash)
    q_starts: jax.Array  # i32[S]; first row of each sequence
    q_lens: jax.Array  # i32[S]; its rows in this step (0 = unused)
    kv_lens: jax.Array  # i32[S]; context length of each sequence after this step
    page_table: jax.Array  # i32[S, pages_per_seq]; unused entries 0
    sample_index: jax.Array  # i32[S]; the row whose logits each sequence samples from
    sampling: SamplingInputs  # per sequence
    # i32[B]; the next prompt token after each chunk row where its logprob is asked, else -1
    prompt_targets: jax.Array
    want_top_logprobs: jax.Array  # bool[]; computes the per-sequence top-K logprobs only if set
    # bool[]; some sequence samples. If not (a long prompt's chunks before its last), the
    # vocabulary product [S, hidden] x [hidden, vocab] is skipped (7 of the ~270 ms of a
    # 512-token step of the bench model, in a profile).
    any_samples: jax.Array
    # i32[4] (s0, e0, s1, e1): the rows in use, [s0, e0) of the chunk region and [s1, e1) of
    # the decode region (both filled from their start). The native kernel's products compute
    # only these (a 2,000-token prompt's last step fills 416 of 528 rows).
    live_rows: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutput:
    sample: SampleOutput  # per sequence
    next_tokens: jax.Array  # i32[Sc_max + D_max]; sampled tokens by global index, for the next step
    prompt_logprobs: jax.Array  # f32[B]; logprob of prompt_targets (0 where none)
    prompt_top_ids: jax.Array  # i32[B, K]
    prompt_top_logprobs: jax.Array  # f32[B, K]


# Prompt logprobs are computed for the rows that ask for them only, gathered into blocks of
# this many rows: the cost follows the rows asked for (scoring asks for a continuation's few
# rows, not the context's), and a row's logits always come from the same [block, hidden] x
# [hidden, vocab] product, whatever else the step holds. 64 rows keep the product on the
# skinny-matmul side of the CPU's native kernel and read the vocabulary matrix once per block.
PROMPT_LOGITS_BLOCK = 64


def _prompt_logprobs(model, hidden, targets, num_top):
    """hidden [N, hidden], targets i32[N] (-1: not asked) -> (f32[N], i32[N, K], f32[N, K]),
    zeros where not asked."""
    n = targets.shape[0]
    block = min(PROMPT_LOGITS_BLOCK, n)
    num_blocks = -(-n // block)
    wanted = targets >= 0
    # The asked rows first, then n (out of range: reads clamp, writes drop).
    rows = jnp.nonzero(wanted, size=num_blocks * block, fill_value=n)[0].astype(jnp.int32)

    def one_block(i, acc):
        idx = jax.lax.dynamic_slice(rows, (i * block,), (block,))
        safe = jnp.minimum(idx, n - 1)
        lp = jax.nn.log_softmax(model.logits(hidden[safe]), axis=-1)
        chosen = jnp.take_along_axis(lp, jnp.maximum(targets[safe], 0)[:, None], axis=-1)[:, 0]
        top_lp, top_ids = jax.lax.top_k(lp, num_top)
        return tuple(a.at[idx].set(v, mode="drop")
                     for a, v in zip(acc, (chosen, top_ids.astype(jnp.int32), top_lp)))

    init = (jnp.zeros((n,), jnp.float32), jnp.zeros((n, num_top), jnp.int32),
            jnp.zeros((n, num_top), jnp.float32))
    used_blocks = (wanted.sum() + block - 1) // block
    return jax.lax.fori_loop(0, used_blocks, one_block, init)


def step_fn(params: nnx.State, cache: KVCache, batch: StepBatch, prev_tokens: jax.Array,
            rope: jax.Array, *, model_cfg: ModelConfig, layout: WeightLayout,
            shape: AttentionShape, global_chunk_seqs: int, num_global_slots: int, backend: str,
            interpret: bool, num_top: int) -> tuple[StepOutput, KVCache]:
    """One step. `prev_tokens` i32[num_global_slots] is the previous step's `next_tokens`:
    every executable numbers sequences globally, chunk sequence i as i and decode slot d as
    `global_chunk_seqs` + d (the largest shape's Sc), so any step can read any step's tokens.
    `rope` is the model's `rope_table` up to max_model_len (built once by the engine)."""
    model = bind(model_cfg, params, layout)
    token_ids = jnp.where(batch.prev_index >= 0,
                          prev_tokens[jnp.maximum(batch.prev_index, 0)], batch.token_ids)
    attend_pages = attention_fn(backend, shape, interpret=interpret)
    greedy_fn = greedy_tokens
    if backend == "cpu":  # with the native attention, the native greedy kernel (same indices)
        from jaxserve.native.greedy import greedy_tokens as greedy_fn
    page = batch.slot_mapping // shape.page_size
    offset = batch.slot_mapping % shape.page_size

    def attend(layer, q, k, v, cache):
        # Write first, so a chunk reads its own tokens' K/V from the cache like any other.
        kc = cache.k.at[layer, page, offset].set(k.astype(cache.k.dtype))
        vc = cache.v.at[layer, page, offset].set(v.astype(cache.v.dtype))
        o = attend_pages(q, kc, vc, layer=layer, positions=batch.positions,
                         q_starts=batch.q_starts, q_lens=batch.q_lens, kv_lens=batch.kv_lens,
                         page_table=batch.page_table)
        return o, KVCache(k=kc, v=vc)

    hidden, cache = model.hidden_states(token_ids, batch.positions, attend, cache, rope,
                                        live_rows=batch.live_rows)

    def sampled():
        return sample(model.logits(hidden[batch.sample_index]), batch.sampling, num_top,
                      batch.want_top_logprobs, greedy_fn=greedy_fn)

    out = jax.lax.cond(batch.any_samples, sampled, lambda: jax.tree.map(
        lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(sampled)))
    sc, d = shape.max_chunk_seqs, shape.num_decode_slots
    next_tokens = (jnp.zeros((num_global_slots,), jnp.int32)
                   .at[:sc].set(out.tokens[:sc])
                   .at[global_chunk_seqs:global_chunk_seqs + d].set(out.tokens[sc:]))

    n = shape.chunk_tokens
    if n:
        prompt = _prompt_logprobs(model, hidden[:n], batch.prompt_targets, num_top)
    else:
        prompt = (jnp.zeros((0,), jnp.float32), jnp.zeros((0, num_top), jnp.int32),
                  jnp.zeros((0, num_top), jnp.float32))
    return StepOutput(out, next_tokens, *prompt), cache


def example_batch(shape: AttentionShape) -> StepBatch:
    """A batch of the right shapes and dtypes (every sequence unused): lowering and warm-up
    input, and the host's template for a real batch."""
    t, s, b = shape.num_tokens, shape.num_seqs, shape.chunk_tokens
    zi = lambda *dims: np.zeros(dims, np.int32)  # noqa: E731
    return StepBatch(
        token_ids=zi(t), prev_index=np.full(t, -1, np.int32), positions=zi(t),
        slot_mapping=zi(t), q_starts=zi(s), q_lens=zi(s), kv_lens=zi(s),
        page_table=zi(s, shape.pages_per_seq), sample_index=zi(s),
        sampling=SamplingInputs(
            temperature=np.zeros(s, np.float32), top_k=zi(s), top_p=np.ones(s, np.float32),
            min_p=np.zeros(s, np.float32), seeds=np.zeros(s, np.uint32), gen_index=zi(s)),
        prompt_targets=np.full(b, -1, np.int32),
        want_top_logprobs=np.bool_(False), any_samples=np.bool_(False),
        live_rows=np.array([0, t, t, t], np.int32))


@dataclasses.dataclass
class StepExecutables:
    """The ahead-of-time compiled steps, by shape: mixed steps by chunk-region size B (the
    largest with fewer decode rows: `EngineConfig.wide_chunk_regions`), decode-only steps by
    decode slots D (a shape with no chunk region serves as both)."""

    mixed: dict[int, tuple[jax.stages.Compiled, AttentionShape]]  # B -> (executable, shape)
    decode_only: dict[int, tuple[jax.stages.Compiled, AttentionShape]]  # D -> ...
    count: int  # executables actually compiled (counted as they are built)

    def pick(self, chunk_rows: int, num_decodes: int, mixed: bool):
        """(executable, shape) of the smallest step that holds this work: `chunk_rows` rows of
        the chunk region used beside `num_decodes` decodes (mixed), or `num_decodes` decode
        rows (decode-only)."""
        table, need = (self.mixed, chunk_rows) if mixed else (self.decode_only, num_decodes)
        size = min((k for k, (_, s) in table.items()
                    if k >= need and s.num_decode_slots >= num_decodes), default=None)
        assert size is not None, (chunk_rows, num_decodes, mixed, sorted(table))
        return table[size]

    def all(self):
        """Every distinct (executable, shape), for warm-up."""
        seen = {}
        for exe, shape in [*self.mixed.values(), *self.decode_only.values()]:
            seen[shape] = exe
        return [(exe, shape) for shape, exe in seen.items()]


def compile_steps(model_cfg: ModelConfig, layout: WeightLayout, params, cache: KVCache,
                  rope: jax.Array, shape: AttentionShape, *, backend: str, interpret: bool,
                  num_top: int, chunk_sizes: tuple[int, ...] = (),
                  decode_sizes: tuple[int, ...] = (),
                  wide_chunks: tuple[tuple[int, int], ...] = (),
                  placement=None) -> StepExecutables:
    """Compiles every step ahead of time (with a `sharding.Placement`, for its mesh): the mixed
    step for each chunk-region size in `chunk_sizes` (default: `shape`'s) with `shape`'s decode
    rows, one for each (chunk rows, decode rows) in `wide_chunks` (chunk regions larger than
    those, beside fewer decode rows), and the decode-only step for each size in `decode_sizes`
    (default: `shape`'s)."""
    num_global = shape.num_seqs
    prev = jax.ShapeDtypeStruct((num_global,), jnp.int32)
    built = {}

    def build(s: AttentionShape):
        if s in built:
            return built[s], s
        fn = functools.partial(step_fn, model_cfg=model_cfg, layout=layout, shape=s,
                               global_chunk_seqs=shape.max_chunk_seqs,
                               num_global_slots=num_global, backend=backend,
                               interpret=interpret, num_top=num_top)
        shardings = {}
        if placement is not None:
            rep = placement.replicated
            cache_sh = KVCache(k=placement.cache, v=placement.cache)
            shardings = dict(in_shardings=(placement.params, cache_sh, rep, rep, rep),
                             out_shardings=(rep, cache_sh))
        built[s] = jax.jit(fn, donate_argnums=(1,), **shardings).lower(
            params, cache, example_batch(s), prev, rope).compile()
        return built[s], s

    mixed = {b: build(dataclasses.replace(shape, chunk_tokens=b))
             for b in (chunk_sizes or (shape.chunk_tokens,))} if shape.chunk_tokens else {}
    if mixed:
        for b, d in wide_chunks:
            mixed[b] = build(dataclasses.replace(shape, chunk_tokens=b, num_decode_slots=d))
    decode = {d: build(dataclasses.replace(shape.decode_only(), num_decode_slots=d))
              for d in (decode_sizes or (shape.num_decode_slots,))}
    return StepExecutables(mixed=mixed, decode_only=decode, count=len(built))
