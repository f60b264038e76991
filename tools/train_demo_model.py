"""Trains the small demo model shipped in `jaxserve/demo_model/` (a few million parameters).

The text is the Python standard library's own source, which every machine that runs Python has,
so the model can be rebuilt offline: a byte-level BPE tokenizer is trained on it with
`tokenizers`, then a Llama-architecture decoder (GQA, tied embeddings) with optax AdamW. The
result is an ordinary Hugging Face folder (config.json, model.safetensors, tokenizer files) that
`transformers` can load too, plus `training.json` recording how it was made.

    python tools/train_demo_model.py                       # the shipped model (~10 min, 2 cores)
    python tools/train_demo_model.py --measure 5           # tokens/s of a few steps, saves nothing

Initialisation, data order and batches are seeded and the file order is sorted. Training stops
at `--steps` or `--time-limit` seconds, whichever comes first, with the learning-rate schedule
annealing by the same measure, so the run fits its budget on a busy machine; only a step-bound
run (on a fast enough machine) is reproducible exactly (and the stdlib differs between Python
versions). The shipped model was time-bound on a shared 2-core machine: see training.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.models.dense import causal_attention  # noqa: E402
from jaxserve.models.functional import bind, init_params  # noqa: E402

BOS, EOS = "<s>", "</s>"
# Tests, third-party packages, codec tables (encodings/) and the platform's build config.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
              "encodings"}
_MAX_FILE_BYTES = 200_000  # skips generated tables (pydoc_data/topics.py, big codec maps)


def stdlib_files() -> list[tuple[str, str]]:
    """(relative path, text) of the stdlib's *.py files, in sorted path order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if (_SKIP_DIRS.intersection(rel.parts[:-1]) or rel.parts[0].startswith("config-")
                or path.stat().st_size > _MAX_FILE_BYTES):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            out.append((rel.as_posix(), text))
    return out


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Hugging Face's tokenizer adds BOS itself, as Llama's does.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tok


