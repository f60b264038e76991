"""The optional peer: Hugging Face `transformers` generate on the same checkpoint and workload.

Never a dependency: `hf_available()` says whether torch and transformers import, and the CLI
prints why the peer was skipped otherwise. `generate` has no continuous batching, so the peer
runs the workload as an offline job in arrival order, in static batches of `batch_size`
(left-padded; every request in a batch generates the batch's longest output, EOS suppressed),
like vLLM's `benchmark_throughput --backend hf`. Only throughput compares; arrival times are
ignored, and throughput counts the tokens the requests asked for, not the padding.
"""

from __future__ import annotations

import json
import os
import sys
import time

from tqdm.auto import tqdm

from jaxserve.bench.workloads import BenchRequest


def hf_available() -> tuple[bool, str]:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return False, (f"--peer=hf needs torch and transformers ({e}); "
                       "pip install torch transformers, or drop --peer")
    return True, ""


def run_hf(model_path: str, requests: list[BenchRequest], *, batch_size: int,
           dtype: str = "float32", progress: bool = True) -> dict:
    import torch
    import transformers

    with open(os.path.join(model_path, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    cls = getattr(transformers, arch)  # no AutoConfig: config.json may lack "model_type"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    major = int(transformers.__version__.split(".")[0])
    kw = {"dtype": torch_dtype} if major >= 5 else {"torch_dtype": torch_dtype}
    model = cls.from_pretrained(model_path, **kw).eval()

    order = sorted(requests, key=lambda r: r.arrival_s)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    _generate(model, batches[0][:1], max_new=2)  # warm-up, untimed
    t0 = time.perf_counter()
    with tqdm(total=len(order), desc="hf peer", unit="req", file=sys.stderr,
              disable=not progress, leave=True) as bar:
        for batch in batches:
            _generate(model, batch, max_new=max(r.params.max_tokens for r in batch))
            bar.update(len(batch))
    wall = time.perf_counter() - t0
    prompt_tokens = sum(r.prompt_len for r in order)
    output_tokens = sum(r.params.max_tokens for r in order)
    return {"name": "hf", "transformers_version": transformers.__version__,
            "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
            "batch_size": batch_size, "num_requests": len(order), "duration_s": wall,
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "request_throughput_req_s": len(order) / wall,
            "output_throughput_tok_s": output_tokens / wall,
            "total_throughput_tok_s": (prompt_tokens + output_tokens) / wall}


def _generate(model, batch: list[BenchRequest], max_new: int) -> None:
    import torch

    width = max(r.prompt_len for r in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):  # left padding: every prompt ends at the same column
        ids[i, width - r.prompt_len:] = torch.tensor(r.prompt_token_ids)
        mask[i, width - r.prompt_len:] = 1
    p = batch[0].params
    sample = p.temperature > 0
    kwargs = dict(do_sample=sample, temperature=p.temperature, top_k=p.top_k,
                  top_p=p.top_p) if sample else dict(do_sample=False)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                       min_new_tokens=max_new, pad_token_id=0, use_cache=True, **kwargs)
