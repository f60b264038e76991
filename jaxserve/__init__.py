"""jaxserve: an LLM inference engine in JAX with chunked prefill and continuous batching."""
