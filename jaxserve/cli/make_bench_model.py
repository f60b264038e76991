"""jaxserve-make-bench-model: writes the random ≈125M-parameter Llama benchmarks run on.

  jaxserve-make-bench-model --out=bench_model [--seed=0] [--dtype=float32]

Hidden 768, intermediate 2048, 12 layers, 12 heads / 4 KV heads (head_dim 64), vocab 32000,
untied embeddings, max_position_embeddings 2048: 124.7M parameters. Written as a Hugging Face
folder (config.json + model.safetensors) that jaxserve and `transformers` both load, so anyone
can rerun the numbers in BENCHMARKS.md. The weights are seeded: the same seed gives the same file.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from jaxserve.config import DTYPES, ModelConfig

flags.DEFINE_string("out", "bench_model", "Folder to write (created if missing).")
flags.DEFINE_integer("seed", 0, "Seed of the random weights.")
flags.DEFINE_enum("dtype", "float32", DTYPES, "Dtype of the stored weights.")
FLAGS = flags.FLAGS

BENCH_HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048,
    "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
    "head_dim": 64, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
}


def write_model(path: str, hf_config: dict = BENCH_HF_CONFIG, seed: int = 0,
                dtype: str = "float32") -> ModelConfig:
    """Random params (`init_params`) for `hf_config`, saved as a Hugging Face folder."""
    from jaxserve.models import init_params
    from jaxserve.weights import save_safetensors

    cfg = ModelConfig.from_hf_dict(hf_config)
    os.makedirs(path, exist_ok=True)
    save_safetensors(path, init_params(cfg, seed=seed, dtype=dtype))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**hf_config, "torch_dtype": dtype}, f, indent=2)
    return cfg


def main(argv) -> None:
    del argv
    cfg = write_model(FLAGS.out, seed=FLAGS.seed, dtype=FLAGS.dtype)
    from jaxserve.bench.roofline import model_costs
    print(f"wrote {FLAGS.out}: {model_costs(cfg, FLAGS.dtype)['params'] / 1e6:.1f}M parameters "
          f"({FLAGS.dtype}, seed {FLAGS.seed})")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
