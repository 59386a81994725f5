"""Exact resume: an interrupted-and-resumed run sees the same samples in the same order as an uninterrupted
one, mid-epoch and across an epoch boundary, with 2 loader workers, and ends with the same weights (CPU, fp32)."""
import json
import os
import subprocess

import pytest
import torch

from tests.conftest import cli, small

pytestmark = pytest.mark.integration


def train(tmp_path, name, max_steps, extra=()):
    keys = tmp_path / f"{name}.jsonl"
    args = small(f"paths.output_dir={tmp_path}", f"run_name={name}", "callbacks=none", "logger=none",
                 "data.num_workers=2", "data.steps_per_epoch=5",
                 "lr_scheduler.name=constant", f"trainer.max_steps={max_steps}", "checkpoint.every_n_steps=7",
                 "+callbacks.ema._target_=callbacks.ema.EMA", "+callbacks.keys._target_=tests.helpers.RecordKeys",
                 f"+callbacks.keys.path={keys}", *extra)
    res = subprocess.run(cli(*args), capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in keys.read_text().splitlines()], res.stdout + res.stderr


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    keys, _ = train(tmp, "straight", 12)
    return tmp, keys


# 7: epoch 1, two batches into it; 5: the last batch of epoch 0 (the next epoch must be epoch 1, not epoch 0 again)
@pytest.mark.parametrize("stop", [7, 5])
def test_interrupted_run_sees_the_same_samples_and_ends_with_the_same_weights(tmp_path, straight, stop):
    straight_dir, straight = straight
    first, _ = train(tmp_path, "resumed", stop)
    resumed, log = train(tmp_path, "resumed", 12)       # same run name: resumes from last.ckpt, appends keys
    assert f"at step {stop}" in log and len(first) == stop
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, 13))
    assert [r["keys"] for r in resumed] == [r["keys"] for r in straight], "the resumed stream diverged"
    assert len({k for r in straight for k in r["keys"]}) > 8  # the test would be vacuous on a constant stream

    a = torch.load(straight_dir / "straight" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=0, atol=1e-6, msg=f"weights differ: {name}")
    ema_a = next(v for k, v in a["callbacks"].items() if k.startswith("EMA"))["shadow_params"]
    ema_b = next(v for k, v in b["callbacks"].items() if k.startswith("EMA"))["shadow_params"]
    for x, y in zip(ema_a, ema_b, strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
