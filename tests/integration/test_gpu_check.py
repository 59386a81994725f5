"""The GPU check on a machine without one: `--dry-run` runs every stage's CPU stand-in (the same code paths at tiny
sizes: throughput and MFU, optimizers, a strategy run with the planner's figure, the digits demo's parsing, the gpu
tests' runner, block swap, quantized bases, the planner) into one JSON; without --dry-run every stage is skipped."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "benchmarks" / "gpu_check.py")
STAGES = ("throughput", "optimizers", "strategies", "host_syncs", "demo", "gpu_tests", "block_swap", "quantize",
          "planner")


def test_dry_run_exercises_every_stage_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    res = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--work", str(tmp_path / "work"), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [s for s in STAGES if "error" in r[s]] == [], {s: r[s] for s in STAGES if "error" in r[s]}
    for model in ("sd15_unet", "dit_xl2"):
        row = r["throughput"][model]
        assert row["eager"]["samples_per_s"] > 0 and row["compiled"]["samples_per_s"] > 0 and row["compile_speedup"]
    opts = r["optimizers"]
    assert opts["adamw_foreach"]["weights_finite"] and round(opts["adamw_fused"]["state_bytes_per_param"]) == 8
    assert opts["adamw8bit"]["skipped"].startswith("skipped: no CUDA device")
    assert r["strategies"]["single"]["steps"] == 4 and r["strategies"]["single"]["planned_gib"] > 0
    assert r["strategies"]["fsdp"] == {"skipped": "skipped: no CUDA device"}
    assert r["host_syncs"]["skipped"].startswith("skipped: no CUDA device")
    assert r["demo"]["completed"] and [s for s, _ in r["demo"]["prompt_accuracy_by_step"]] == [2, 4]
    assert "skipped" in r["gpu_tests"]["summary"] and r["gpu_tests"]["returncode"] == 0
    assert r["block_swap"]["identical_loss"] and r["quantize"]["int8"]["finite"]
    assert set(r["planner"]) == {"lora", "lora_checkpointing", "full"}


def test_without_cuda_every_stage_is_skipped(tmp_path):
    res = subprocess.run([sys.executable, SCRIPT, "--work", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout)
    assert all(r[s] == {"skipped": "skipped: no CUDA device"} for s in STAGES)
