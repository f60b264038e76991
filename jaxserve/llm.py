"""The public offline API: `LLM`, `SamplingParams`, `RequestOutput` (vLLM's names)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from typing import Sequence as Seq

import numpy as np
from tqdm.auto import tqdm

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine import Engine
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve import scoring
from jaxserve.scoring import RollingScoreOutput, ScoreOutput, ScoreSummary
from jaxserve.validation import is_integer

log = logging.getLogger(__name__)

DEMO_MODEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model")


def engine_config(**options) -> EngineConfig:
    """EngineConfig from keyword options, naming any option it does not know."""
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
    return EngineConfig(**options)


def load_params(path: str, checkpoint: str | None, cfg: EngineConfig, *,
                allow_nonfinite_weights: bool = False):
    """(model config, params) from a Hugging Face folder: with a mesh, every tensor goes straight
    into its shards; with `checkpoint`, params are restored from orbax instead of safetensors.
    Weights holding NaN or Inf are refused unless `allow_nonfinite_weights`."""
    from jaxserve.models.functional import abstract_params
    from jaxserve.sharding import make_placement
    from jaxserve.weights import load_model, restore_checkpoint

    model_cfg = ModelConfig.from_pretrained(path)
    shardings = None
    if cfg.mesh_shape:
        shardings = make_placement(model_cfg, cfg.mesh_shape,
                                   abstract_params(model_cfg, cfg.dtype)).params
    if checkpoint:
        return model_cfg, restore_checkpoint(checkpoint, model_cfg, cfg.dtype, shardings)
    return load_model(path, dtype=cfg.dtype, shardings=shardings,
                      allow_nonfinite=allow_nonfinite_weights)


def run_to_completion(engine: Engine, total: int, *, progress: bool = True,
                      desc: str = "generate", **tqdm_kwargs) -> dict[str, RequestOutput]:
    """Steps `engine` until nothing is left; the finished outputs by request id."""
    done: dict[str, RequestOutput] = {}
    with tqdm(total=total, disable=not progress, desc=desc, unit="req",
              **tqdm_kwargs) as bar:
        while engine.has_unfinished():
            for out in engine.step(offline=True):  # every request is in: nothing arrives
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
    return done


class LLM:
    """Offline generation and scoring. `LLM()` loads the built-in demo model."""

    def __init__(self, model: str | None = None, *, checkpoint: str | None = None,
                 strict_compiles: bool = False, allow_nonfinite_weights: bool = False,
                 **engine_options):
        """`model`: a Hugging Face folder (None: the demo model). `checkpoint`: an orbax
        checkpoint of converted params (`jaxserve.cli.convert`) to restore instead of reading
        the safetensors, which is how a pod restarts fast; the config still comes from `model`.
        """
        from jaxserve.tokenizer import Tokenizer

        path = model or DEMO_MODEL_PATH
        cfg = engine_config(**engine_options)
        model_cfg, params = load_params(path, checkpoint, cfg,
                                        allow_nonfinite_weights=allow_nonfinite_weights)
        tokenizer = None
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            tokenizer = Tokenizer.from_pretrained(path)
        self.model_path = path
        self.engine = Engine(model_cfg, params, cfg, tokenizer, strict_compiles=strict_compiles)
        self._ids = itertools.count()
        self.last_score_summary: ScoreSummary | None = None

    @classmethod
    def from_params(cls, model_cfg: ModelConfig, params, tokenizer=None, *,
                    strict_compiles: bool = False, **engine_options) -> "LLM":
        """An LLM over params already in memory (tests, benchmarks, trained models)."""
        self = cls.__new__(cls)
        self.model_path = None
        self.engine = Engine(model_cfg, params, engine_config(**engine_options), tokenizer,
                             strict_compiles=strict_compiles)
        self._ids = itertools.count()
        self.last_score_summary = None
        return self

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def stats(self) -> dict:
        return self.engine.stats

    def generate(self, prompts: str | Seq[str] | None = None,
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
                 prompt_token_ids: Seq[int] | Seq[Seq[int]] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in input order."""
        texts, ids = self._inputs(prompts, prompt_token_ids)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, (SamplingParams, dict)):
            sampling_params = [sampling_params] * len(ids)
        if len(sampling_params) != len(ids):
            raise ValueError(f"{len(sampling_params)} sampling_params for {len(ids)} prompts")
        request_ids = [f"gen-{next(self._ids)}" for _ in ids]
        added = []
        try:
            for rid, text, tok, sp in zip(request_ids, texts, ids, sampling_params):
                self.engine.add_request(rid, tok, sp, prompt=text)
                added.append(rid)
        except Exception:
            for rid in added:  # leave the engine as it was: all or nothing
                self.engine.abort(rid)
            raise
        done = run_to_completion(self.engine, len(ids), progress=use_tqdm)
        return [done[rid] for rid in request_ids]

    def _inputs(self, prompts, prompt_token_ids) -> tuple[list[str | None], list[list[int]]]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompts or prompt_token_ids")
        if prompts is not None:
            if isinstance(prompts, str):
                prompts = [prompts]
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompt_token_ids")
            return list(prompts), [self.tokenizer.encode(p) for p in prompts]
        if isinstance(prompt_token_ids, np.ndarray) and prompt_token_ids.ndim != 2:
            prompt_token_ids = [prompt_token_ids]  # one prompt (add_request checks the rest)
        elif len(prompt_token_ids) and is_integer(prompt_token_ids[0]):
            prompt_token_ids = [prompt_token_ids]
        return [None] * len(prompt_token_ids), list(prompt_token_ids)

    # -- scoring -----------------------------------------------------------------------------

    def score(self, requests, *, add_bos: bool = True, use_tqdm: bool = True
              ) -> list[ScoreOutput]:
        """The log-likelihood of each `(context, continuation)` request (two strings, or two
        token-id lists; one pair alone is fine too), in input order.

        Text is tokenized like lm-eval (see `jaxserve.scoring`), with the BOS the tokenizer adds
        unless `add_bos=False`; an empty context stands as the BOS (else EOS) token. A ValueError naming the request and the bad value, before
        anything runs: an empty continuation, context + continuation over `max_model_len - 1`
        tokens, an item that is not a pair of strings or of token-id lists.

        Each request is an engine request asking the continuation's prompt logprobs only
        (`scoring.window_params`): its context may come from the prefix cache (a few-shot prefix
        shared by many items is computed once) and only the continuation's rows produce logits.
        Scores are the same to the bit with the cache on or off. The run's counts and time are
        in `last_score_summary`.
        """
        if _is_one_pair(requests):
            requests = [requests]
        tok, max_len = self.tokenizer, self.engine.cfg.max_model_len
        prefix = scoring.prefix_token_id(tok, self.engine.model_cfg.eos_token_ids)
        vocab = self.engine.model_cfg.vocab_size
        pairs, windows = [], []
        for i, req in enumerate(requests):
            ctx, cont = scoring.encode_pair(f"requests[{i}]", req, tok, prefix, vocab, add_bos)
            pairs.append((ctx, cont))
            windows.append(scoring.pair_window(f"requests[{i}]", ctx, cont, max_len))
        outs, wall, cached = self._run_windows(windows, "score", use_tqdm)
        results = [scoring.pair_output(o, w, ctx, cont)
                   for o, w, (ctx, cont) in zip(outs, windows, pairs)]
        self._summarize(len(results), windows, sum(len(c) for _, c in pairs), wall, cached)
        return results

    def score_rolling(self, documents, *, add_bos: bool = False, use_tqdm: bool = True
                      ) -> list[RollingScoreOutput]:
        """The log-likelihood of each whole document (a string, encoded without BOS unless
        `add_bos`, or a token-id list), in input order, for perplexity: lm-eval's
        `loglikelihood_rolling` (whose backends encode documents as the tokenizer does by
        default, so its adapter passes `add_bos=True`).

        Documents longer than a window (`max_model_len - 1` tokens) are scored in several, each
        token exactly once (`jaxserve.scoring.rolling_windows`); length is never an error. The
        first token is predicted from the BOS token (else the EOS); a model with neither
        scores every token but the first. Caching and logits: as in `score` (a window's
        overlap with the previous one is context, and may come from the cache).
        """
        if isinstance(documents, str) or _is_ids(documents):
            documents = [documents]
        tok, max_len = self.tokenizer, self.engine.cfg.max_model_len
        prefix = scoring.prefix_token_id(tok, self.engine.model_cfg.eos_token_ids)
        vocab = self.engine.model_cfg.vocab_size
        docs, per_doc = [], []
        for i, doc in enumerate(documents):
            ids = scoring.encode_document(f"documents[{i}]", doc, tok, vocab, add_bos)
            docs.append(ids)
            per_doc.append(scoring.rolling_windows(ids, prefix, max_len))
        windows = [w for ws in per_doc for w in ws]
        outs, wall, cached = self._run_windows(windows, "score_rolling", use_tqdm)
        results, at = [], 0
        for ids, ws in zip(docs, per_doc):
            results.append(scoring.rolling_output(outs[at:at + len(ws)], ws, ids))
            at += len(ws)
        self._summarize(len(results), windows, sum(r.num_tokens for r in results), wall,
                        cached)
        return results

    def _run_windows(self, windows, desc: str, use_tqdm: bool
                     ) -> tuple[list[RequestOutput], float, int]:
        """Runs one engine request per window (all or nothing on a refused one): (outputs,
        wall time, tokens served from the prefix cache)."""
        t0 = time.perf_counter()
        hits = self.engine.stats["prefix_cache_hit_tokens"]
        request_ids = [f"{desc}-{next(self._ids)}" for _ in windows]
        added = []
        try:
            for rid, w in zip(request_ids, windows):
                self.engine.add_request(rid, w.token_ids, scoring.window_params(w))
                added.append(rid)
        except Exception:
            for rid in added:
                self.engine.abort(rid)
            raise
        done = run_to_completion(self.engine, len(windows), progress=use_tqdm, desc=desc)
        cached = self.engine.stats["prefix_cache_hit_tokens"] - hits
        return [done[rid] for rid in request_ids], time.perf_counter() - t0, cached

    def _summarize(self, n: int, windows, scored: int, wall: float, cached: int) -> None:
        self.last_score_summary = ScoreSummary(
            requests=n, engine_requests=len(windows), tokens_scored=scored,
            tokens=sum(len(w.token_ids) for w in windows),
            tokens_cached=cached,
            wall_s=wall)
        log.info("scored %d request(s), %d token(s) in %.2f s", n, scored, wall)


def _is_ids(x) -> bool:
    return (isinstance(x, np.ndarray) and x.ndim == 1) or (
        isinstance(x, (list, tuple)) and len(x) > 0 and is_integer(x[0]))


def _is_one_pair(x) -> bool:
    """One (context, continuation) request rather than a list of them (a request in the list
    is never a string or a token id, so this cannot misread a list)."""
    ids = lambda p: isinstance(p, np.ndarray) or (  # noqa: E731
        isinstance(p, (list, tuple)) and all(is_integer(t) for t in p))
    return (isinstance(x, (tuple, list)) and len(x) == 2
            and (all(isinstance(p, str) for p in x) or all(ids(p) for p in x)))
