"""The console a person reads: a short run prints no library noise nobody can act on, no record twice, a plain
progress line when its output is a log file, and `foundry-train list` shows what runs are made of."""
import re
import subprocess

import pytest

from tests.conftest import cli, small
from train.ops.console import QUIET_LOGS, QUIET_WARNINGS

pytestmark = pytest.mark.integration

NOISE = [p for p, _ in QUIET_WARNINGS] + [p for _, p, _ in QUIET_LOGS] + [
    r"anonymous setting has no effect", r"DeprecationWarning", r"UserWarning", r"FutureWarning"]


def test_a_short_run_prints_progress_and_no_library_noise(tmp_path):
    res = subprocess.run(cli(*small(f"paths.output_dir={tmp_path}", "run_name=c", "logger=wandb",
                                    "callbacks.digits_eval.enabled=false", "trainer.enable_progress_bar=true")),
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = (res.stdout + res.stderr).splitlines()
    noisy = [line for line in lines if any(re.search(p, line) for p in NOISE)]
    assert not noisy, noisy
    records = [re.sub(r"^\[[^\]]*\]", "", line) for line in lines if line.startswith("[20")]
    assert len(records) == len(set(records)), "a log record printed twice"
    assert any("[foundry.progress]" in line and "step 4/4 (100%)" in line for line in lines)


def test_list_shows_experiments_methods_and_presets():
    res = subprocess.run(cli("list"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert re.search(r"^  dmd2 +DMD2", res.stdout, re.M) and "experiment=" in res.stdout
    assert "strategy=" in res.stdout and "model.preset= (UNet): " in res.stdout and "flux_micro" in res.stdout
