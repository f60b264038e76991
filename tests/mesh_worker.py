"""Run by tests/test_sharding.py in a fresh process with 8 fake CPU devices (XLA reads the
device count once, at start-up, so this cannot share the pytest process)."""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxserve import LLM, SamplingParams  # noqa: E402
from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.models import init_params  # noqa: E402

CFG = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=96, hidden_size=64,
                  intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8,
                  max_position_embeddings=64, attention_bias=True)
HF_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 96, "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8,
             "num_key_value_heads": 4, "head_dim": 8, "max_position_embeddings": 64,
             "rope_theta": 10000.0, "rms_norm_eps": 1e-6}
OPTS = dict(chunk_size=16, max_chunk_seqs=3, chunk_align=2, chunk_buckets=1,
            decode_buckets=1, max_decode_slots=3, page_size=4, num_pages=40,
            max_model_len=64, max_logprobs=3, weight_layout="hf")


def run(mesh_shape: str) -> dict:
    llm = LLM.from_params(CFG, init_params(CFG, seed=3), strict_compiles=True,
                          mesh_shape=mesh_shape, **OPTS)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CFG.vocab_size, size=n).tolist() for n in (1, 5, 8, 13, 21, 30)]
    outs = llm.generate(prompt_token_ids=prompts, use_tqdm=False, sampling_params=SamplingParams(
        max_tokens=5, temperature=0, ignore_eos=True, prompt_logprobs=0))
    specs = {}
    if llm.engine.runner.placement is not None:
        for path, v in nnx.to_flat_state(llm.engine.runner.params):
            specs[".".join(map(str, path))] = [str(v.get_value().sharding.spec),
                                                str(llm.engine.runner.placement.rules.spec(
                                                    ".".join(map(str, path)),
                                                    v.get_value().ndim))]
        specs["kv_cache"] = [str(llm.engine.runner.cache.k.sharding.spec),
                             str(llm.engine.runner.placement.rules.kv_cache_spec())]
    return {"tokens": [o.token_ids for o in outs],
            "prompt_logprobs": [[None if d is None else d[p[i]] for i, d in
                                 enumerate(o.prompt_logprobs)] for o, p in zip(outs, prompts)],
            "specs": specs, "stats": {k: llm.stats[k] for k in
                                      ("executables_compiled", "compiles_after_warmup")},
            "devices": len(jax.devices())}


def checkpoint_roundtrip(folder: str, mesh_shape: str) -> dict:
    """HF folder -> sharded load -> orbax save (sharded) -> restore into the mesh -> same tokens."""
    import tempfile

    from jaxserve.cli.make_bench_model import write_model
    from jaxserve.weights import save_checkpoint
    written = write_model(folder, HF_CONFIG, seed=3)
    assert written == CFG, "HF_CONFIG and CFG must describe the same model"
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3], list(range(20))]
    llm = LLM(folder, mesh_shape=mesh_shape, **OPTS)
    first = llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
    ckpt = os.path.join(tempfile.mkdtemp(), "ckpt")
    save_checkpoint(ckpt, llm.engine.runner.params)
    again = LLM(folder, checkpoint=ckpt, mesh_shape=mesh_shape, **OPTS)
    second = again.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
    q = again.engine.runner.params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"].get_value()
    return {"first": [o.token_ids for o in first], "second": [o.token_ids for o in second],
            "restored_spec": str(q.sharding.spec), "shards": len(q.addressable_shards)}


if __name__ == "__main__":
    if sys.argv[1] == "--checkpoint":
        print(json.dumps(checkpoint_roundtrip(sys.argv[2], sys.argv[3])))
    else:
        print(json.dumps({m: run(m) for m in sys.argv[1:]}))
