"""Scoring: the log-likelihood of a continuation after a context (`LLM.score`), and of whole
documents in windows (`LLM.score_rolling`, for perplexity), as lm-evaluation-harness asks them.

Both run on the engine's prompt-logprobs path: a scoring request is an engine request of the
sequence to score with `SCORE_PARAMS` (one greedy output token, prompt_logprobs=1) starting at
its first scored position (`prompt_logprobs_start`), and its `prompt_logprobs[i]` holds the
logprob of token i given tokens < i together with the top-1 token. The context before the
scored positions may come from the prefix cache and produces no logits. This module is the host side: turning inputs into token sequences (and windows),
checking them, and reading the results; it imports no jax.

Choices, following lm-evaluation-harness where it has one:

- Text pairs are tokenized like lm-eval's `_encode_pair`: trailing whitespace of the context
  moves to the front of the continuation, the whole text is encoded (with the BOS the model's
  tokenizer adds) and the continuation is what follows the context's own encoding, so no BOS is
  ever inside it and the scored tokens are the whole text's tokenization.
- A context that encodes to nothing (an empty string without a BOS, or an empty id list) is
  replaced by the prefix token, as lm-eval does: the tokenizer's BOS, else the first EOS id.
- `is_greedy`: every continuation token is the argmax of its position's log-softmax, ties going
  to the lowest token id (what `jax.lax.top_k` and greedy decoding pick): exact, never a
  comparison of logprob values.
- Rolling windows are lm-eval's `get_rolling_token_windows(context_len=1)` followed by
  `make_disjoint_window`: the first window predicts the document's first tokens from the prefix
  token, later ones predict the next block, each token exactly once; the last window reaches
  back to be full length. A window is at most `max_model_len - 1` tokens, the longest prompt
  the engine takes (it keeps room for the one token every request generates). Without a prefix
  token the first token of a document is not scored (`num_tokens` says how many were).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.validation import check_token_ids, show

# What every scoring request asks the engine: one greedy token (discarded) and, per scored
# prompt position, the actual token's logprob plus the top-1 (the argmax, for is_greedy).
SCORE_PARAMS = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, seed=0,
                              ignore_eos=True)


@dataclasses.dataclass(frozen=True)
class ScoreOutput:
    """The log-likelihood of one continuation given its context."""

    loglik: float  # sum of token_logprobs
    is_greedy: bool  # every continuation token was the argmax (greedy decoding would give it)
    token_logprobs: list[float]  # one per continuation token
    context_token_ids: list[int]
    continuation_token_ids: list[int]


@dataclasses.dataclass(frozen=True)
class RollingScoreOutput:
    """The log-likelihood of a whole document (perplexity = exp(-loglik / num_tokens))."""

    loglik: float  # sum of token_logprobs
    num_tokens: int  # tokens scored: every token of the document (not the first without prefix)
    token_logprobs: list[float]  # one per scored token, in document order
    token_ids: list[int]  # the document's tokens (no prefix token)
    num_windows: int


@dataclasses.dataclass(frozen=True)
class Window:
    """One engine request: `token_ids`, of which the last `num_scored` are scored."""

    token_ids: list[int]
    num_scored: int


@dataclasses.dataclass(frozen=True)
class ScoreSummary:
    requests: int  # inputs scored (pairs or documents)
    engine_requests: int  # windows for rolling scoring, = requests otherwise
    tokens_scored: int
    tokens: int  # every token of every engine request (contexts, window overlaps)
    tokens_cached: int  # of those, served from the prefix cache
    wall_s: float

    @property
    def tokens_computed(self) -> int:
        return self.tokens - self.tokens_cached

    @property
    def tokens_per_s(self) -> float:
        """Every engine request's tokens (cached or computed) per second."""
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def rows(self) -> list[tuple[str, str]]:
        return [("Requests", f"{self.requests}"), ("Engine requests", f"{self.engine_requests}"),
                ("Tokens scored", f"{self.tokens_scored}"),
                ("Tokens (from the prefix cache)", f"{self.tokens} ({self.tokens_cached})"),
                ("Wall time (s)", f"{self.wall_s:.2f}"),
                ("Tokens/s", f"{self.tokens_per_s:.1f}")]


def prefix_token_id(tokenizer, eos_token_ids: Sequence[int] = ()) -> int | None:
    """The token that stands for an empty context: the tokenizer's BOS, else the first EOS (the
    tokenizer's, else the model's), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        return int(bos)
    eos = list(getattr(tokenizer, "eos_token_ids", ()) or ()) + list(eos_token_ids)
    return int(eos[0]) if eos else None


def encode_pair(name: str, request, tokenizer, prefix: int | None, vocab_size: int,
                add_bos: bool = True) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one `(context, continuation)` request: two strings
    (encoded with the BOS the tokenizer adds, unless `add_bos` is False) or two token-id lists.
    A ValueError names `name` (e.g. "requests[3]"; "" for none) and the bad value."""
    at = f"{name}: " if name else ""
    if not isinstance(request, (tuple, list)) or len(request) != 2:
        raise ValueError(f"{name or 'request'}={show(request)} must be a (context, "
                         f"continuation) pair")
    context, continuation = request
    if isinstance(context, str) and isinstance(continuation, str):
        if tokenizer is None:
            raise ValueError(f"{at}this model has no tokenizer: give token-id lists")
        if not continuation:
            raise ValueError(f"{at}the continuation is empty (context={show(context)})")
        ctx, cont = _encode_text_pair(tokenizer, context, continuation, add_bos)
    elif isinstance(context, str) or isinstance(continuation, str):
        raise ValueError(f"{at}context and continuation must both be strings or both "
                         f"token-id lists, got {type(context).__name__} and "
                         f"{type(continuation).__name__}")
    else:
        ctx = check_token_ids(f"{name} context".lstrip(), context, vocab_size)
        cont = check_token_ids(f"{name} continuation".lstrip(), continuation, vocab_size)
    if not cont:
        raise ValueError(f"{at}the continuation {show(continuation)} is empty "
                         f"(context={show(context)})")
    if not ctx:
        if prefix is None:
            raise ValueError(f"{at}the context is empty and this model has no BOS or EOS "
                             f"token to stand for it")
        ctx = [prefix]
    return ctx, cont


