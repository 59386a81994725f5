"""Two CPU ranks (DDP over gloo on loopback) through the real CLI: one run directory, one set of outputs."""
import json
import os
import subprocess

import pytest

from tests.conftest import cli, small

pytestmark = [pytest.mark.integration, pytest.mark.distributed]


def test_two_ranks_share_one_run_directory(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1"}
    env.pop("FOUNDRY_RUN_NAME", None)
    res = subprocess.run(cli(*small(f"paths.output_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.devices=2",
                                    "strategy=ddp", "logger=csv", "trainer.max_steps=4")),
                         capture_output=True, text=True, timeout=400, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    runs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one run directory for both ranks, got {runs}"
    run = runs[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 4
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "samples").glob("*.png"))) == 2  # rank 0 only: one grid per sampling step