def token_stream(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """Every file as <s> text </s>, concatenated: EOS between files teaches the model to stop."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray([bos, *enc.ids, eos], np.int32))
    return np.concatenate(parts)


def make_loss_fn(cfg: ModelConfig):
    def seq_logits(params, ids):
        model = bind(cfg, params)
        positions = jnp.arange(ids.shape[0], dtype=jnp.int32)
        hidden, _ = model.hidden_states(
            ids, positions, lambda layer, q, k, v, cache: (causal_attention(q, k, v), cache), None)
        return model.logits(hidden)

    def row_losses(params, batch):  # batch i32[B, L + 1] -> f32[B] mean next-token loss
        logits = jax.vmap(seq_logits, in_axes=(None, 0))(params, batch[:, :-1])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
        return losses.mean(axis=1)

    return row_losses


def hf_config(cfg: ModelConfig, bos_id: int, eos_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope.theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def hf_tensors(params) -> dict[str, np.ndarray]:
    """The nnx.State as {Hugging Face tensor name: array} (the paths are HF's names)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if keys[-1] == "value":  # nnx.Variable's own attribute, not part of the name
            keys = keys[:-1]
        out[".".join(keys)] = np.ascontiguousarray(np.asarray(leaf, np.float32))
    return out


def save_folder(out_dir: pathlib.Path, cfg: ModelConfig, params, tok: Tokenizer,
                record: dict) -> None:
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    write = lambda name, obj: (out_dir / name).write_text(json.dumps(obj, indent=2) + "\n")
    write("config.json", hf_config(cfg, bos_id, eos_id))
    write("generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id})
    write("tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    })
    tok.save(str(out_dir / "tokenizer.json"))
    save_file(hf_tensors(params), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    write("training.json", record)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1]
                                         / "jaxserve" / "demo_model"))
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--max-positions", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=360)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--heldout-every", type=int, default=20, help="every Nth file is held out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--time-limit", type=float, default=570.0,
                    help="training seconds at most: on a slow machine the schedule anneals by "
                         "the clock and fewer steps run (recorded in training.json)")
    ap.add_argument("--measure", type=int, default=0,
                    help="only time this many steps after compiling; save nothing")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    files = stdlib_files()
    heldout = [t for i, (_, t) in enumerate(files) if i % args.heldout_every == 0]
    train = [t for i, (_, t) in enumerate(files) if i % args.heldout_every != 0]
    print(f"{len(train)} train files ({sum(map(len, train)) / 1e6:.1f} MB), "
          f"{len(heldout)} held out", flush=True)
    t0 = time.perf_counter()
    tok = train_tokenizer(train, args.vocab)
    train_ids, heldout_ids = token_stream(tok, train), token_stream(tok, heldout)
    tok_seconds = time.perf_counter() - t0
    print(f"tokenizer: {tok.get_vocab_size()} tokens in {tok_seconds:.1f}s; "
          f"{train_ids.size} train / {heldout_ids.size} held-out tokens", flush=True)

    cfg = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=tok.get_vocab_size(),
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        max_position_embeddings=args.max_positions, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=tok.token_to_id(BOS),
        eos_token_ids=(tok.token_to_id(EOS),))
    params = init_params(cfg, seed=args.seed, dtype="float32")
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
    print(f"model: {n_params:,} parameters", flush=True)

    steps = args.measure + 1 if args.measure else args.steps
    time_limit = math.inf if args.measure else args.time_limit

    def learning_rate(step: int, progress: float) -> float:
        """Linear warmup, then cosine from the peak to 0.1x over `progress` in [0, 1]."""
        warm = min(1.0, (step + 1) / args.warmup)
        return args.lr * warm * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0))))

    decay_mask = jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)
    # AdamW with the learning rate applied outside, so the schedule can follow the clock.
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.scale_by_adam(b1=0.9, b2=0.95),
        optax.add_decayed_weights(args.weight_decay, mask=decay_mask))
    opt_state = opt.init(params)
    row_losses = make_loss_fn(cfg)
    loss_fn = lambda params, batch: row_losses(params, batch).mean()

    @jax.jit
    def train_step(params, opt_state, batch, lr):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        updates = jax.tree_util.tree_map(lambda u: -lr * u, updates)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_loss = jax.jit(row_losses)
    rng = np.random.default_rng(args.seed)
    window = args.seq_len + 1

    def next_batch():
        starts = rng.integers(0, train_ids.size - window, size=args.batch)
        return jnp.asarray(np.stack([train_ids[s:s + window] for s in starts]))

    # Progress is the larger of steps done and training time used, so on a busy machine the
    # schedule still anneals fully, in fewer steps, inside the time limit (steps_done records
    # which); on an idle one the run is step-bound and deterministic.
    t_train = time.perf_counter()
    losses = []
    step, progress, lr = 0, 0.0, 0.0
    while progress < 1.0:
        lr = learning_rate(step, progress)
        params, opt_state, loss = train_step(params, opt_state, next_batch(), jnp.float32(lr))
        loss = float(loss)
        if step == 0:
            print(f"compiled + step 0 in {time.perf_counter() - t_train:.1f}s", flush=True)
            t_loop = time.perf_counter()
        else:
            losses.append(loss)
        step += 1
        progress = max(step / steps, (time.perf_counter() - t_train) / time_limit)
        if step % args.log_every == 0 or progress >= 1.0:
            recent = float(np.mean(losses[-args.log_every:]))
            rate = (step - 1) * args.batch * args.seq_len / (time.perf_counter() - t_loop)
            print(f"step {step}  progress {progress:.2f}  loss {recent:.3f}  lr {lr:.2e}  "
                  f"{rate:,.0f} tok/s", flush=True)
    steps_done = step
    jax.block_until_ready(params)
    train_seconds = time.perf_counter() - t_train
    if args.measure:
        rate = (steps_done - 1) * args.batch * args.seq_len / (time.perf_counter() - t_loop)
        print(f"measured {rate:,.0f} train tokens/s", flush=True)
        return

    # Held-out loss: every whole non-overlapping window of the held-out files (batches are
    # padded by repeating the last row, whose loss is then left out).
    n_eval = (heldout_ids.size - 1) // args.seq_len
    total = 0.0
    for i in range(0, n_eval, args.batch):
        rows = [heldout_ids[j * args.seq_len:j * args.seq_len + window]
                for j in range(i, min(i + args.batch, n_eval))]
        real = len(rows)
        rows += [rows[-1]] * (args.batch - real)
        per_row = eval_loss(params, jnp.asarray(np.stack(rows)))
        total += float(jnp.sum(per_row[:real]))
    heldout_loss = total / n_eval
    final_loss = float(np.mean(losses[-20:]))
    print(f"final train loss {final_loss:.3f}, held-out loss {heldout_loss:.3f} "
          f"({n_eval * args.seq_len} tokens); trained in {train_seconds:.0f}s", flush=True)

    record = {
        "parameters": n_params,
        "steps": steps_done,
        "steps_planned": steps,
        "stopped_by": "steps" if steps_done >= steps else "time limit",
        "batch_size": args.batch,
        "seq_len": args.seq_len,
        "tokens_trained": steps_done * args.batch * args.seq_len,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "final_train_loss": round(final_loss, 4),
        "heldout_loss": round(heldout_loss, 4),
        "heldout_tokens": n_eval * args.seq_len,
        "optimizer": {"name": "adamw", "peak_lr": args.lr, "warmup_steps": args.warmup,
                      "schedule": "linear warmup, cosine to 0.1x over max(step fraction, "
                                  "time fraction)", "time_limit_s": args.time_limit, "b1": 0.9, "b2": 0.95,
                      "weight_decay": args.weight_decay, "clip_global_norm": 1.0},
        "seed": args.seed,
        "data": {"source": "Python standard library *.py (tests excluded)",
                 "python_version": platform.python_version(),
                 "train_files": len(train), "heldout_files": len(heldout),
                 "heldout_every": args.heldout_every,
                 "train_tokens_available": int(train_ids.size),
                 "heldout_tokens_available": int(heldout_ids.size)},
        "tokenizer": {"type": "byte-level BPE", "vocab_size": tok.get_vocab_size(),
                      "train_seconds": round(tok_seconds, 1)},
        "machine": {"jax": jax.__version__, "backend": jax.default_backend(),
                    "cpu_count": os.cpu_count()},
        "command": " ".join(["python", "tools/train_demo_model.py", *(argv or sys.argv[1:])]),
    }
    save_folder(pathlib.Path(args.out), cfg, params, tok, record)
    print(f"saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
