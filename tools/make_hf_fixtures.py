"""Builds the tiny Hugging Face checkpoints and reference logits under tests/fixtures/hf/.

Needs torch and transformers (not jaxserve dependencies; only this script imports them):

    python tools/make_hf_fixtures.py [--out tests/fixtures/hf]

Each fixture is an HF folder (config.json + model.safetensors, or a sharded
model.safetensors.index.json) plus reference.npz holding prompts `ids_<i>` i32[T] and HF's float32
logits `logits_<i>` f32[T, vocab]. All weights are random, including norm weights and biases (not
ones / zeros), so that a missed norm, bias or transpose changes the logits. Deterministic: a fixed
seed per fixture, and the script re-loads every written folder with transformers'
`from_pretrained` and checks it reproduces the reference, so the files on disk are what HF reads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

PROMPT_LENGTHS = (1, 7, 33)
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

# name -> (model class, config overrides, options). options: shards (number of safetensors
# files, 1 = model.safetensors), disk_dtype, style ("v5": rope_parameters block as
# transformers 5 writes it; "v4": rope_theta + rope_scaling as 4.x checkpoints carry).
FIXTURES = {
    "llama_gqa": ("LlamaForCausalLM", dict(), dict()),
    # head_dim 16, theta 1e4: wavelengths 6, 20, 63, 199, ... against original_max 64 ->
    # high (< 16), medium (16..64) and low (> 64) frequency bands all occur.
    "llama3_rope": ("LlamaForCausalLM", dict(
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=64)), dict(style="v4")),
    "mistral_bf16": ("MistralForCausalLM", dict(sliding_window=None, head_dim=16),
                     dict(disk_dtype=torch.bfloat16)),
    "qwen2_bias": ("Qwen2ForCausalLM", dict(
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0)), dict(shards=3)),
    "qwen3_qknorm": ("Qwen3ForCausalLM", dict(head_dim=32),  # 4 heads * 32 != hidden 64
                     dict(disk_dtype=torch.bfloat16)),
    "llama_tied": ("LlamaForCausalLM", dict(
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=500000.0)), dict(style="v4")),
    "llama_mqa": ("LlamaForCausalLM", dict(num_key_value_heads=1, vocab_size=200),
                  dict(disk_dtype=torch.bfloat16)),
}


def randomize_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """O(1) activations throughout; norms and biases far from their ones / zeros defaults."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:  # [out, in] projections and the [vocab, hidden] embedding
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


def prompts(vocab: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = [rng.integers(0, vocab, size=n, dtype=np.int32) for n in PROMPT_LENGTHS]
    out[1][0], out[1][-1] = 0, vocab - 1  # the ends of the vocabulary
    return out


def logits_of(model, ids_list) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor(ids[None].astype(np.int64))).logits[0]
                .float().numpy() for ids in ids_list]


def config_json(model, style: str, disk_dtype: torch.dtype) -> dict:
    cfg = json.loads(model.config.to_json_string())
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = str(disk_dtype).removeprefix("torch.")
    if style == "v4":
        rope = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
        cfg["torch_dtype"] = cfg.pop("dtype")
        cfg["transformers_version"] = "4.46.0"
    return dict(sorted(cfg.items()))


def write_weights(path: str, tensors: dict[str, torch.Tensor], shards: int) -> None:
    meta = {"format": "pt"}
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata=meta)
        return
    names = sorted(tensors)
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, os.path.join(path, file), metadata=meta)
        weight_map.update({n: file for n in part})
        total += sum(tensors[n].numel() * tensors[n].element_size() for n in part)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        json.dump(index, f, indent=2)


def make(out_dir: str, name: str, seed: int) -> None:
    arch, overrides, opts = FIXTURES[name]
    model_cls = getattr(transformers, arch)
    config_cls = model_cls.config_class
    config = config_cls(**{**COMMON, **overrides})
    config._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize_(model, gen)
    disk_dtype = opts.get("disk_dtype", torch.float32)
    if disk_dtype != torch.float32:
        # The reference is the float32 forward of exactly the weights on disk.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(disk_dtype).float())
    ids = prompts(config.vocab_size, seed)
    ref = logits_of(model, ids)

    path = os.path.join(out_dir, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_json(model, opts.get("style", "v5"), disk_dtype), f, indent=2)
        f.write("\n")
    tensors = {k: v.detach().to(disk_dtype).contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight")  # as save_pretrained writes a tied model
    write_weights(path, tensors, opts.get("shards", 1))
    np.savez_compressed(os.path.join(path, "reference.npz"),
                        **{f"ids_{i}": x for i, x in enumerate(ids)},
                        **{f"logits_{i}": x for i, x in enumerate(ref)})

    # What HF itself reads back from these files must reproduce the reference.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(reloaded) is model_cls, (name, type(reloaded))
    for want, got in zip(ref, logits_of(reloaded, ids)):
        err = float(np.abs(want - got).max())
        assert err < 5e-5, (name, err)  # float32 rounding only
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(f"{name:14s} {arch:20s} |logits|max={max(np.abs(x).max() for x in ref):6.2f} "
          f"{size / 1024:7.1f} KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(
        os.path.dirname(__file__), "..", "tests", "fixtures", "hf"))
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for seed, name in enumerate(FIXTURES):
        make(args.out, name, seed)


if __name__ == "__main__":
    main()
