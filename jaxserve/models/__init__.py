"""Llama-family models: NNX modules, the functional view the engine uses, and the dense oracle."""

from jaxserve.models.dense import forward_dense
from jaxserve.models.functional import bind, init_params
from jaxserve.models.llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM", "bind", "forward_dense", "init_params"]
