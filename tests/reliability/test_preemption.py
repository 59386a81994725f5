"""Preemption through the real CLI: SIGTERM / SIGUSR1 save a checkpoint at the current step, then resume."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import cli, small

pytestmark = pytest.mark.integration


def signal_mid_training(args: list[str], sig: int, env: dict[str, str], group: bool = False) -> tuple[int, str]:
    """Start the CLI, wait until training is under way (the periodic checkpoint is far away), send `sig` (to the
    whole process group with `group`, as SLURM and `timeout` do: DataLoader workers get it too);
    returns the exit code and the whole log."""
    proc = subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=group)
    deadline, lines = time.time() + 180, []
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "Total params" in line or "Trainable params" in line:
            break
    time.sleep(4.0)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, "".join(lines) + out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_checkpoint_before_exit_and_resume_continues(tmp_path, sig):
    run_dir = tmp_path / "pre"
    args = small(f"paths.output_dir={tmp_path}", "run_name=pre", "callbacks=none", "checkpoint.every_n_steps=1000",
                 "trainer.max_steps=100000", "logger=none")
    code, log = signal_mid_training(args, sig, os.environ.copy())
    assert code == 143, log[-3000:]
    assert "preempted at step" in log
    last = run_dir / "checkpoints" / "last.ckpt"
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < step < 1000, "the checkpoint must come from the signal, not from the periodic schedule"
    res = subprocess.run(cli(*[a for a in args if not a.startswith("trainer.max_steps")],
                             f"trainer.max_steps={step + 2}"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"at step {step}" in res.stdout + res.stderr
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == step + 2


def test_sigterm_to_the_process_group_with_loader_workers_still_saves(tmp_path):
    """SLURM's scancel/preemption and `timeout` signal every process of the job, DataLoader workers included."""
    args = small(f"paths.output_dir={tmp_path}", "run_name=grp", "callbacks=none", "checkpoint.every_n_steps=1000",
                 "trainer.max_steps=100000", "logger=none", "data.num_workers=2")
    code, log = signal_mid_training(args, signal.SIGTERM, os.environ.copy(), group=True)
    assert code == 143, log[-3000:]
    assert "preempted at step" in log and "killed by signal" not in log
    step = torch.load(tmp_path / "grp" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)["global_step"]
    assert 0 < step < 1000


def test_slurm_signal_saves_then_requeues_the_job(tmp_path):
    """Under SLURM, SIGUSR1 (--signal=SIGUSR1@90) saves last.ckpt at a batch boundary, then rank 0 requeues the job
    with `scontrol requeue` (a stand-in on PATH records the call); the requeued job resumes from that checkpoint."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "dogs",
           "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1", "SLURM_JOB_NUM_NODES": "1"}
    env.pop("FOUNDRY_RUN_NAME", None)
    args = small(f"paths.output_dir={tmp_path}", "callbacks=none", "checkpoint.every_n_steps=1000",
                 "trainer.max_steps=100000", "logger=none")
    code, log = signal_mid_training(args, signal.SIGUSR1, env)
    assert code == 143, log[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    run_dir = tmp_path / "job-4242"  # SLURM runs are named after the job: the requeued job finds the same folder
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert 0 < step < 1000
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt")), "Lightning's mid-step SLURM checkpoint must stay off"
    res = subprocess.run(cli(*[a for a in args if not a.startswith("trainer.max_steps")], f"trainer.max_steps={step + 1}"),
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"at step {step}" in res.stdout + res.stderr
