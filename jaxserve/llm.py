"""The public offline API: `LLM`, `SamplingParams`, `RequestOutput` (vLLM's names)."""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Sequence as Seq

import numpy as np
from tqdm.auto import tqdm

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine import Engine
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.validation import is_integer

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


def run_to_completion(engine: Engine, total: int, *, progress: bool = True, **tqdm_kwargs
                      ) -> dict[str, RequestOutput]:
    """Steps `engine` until nothing is left; the finished outputs by request id."""
    done: dict[str, RequestOutput] = {}
    with tqdm(total=total, disable=not progress, desc="generate", unit="req",
              **tqdm_kwargs) as bar:
        while engine.has_unfinished():
            for out in engine.step():
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

    @classmethod
    def from_params(cls, model_cfg: ModelConfig, params, tokenizer=None, *,
                    strict_compiles: bool = False, **engine_options) -> "LLM":
        """An LLM over params already in memory (tests, benchmarks, trained models)."""
        self = cls.__new__(cls)
        self.model_path = None
        self.engine = Engine(model_cfg, params, engine_config(**engine_options), tokenizer,
                             strict_compiles=strict_compiles)
        self._ids = itertools.count()
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
