"""jaxserve-convert: a Hugging Face folder -> an orbax checkpoint of converted params.

  python -m jaxserve.cli.convert --model=DIR --out=/path/ckpt [--dtype=bfloat16] [--mesh_shape=model=8]

With --mesh_shape the params are read straight into their shards and each host writes its own
part, so a pod restarts with `--checkpoint=/path/ckpt` without reading the safetensors again.
"""

from __future__ import annotations

import os

import jax
from absl import app, flags

from jaxserve.config import DTYPES, ModelConfig
from jaxserve.models.functional import abstract_params
from jaxserve.sharding import make_placement
from jaxserve.weights import load_model, save_checkpoint

flags.DEFINE_string("model", None, "Hugging Face model folder.", required=True)
flags.DEFINE_string("out", None, "Orbax checkpoint folder to write.", required=True)
flags.DEFINE_enum("dtype", "float32", DTYPES, "Dtype of the saved params.")
flags.DEFINE_string("mesh_shape", "", "Device mesh to shard over while converting.")
flags.DEFINE_boolean("distributed", False, "Call jax.distributed.initialize() first.")
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    if FLAGS.distributed:
        jax.distributed.initialize()
    shardings = None
    if FLAGS.mesh_shape:
        cfg = ModelConfig.from_pretrained(FLAGS.model)
        shardings = make_placement(cfg, FLAGS.mesh_shape,
                                   abstract_params(cfg, FLAGS.dtype)).params
    _, params = load_model(FLAGS.model, FLAGS.dtype, shardings)
    save_checkpoint(os.path.abspath(FLAGS.out), params)
    if jax.process_index() == 0:
        print(f"wrote {FLAGS.out}")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
