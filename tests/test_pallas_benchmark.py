"""The GPU attention benchmark's correctness path runs on the CPU (interpret mode, tiny)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_attention_benchmark_tiny_check(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "pallas_gpu_attention", os.path.join(ROOT, "benchmarks", "pallas_gpu_attention.py"))
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    rc = bench.main(["--tiny", "--kinds=mixed", "--contexts=32", f"--json_out={out}"])
    assert rc == 0, capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["interpret"] and [r["kind"] for r in result["rows"]] == ["mixed"]
    assert all(r["ok"] for r in result["rows"])
