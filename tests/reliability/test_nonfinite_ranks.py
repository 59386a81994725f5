"""A NaN skips the step on 2 ranks too (DDP, DeepSpeed ZeRO-2, ZeRO-3; gloo on CPU, through the real CLI).

One run per strategy walks every case: a non-finite loss on one rank only, then on every rank, then a non-finite
gradient on one rank only; each time the run goes on, every rank counts the skip, the weights after the skipped step
equal the weights before it, and the next step trains. Then three non-finite steps in a row stop the run
(`module.max_nonfinite_steps=3`) with its message, and the last checkpoint holds the good weights.
"""
import json
import os
import subprocess

import pytest
import torch

from tests.conftest import cli, small
from tests.helpers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.distributed]

LOSS_AT = ["1:1", "3:*", "7:*", "8:*", "9:*"]  # step 1: rank 1 only; step 3: every rank; 7-9: three in a row
GRAD_AT = ["5:0"]                              # step 5: rank 0's gradient only
SKIPPED = {1, 3, 5, 7, 8}                      # step 9 stops the run before its record is written


def records(path, rank):
    lines = (path.parent / f"{path.name}.rank{rank}.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage2", "deepspeed_stage3"])
def test_nonfinite_steps_are_skipped_on_every_rank(tmp_path, strategy):
    rec = tmp_path / "rec"
    args = small(f"paths.output_dir={tmp_path}", "run_name=diverge", f"strategy={strategy}", "trainer.accelerator=cpu",
                 "trainer.devices=2", "logger=csv", "callbacks=none", "data.batch_size=4", "trainer.max_steps=14",
                 "checkpoint.every_n_steps=2", "module.max_nonfinite_steps=3", "optimizer.lr=1e-3",
                 "+callbacks.nan._target_=tests.helpers.InjectNonFinite", f"+callbacks.nan.path={rec}",
                 f"+callbacks.nan.loss_at=[{','.join(map(repr, LOSS_AT))}]",
                 f"+callbacks.nan.grad_at=[{','.join(map(repr, GRAD_AT))}]")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.pop("FOUNDRY_RUN_NAME", None)
    res = subprocess.run(cli(*args), capture_output=True, text=True, timeout=600, env=env)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "3 consecutive non-finite steps (last: loss) at step 9" in out, out[-5000:]
    assert "Skipping the `training_step`" not in out
    ranks = [records(rec, r) for r in (0, 1)]
    assert sorted(ranks[0]) == sorted(ranks[1]) == list(range(1, 10)), "every rank ran steps 0-8 to the end"
    for step in range(1, 10):
        assert ranks[0][step]["digest"] == ranks[1][step]["digest"], f"ranks disagree on the weights after {step - 1}"
        assert ranks[0][step]["finite"]
        assert ranks[0][step]["skipped"] == ranks[1][step]["skipped"] == len([s for s in SKIPPED if s < step])
    for step in range(1, 9):  # record k holds the weights after optimizer step k-1
        same = ranks[0][step + 1]["digest"] == ranks[0][step]["digest"]
        assert same == (step in SKIPPED), f"step {step}: {'changed' if not same else 'left'} the weights"
    assert "non-finite gradient at step 5" in out, "the gradient case is told apart from the loss case"
    last = tmp_path / "diverge" / "checkpoints" / "last.ckpt"
    if last.is_dir():  # DeepSpeed: a folder of shards with its step beside it
        assert json.loads((last / "foundry.json").read_text())["global_step"] == 8
    else:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 8 and all(v.isfinite().all() for v in ckpt["state_dict"].values())
