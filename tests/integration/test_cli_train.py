"""foundry-train through the real CLI: run directory, checkpoints, samples, W&B offline, resume, export."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import cli, small

pytestmark = pytest.mark.integration


SECRET = "local-0123456789abcdef0123456789abcdef01234567"  # looks like a W&B key; must never be written anywhere


def run_cli(*args, timeout=300):
    env = {**os.environ, "WANDB_API_KEY": SECRET}
    return subprocess.run(cli(*small(*args)), capture_output=True, text=True, timeout=timeout, env=env)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_train_resume_and_export_end_to_end(tmp_path):
    run_dir = tmp_path / "e2e"
    res = run_cli(f"paths.output_dir={tmp_path}", "run_name=e2e", "logger=wandb",
                  "callbacks.throughput.log_every_n_steps=2", "callbacks.throughput.peak_tflops=0.001")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["step_000002.png", "step_000004.png"]
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb")), "no W&B offline run written"
    assert "train/loss" in (run_dir / "csv" / "metrics.csv").read_text(), "tracking.csv: no CSV beside W&B"
    from train.ops.report import read_csv_curves

    perf = read_csv_curves(run_dir / "csv" / "metrics.csv")
    tflops, mfu = dict(perf["perf/train_tflops_per_s"]), dict(perf["perf/mfu"])
    assert tflops and tflops.keys() == mfu.keys()
    assert all(v > 0 and mfu[s] == pytest.approx(v / 0.001, rel=1e-4) for s, v in tflops.items())
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    s = summary(run_dir)
    assert s["global_step"] == 4 and s["resumed_from"] is None
    assert 0.0 <= s["val/prompt_accuracy"] <= 1.0 and "val/frechet" in s
    assert (run_dir / "eval" / "digits_step_000004.json").is_file()
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked and SECRET not in res.stdout + res.stderr, f"W&B key written to {leaked}"

    # Re-launching the same run name resumes from last.ckpt and continues the step count.
    res = run_cli(f"paths.output_dir={tmp_path}", "run_name=e2e", "trainer.max_steps=6", "logger=csv")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stdout + res.stderr and "at step 4" in res.stdout + res.stderr
    s = summary(run_dir)
    assert s["global_step"] == 6 and s["resumed_from"].endswith("last.ckpt")
    from train.ops.report import read_csv_curves

    # the resumed run appended to the first run's metrics.csv instead of replacing it
    assert [step for step, _ in read_csv_curves(run_dir / "csv" / "metrics.csv")["train/loss"]] == list(range(6))

    # Export -> a diffusers folder that diffusers itself loads and samples from, offline.
    out = tmp_path / "exported"
    res = subprocess.run([sys.executable, "-m", "train.ops.export", str(run_dir), str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    images = pipe("a handwritten digit three", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and 0 <= images.min() and images.max() <= 1

    # foundry-sample from the checkpoint writes a grid
    grid = tmp_path / "grid.png"
    res = subprocess.run([sys.executable, "-m", "train.ops.sample", str(run_dir), "--prompt", "a handwritten digit one",
                          "--n", "2", "--steps", "2", "--out", str(grid)], capture_output=True, text=True)
    assert res.returncode == 0 and grid.is_file(), res.stderr[-2000:]


def test_sigkill_then_resume_continues_step_count(tmp_path):
    run_dir = tmp_path / "killed"
    args = [f"paths.output_dir={tmp_path}", "run_name=killed", "callbacks=none", "checkpoint.every_n_steps=5",
            "trainer.max_steps=100000", "logger=csv"]
    proc = subprocess.Popen(cli(*small(*args)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and not list((run_dir / "checkpoints").glob("step*.ckpt")):
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file(), "no checkpoint was written before the kill"
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert step >= 5 and step % 5 == 0
    res = run_cli(*args[:-2], f"trainer.max_steps={step + 3}", "logger=csv", "ckpt_path=last")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"at step {step}" in res.stdout + res.stderr
    assert summary(run_dir)["global_step"] == step + 3
    from train.ops.report import read_csv_curves

    # one history: what the killed run flushed before the checkpoint, then the resumed steps (never from 0 again,
    # never the killed run's rows past the checkpoint)
    import csv

    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        row_steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("step")]
    steps = [s for s, _ in read_csv_curves(run_dir / "csv" / "metrics.csv")["train/loss"]]
    assert steps[-3:] == [step, step + 1, step + 2] and max(row_steps) == step + 2
