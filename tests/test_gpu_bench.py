"""benchmarks/gpu.py in its CPU dry run: the same code path as on a GPU (numerics, FSDP2 training from shards written
by the real writer with Composer's SpeedMonitor, the CUDA-only test run through pytest), sized for CPU.

    .venv/bin/python -m pytest -q tests/test_gpu_bench.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_dry_run_on_cpu(tmp_path):
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu (dry run)" and report["steps"] == 4
    assert 0 <= report["numerics"]["fp32 logits"] <= 1e-4 and report["numerics_ok"]   # eager flex vs sdpa forward
    assert list(report["train"]) == ["sdpa"]           # no FlexAttention backward on CPU
    t = report["train"]["sdpa"]
    assert t["tokens_per_sec"] > 0 and t["samples_per_sec"] > 0 and 0 < t["final_loss"] < 20
    assert t["fsdp2_modules"] >= 2                     # Composer wrapped the Blocks with FSDP2
    outcome, detail = report["cuda_test"]
    assert outcome == "skipped" and "test_model_glm.py" in detail, detail   # the CUDA test, skipped here
    assert "| sdpa: tokens/s, MFU |" in r.stdout and "test_flex_on_cuda_matches_official" in r.stdout


def test_gpu_benchmark_without_cuda_names_the_dry_run():
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})   # GPUs hidden, if any
    assert r.returncode != 0 and "no CUDA device here" in r.stderr and "--dry-run" in r.stderr