def _encode_text_pair(tokenizer, context: str, continuation: str, add_bos: bool
                      ) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_bos=add_bos)
    ctx = tokenizer.encode(context, add_bos=add_bos)
    return ctx, whole[len(ctx):]


def pair_window(name: str, ctx: list[int], cont: list[int], max_model_len: int) -> Window:
    """The engine request that scores `cont` after `ctx`, or a ValueError when it is too long."""
    n = len(ctx) + len(cont)
    if n > max_model_len - 1:
        at = f"{name}: " if name else ""
        raise ValueError(
            f"{at}context + continuation is {n} tokens ({len(ctx)} + {len(cont)}); "
            f"max_model_len={max_model_len} scores at most {max_model_len - 1} (the engine "
            f"keeps room for one generated token)")
    return Window(ctx + cont, len(cont))


def encode_document(name: str, document, tokenizer, vocab_size: int, add_bos: bool = False
                    ) -> list[int]:
    """A document's tokens: a string (encoded without BOS unless `add_bos`, and then only if the
    tokenizer adds one) or a token-id list."""
    if isinstance(document, str):
        if tokenizer is None:
            raise ValueError(f"{name + ': ' if name else ''}this model has no tokenizer: give "
                             f"a token-id list")
        return tokenizer.encode(document, add_bos=add_bos)
    return check_token_ids(name, document, vocab_size)


def rolling_windows(token_ids: list[int], prefix: int | None, max_model_len: int
                    ) -> list[Window]:
    """lm-eval's rolling windows (context_len=1, made disjoint) over a document: every token
    (every one after the first when `prefix` is None) is scored by exactly one window."""
    if prefix is None:
        if len(token_ids) < 2:
            return []
        prefix, token_ids = token_ids[0], token_ids[1:]
    if not token_ids:
        return []
    m = max_model_len - 2  # a window's inputs; its tokens are m + 1 <= max_model_len - 1
    if m < 1:
        raise ValueError(f"max_model_len={max_model_len} is too short for rolling windows")
    n = len(token_ids)
    first = min(m, n)
    windows = [Window([prefix] + token_ids[:first], first)]
    predicted = first
    while predicted < n:
        scored = min(n - predicted, m)
        end = predicted + scored
        windows.append(Window(token_ids[end - m - 1:end], scored))
        predicted = end
    return windows


def window_params(window: Window) -> SamplingParams:
    """`SCORE_PARAMS` asking only the scored positions' logprobs: the context before them may
    come from the prefix cache, and only the scored rows produce logits."""
    start = len(window.token_ids) - window.num_scored
    return dataclasses.replace(SCORE_PARAMS, prompt_logprobs_start=start)


def window_scores(out: RequestOutput, window: Window) -> tuple[list[float], bool]:
    """(logprob of each scored token, whether each was the argmax) from a finished request.

    `prompt_logprobs[i]` is built as {top-1 id: its logprob, actual id: its logprob}, the
    actual token's entry written last, so the first key is the argmax (the actual token itself
    when it is the argmax: its entry then keeps its place and takes the same value)."""
    if out.finish_reason == "error":
        raise RuntimeError(f"request {out.request_id!r} failed in the engine: {out.error}")
    ids = window.token_ids
    logprobs, greedy = [], True
    for pos in range(len(ids) - window.num_scored, len(ids)):
        entry = out.prompt_logprobs[pos]
        logprobs.append(float(entry[ids[pos]]))
        greedy = greedy and next(iter(entry)) == ids[pos]
    return logprobs, greedy


def pair_output(out: RequestOutput, window: Window, ctx: list[int], cont: list[int]
                ) -> ScoreOutput:
    logprobs, greedy = window_scores(out, window)
    return ScoreOutput(loglik=float(sum(logprobs)), is_greedy=greedy, token_logprobs=logprobs,
                       context_token_ids=list(ctx), continuation_token_ids=list(cont))


def rolling_output(outs: list[RequestOutput], windows: list[Window], token_ids: list[int]
                   ) -> RollingScoreOutput:
    logprobs: list[float] = []
    for out, window in zip(outs, windows):
        logprobs += window_scores(out, window)[0]
    return RollingScoreOutput(loglik=float(sum(logprobs)), num_tokens=len(logprobs),
                              token_logprobs=logprobs, token_ids=list(token_ids),
                              num_windows=len(windows))
