"""On-device sampling with per-slot parameters, and the logprobs that go back to the host.

A slot's random stream is `fold_in(PRNGKey(seed), tokens_generated)`: it depends only on the
request's own seed and progress, never on the slot it landed in or on its neighbours.
Logprobs are those of the model's distribution (before temperature and filtering), as vLLM
reports them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingInputs:
    temperature: jax.Array  # f32[S]; 0 = greedy
    top_k: jax.Array  # i32[S]; 0 = off
    top_p: jax.Array  # f32[S]; 1 = off
    min_p: jax.Array  # f32[S]; 0 = off
    seeds: jax.Array  # u32[S]
    gen_index: jax.Array  # i32[S]; output tokens the request has so far


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleOutput:
    tokens: jax.Array  # i32[S]
    logprobs: jax.Array  # f32[S]; logprob of the sampled token
    top_ids: jax.Array  # i32[S, K]
    top_logprobs: jax.Array  # f32[S, K]


def _sorted_keep(scaled: jax.Array, p: SamplingInputs) -> jax.Array:
    """bool[S, V] in vocabulary order: the tokens top-k and top-p leave (needs a sort)."""
    vocab = scaled.shape[-1]
    order = jnp.argsort(-scaled, axis=-1)  # i32[S, V], most likely first
    probs = jax.nn.softmax(jnp.take_along_axis(scaled, order, axis=-1), axis=-1)
    rank = jnp.arange(vocab, dtype=jnp.int32)[None, :]
    keep = rank < jnp.where(p.top_k > 0, p.top_k, vocab)[:, None]
    # top-p: keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep &= (jnp.cumsum(probs, axis=-1) - probs < p.top_p[:, None]) | (rank == 0)
    rows = jnp.arange(scaled.shape[0])[:, None]
    return jnp.zeros_like(keep).at[rows, order].set(keep)


def _filtered_sample(logits: jax.Array, p: SamplingInputs) -> jax.Array:
    """Samples every row from its temperature-scaled, top-k/top-p/min-p filtered distribution.

    Gumbel-max in vocabulary order, so a row's token depends only on its own logits, parameters
    and key: whether the batch needed the sort (some other row's top-k/top-p) cannot change it.
    """
    temp = jnp.where(p.temperature > 0, p.temperature, 1.0)
    scaled = logits / temp[:, None]
    probs = jax.nn.softmax(scaled, axis=-1)
    keep = probs >= p.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    # The sort costs more than a decode step's matmuls on a CPU: only when a row asks for it.
    needs_sort = jnp.any(p.top_k > 0) | jnp.any(p.top_p < 1)
    keep &= jax.lax.cond(needs_sort, lambda: _sorted_keep(scaled, p),
                         lambda: jnp.ones_like(keep))
    masked = jnp.where(keep, scaled, -jnp.inf)
    keys = jax.vmap(lambda s, g: jax.random.fold_in(jax.random.PRNGKey(s), g))(
        p.seeds, p.gen_index)
    return jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)


def _top_logprobs(logits, lse, num_top):
    values, ids = jax.lax.top_k(logits, num_top)  # the same order as the logprobs'
    return values - lse[:, None], ids


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first maximum; the first NaN where a row has one),
    as two plain reductions: XLA:CPU runs argmax's (value, index) reduce one element at a time
    (0.8 ms of a 16-row decode step over a 32k vocabulary), a max and a min of indices it
    vectorizes (about half that)."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    nan = jnp.isnan(logits)
    hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, logits == m)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def sample(logits: jax.Array, p: SamplingInputs, num_top: int, want_top: jax.Array = True,
           greedy_fn=greedy_tokens) -> SampleOutput:
    """logits f32[S, V] -> the sampled token per slot and its logprobs (top `num_top` too,
    when `want_top`: a top-k over the vocabulary every step is not free on a CPU).
    `greedy_fn`: `greedy_tokens` or a kernel giving the same indices (the native CPU one)."""
    logits = logits.astype(jnp.float32)
    # logprob = logit - logsumexp: materializing log_softmax over [S, vocab] cost a decode
    # step ~4 ms on the CPU for the one value per row (and top-k) that is read from it.
    lse = jax.nn.logsumexp(logits, axis=-1)
    greedy = greedy_fn(logits)
    # The sort costs far more than the model's last layer on a small vocab: skip it when every
    # slot is greedy, which is the common offline-evaluation case.
    tokens = jax.lax.cond(
        jnp.any(p.temperature > 0),
        lambda: jnp.where(p.temperature > 0, _filtered_sample(logits, p), greedy),
        lambda: greedy)
    s = logits.shape[0]
    top_logprobs, top_ids = jax.lax.cond(
        want_top, lambda: _top_logprobs(logits, lse, num_top),
        lambda: (jnp.zeros((s, num_top), logits.dtype), jnp.zeros((s, num_top), jnp.int32)))
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse
    return SampleOutput(tokens=tokens, logprobs=chosen, top_ids=top_ids.astype(jnp.int32),
                        top_logprobs=top_logprobs)
