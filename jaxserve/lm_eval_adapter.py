"""The lm-evaluation-harness backend `jaxserve`: lm-eval's three request kinds over `LLM`.

  lm_eval.simple_evaluate(model="jaxserve", model_args="pretrained=DIR,chunk_size=256", ...)
  jaxserve-lm-eval --model jaxserve --model_args pretrained=DIR --tasks ...

Importing this module registers the backend (lm-eval 0.4 finds no third-party model by
itself; `jaxserve-lm-eval` imports it before handing over to lm-eval's own command line).
`model_args`: `pretrained` (a Hugging Face folder; default the demo model), `checkpoint`,
`max_gen_toks` (default 256), `use_tqdm`, `add_bos_token` (lm-eval's: default None, every text
encoded as the tokenizer does; False: no BOS), and any `EngineConfig` option; an unknown key is a
ValueError naming it. Needs `pip install 'jaxserve[eval]'`.

- `loglikelihood` -> `LLM.score`: (summed logprob, every token greedy) per request.
- `loglikelihood_rolling` -> `LLM.score_rolling`: the summed logprob of every token.
- `generate_until` -> `LLM.generate`, greedy unless the task samples, stopping at `until`.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from jaxserve.llm import LLM
from jaxserve.sampling_params import SamplingParams


# lm-eval fills its registry with its own backends (hf, vllm, ...) only when it finds it
# empty: `lm_eval.models` is imported above so that registering jaxserve hides none of them.
@register_model("jaxserve")
class JaxserveLM(LM):
    def __init__(self, pretrained: str | None = None, checkpoint: str | None = None,
                 max_gen_toks: int = 256, use_tqdm: bool = True,
                 add_bos_token: bool | None = None, batch_size=None, device=None,
                 **engine_options):
        # batch_size and device come from lm-eval's own flags: the engine batches continuously
        # and runs where JAX runs, so neither means anything here.
        del batch_size, device
        super().__init__()
        self.llm = LLM(pretrained, checkpoint=checkpoint, **engine_options)
        self.max_gen_toks = int(max_gen_toks)
        self.use_tqdm = bool(use_tqdm)
        # lm-eval's meaning (its hf and vllm backends): None encodes every text as the tokenizer
        # does by default (with its BOS, if it adds one; rolling documents too), False without.
        self.add_bos = add_bos_token is None or bool(add_bos_token)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**args, **extra)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        outs = self.llm.score([tuple(r.args) for r in requests], add_bos=self.add_bos,
                              use_tqdm=self.use_tqdm)
        return [(o.loglik, o.is_greedy) for o in outs]

    def loglikelihood_rolling(self, requests) -> list[float]:
        outs = self.llm.score_rolling([r.args[0] for r in requests], add_bos=self.add_bos,
                                      use_tqdm=self.use_tqdm)
        return [o.loglik for o in outs]

    def generate_until(self, requests) -> list[str]:
        prompts, params = [], []
        for r in requests:
            context, gen_kwargs = r.args
            prompts.append(context)
            params.append(self._sampling(dict(gen_kwargs)))
        if self.add_bos:
            outs = self.llm.generate(prompts, params, use_tqdm=self.use_tqdm)
        else:
            ids = [self.llm.tokenizer.encode(p, add_bos=False) for p in prompts]
            outs = self.llm.generate(sampling_params=params, prompt_token_ids=ids,
                                     use_tqdm=self.use_tqdm)
        return [o.text for o in outs]

    def _sampling(self, kw: dict) -> SamplingParams:
        """lm-eval's gen_kwargs as SamplingParams: `until` strings stop (and are cut off, as
        lm-eval expects), `do_sample=False` or no temperature is greedy."""
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = int(kw.pop("max_gen_toks", self.max_gen_toks))
        do_sample = kw.pop("do_sample", None)
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        if do_sample is False:
            temperature = 0.0
        params = {k: kw.pop(k) for k in ("top_p", "top_k", "seed") if k in kw}
        if kw:
            raise ValueError(f"generate_until: gen_kwargs {sorted(kw)} are not supported; "
                             f"supported: until, max_gen_toks, do_sample, temperature, top_p, "
                             f"top_k, seed")
        return SamplingParams(max_tokens=max_tokens, temperature=temperature,
                              stop=tuple(s for s in until if s) or None, **params)
