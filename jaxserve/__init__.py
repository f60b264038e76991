"""jaxserve: an LLM inference engine in JAX with chunked prefill and continuous batching."""

__all__ = ["LLM", "RequestOutput", "RollingScoreOutput", "SamplingParams", "ScoreOutput"]


def __getattr__(name: str):
    # Lazy, so host-only modules (the scheduler, the page allocator) import without jax.
    if name == "LLM":
        from jaxserve.llm import LLM
        return LLM
    if name == "RequestOutput":
        from jaxserve.outputs import RequestOutput
        return RequestOutput
    if name == "SamplingParams":
        from jaxserve.sampling_params import SamplingParams
        return SamplingParams
    if name in ("ScoreOutput", "RollingScoreOutput"):
        from jaxserve import scoring
        return getattr(scoring, name)
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
