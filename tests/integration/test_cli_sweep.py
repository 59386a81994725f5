"""Sweeps through the real CLI: an Optuna sweep file, failed trials, a W&B agent's run, and foundry-report.

Trials are micro models for a few steps; the real 4-trial digits sweep is test_digits_sweep_acceptance (slow).
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image

from tests.conftest import cli, small
from train.ops.report import load_run, wandb_records

pytestmark = pytest.mark.integration

SECRET = "local-0123456789abcdef0123456789abcdef01234567"  # looks like a W&B key
TOKEN = "tok-0123456789abcdefghij"  # a secret-looking override typed on the command line


def env_for(root: Path, **extra: str) -> dict:
    return {**os.environ, "WANDB_API_KEY": SECRET, "WANDB_DATA_DIR": str(root / "wandb-data"), **extra}


def run(args, root, timeout=600, **extra_env):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env_for(root, **extra_env))


def wandb_run_of(run_dir: Path) -> tuple[dict, list[dict]]:
    """The `run` record (name, group, job type, tags) and all records of the folder's one offline run."""
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one W&B offline run in {run_dir}, got {files}"
    records = wandb_records(files[0])
    return next(r["run"] for r in records if r["type"] == "run"), records


@pytest.fixture(scope="module")
def optuna_sweep(tmp_path_factory):
    """`foundry-train -m sweep=digits_lr_bs`, shrunk to 2 micro trials, logging to W&B offline."""
    out = tmp_path_factory.mktemp("optuna")
    res = run(cli("-m", "sweep=digits_lr_bs", *small(f"paths.output_dir={out}", "logger=wandb",
                                                      "hydra.sweeper.n_trials=2", "tracking.csv=false",
                                                      f"+tracking.api_token={TOKEN}")),
              out)
    return out, res


def test_optuna_sweep_trials_are_wandb_runs_in_one_group(optuna_sweep):
    out, res = optuna_sweep
    assert res.returncode == 0, res.stderr[-3000:]
    sweep_dir, = (out / "sweeps").iterdir()
    assert sweep_dir.name.startswith("digits_lr_bs-")
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    trials = summary["trials"]
    assert [t["status"] for t in trials] == ["COMPLETED", "COMPLETED"] and summary["direction"] == "maximize"
    for t in trials:
        run_dir = Path(t["run_dir"])
        assert run_dir.parent == sweep_dir and run_dir.name == t["run_name"]
        assert t["run_name"].startswith(f"digits_lr_bs-{t['num']}-optimizer.lr=")
        assert t["run_name"].endswith(",data.batch_size=8")
        assert json.loads((run_dir / "trial.json").read_text()) == t
        s = json.loads((run_dir / "summary.json").read_text())
        assert s["global_step"] == 4 and t["value"] == s["val/prompt_accuracy"]
        resolved = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
        assert resolved["paths"]["run_dir"] == str(run_dir) and resolved["trainer"]["max_steps"] == 4
        assert json.loads((run_dir / "git.json").read_text())["commit"]
    assert trials[0]["run_name"] != trials[1]["run_name"]
    assert summary["best"]["value"] == max(t["value"] for t in trials)
    assert yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())["best_value"] == \
        summary["best"]["value"]
    assert f"best: #{summary['best']['num']}" in res.stdout + res.stderr

    runs = [wandb_run_of(Path(t["run_dir"])) for t in trials]
    assert {r["run_group"] for r, _ in runs} == {sweep_dir.name}  # one group per sweep
    assert len({r["run_id"] for r, _ in runs}) == 2  # separate runs
    for (r, records), t in zip(runs, trials):
        assert r["display_name"] == t["run_name"] and r["job_type"] == "sweep-trial"
        assert {"sweep:digits_lr_bs", "method:denoise", "model:micro"} <= set(r["tags"])
        config = {k: v for rec in records if rec["type"] == "config" for k, v in rec["config"]["update"].items()}
        assert config["git"]["commit"] == json.loads((Path(t["run_dir"]) / "git.json").read_text())["commit"]
        artifacts = [rec["artifact"] for rec in records if rec["type"] == "artifact"]
        ckpts = next(a for a in artifacts if a["type"] == "model")
        assert {e["path"] for e in ckpts["manifest"]["contents"]} >= {"last.ckpt"}
        table = [rec["history"]["item"] for rec in records if rec["type"] == "history"
                 and "samples/table.nrows" in rec["history"]["item"]]
        assert table[-1]["samples/table.nrows"] == 10  # 10 prompts x 1 seed, one row per sample
        assert [rec["exit"].get("exit_code", 0) for rec in records if rec["type"] == "exit"] == [0]


def test_sweep_never_writes_a_secret(optuna_sweep):
    out, res = optuna_sweep
    leaked = [p for p in out.rglob("*") if p.is_file() and (SECRET.encode() in p.read_bytes()
                                                             or TOKEN.encode() in p.read_bytes())]
    assert not leaked, f"secret written to {leaked}"
    assert SECRET not in res.stdout + res.stderr and TOKEN not in res.stdout + res.stderr
    assert "+tracking.api_token=<redacted>" in res.stdout  # Hydra's own trial line went through the filter


def test_report_compares_the_trials_from_their_wandb_logs(optuna_sweep, tmp_path):
    out, _ = optuna_sweep
    sweep_dir, = (out / "sweeps").iterdir()
    png = tmp_path / "report.png"
    res = run([sys.executable, "-m", "train.ops.report", str(sweep_dir), "--out", str(png)], out)
    assert res.returncode == 0, res.stderr[-2000:]
    assert Image.open(png).size[0] >= 1200 and SECRET not in res.stdout
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 0 ") or line.startswith("| 1 ")]
    assert len(rows) == 2 and all(row.rstrip().endswith("| wandb |") for row in rows)
    for trial_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        r = load_run(trial_dir)
        loss = r.curves["train/loss"]
        assert [s for s, _ in loss] == [0, 1, 2, 3]  # every step, read back from W&B's own log
        assert loss[-1][1] == pytest.approx(r.summary["train/loss"])
        assert r.grid and r.grid.name == "step_000004.png"


def test_a_failed_trial_is_reported_and_the_study_goes_on(tmp_path):
    # seed 0 draws lr=-1.0 (fails validation), then 0.002. (sampler=grid is avoided: hydra-optuna-sweeper 1.3.0
    # crashes with "Study.stop is supposed to be invoked inside an objective function" when a grid's last trial fails.)
    res = run(cli("-m", "hydra/sweeper=optuna_objective", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0",
                  "hydra.sweeper.n_trials=2", "optimizer.lr=choice(0.002,-1.0)",
                  *small(f"paths.output_dir={tmp_path}", "callbacks=none", "objective=train/loss",
                         "trainer.max_steps=2")), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    sweep_dir, = (tmp_path / "sweeps").iterdir()
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert summary["direction"] == "minimize" and (summary["n_completed"], summary["n_failed"]) == (1, 1)
    failed, done = summary["trials"]
    assert (failed["status"], done["status"]) == ("FAILED", "COMPLETED")  # the trial after the failure still ran
    assert failed["run_name"] == f"run-{failed['num']}-optimizer.lr=-1.0"
    assert failed["error"] == "ConfigError: optimizer.lr=-1.0: expected a positive number"
    assert summary["best"]["run_name"] == f"run-{summary['best']['num']}-optimizer.lr=0.002"
    assert "FAILED: ConfigError: optimizer.lr=-1.0" in res.stdout


def test_plain_grid_multirun_names_trials_and_fails_loudly(tmp_path):
    res = run(cli("-m", "optimizer.lr=-1.0,-2.0", *small(f"paths.output_dir={tmp_path}", "callbacks=none")), tmp_path)
    assert res.returncode != 0  # Hydra's basic sweeper re-raises a failed trial once all have run
    sweep_dir, = (tmp_path / "sweeps").iterdir()
    assert sweep_dir.name.startswith("multirun-")
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert [(t["run_name"], t["status"]) for t in summary["trials"]] == \
        [("run-0-optimizer.lr=-1.0", "FAILED"), ("run-1-optimizer.lr=-2.0", "FAILED")]
    assert summary["best"] is None


def test_a_wandb_agent_run_is_named_and_grouped_by_its_sweep(tmp_path, monkeypatch):
    """The command W&B's agent builds from `foundry-sweep wandb` output, run offline (no W&B server here)."""
    import wandb.wandb_agent as agent_mod

    from train.ops.sweep import SWEEP_DIR, build_wandb_sweep

    config, _ = build_wandb_sweep(SWEEP_DIR / "digits_lr_bs.yaml")
    for var in ("WANDB_DIR", "WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):
        monkeypatch.setenv(var, str(tmp_path) if var == "WANDB_DIR" else "x")
    launched = []
    monkeypatch.setattr(agent_mod, "AgentProcess",
                        lambda command=None, **kw: launched.append(command) or SimpleNamespace())
    agent = agent_mod.Agent(api=None, queue=None, sweep_id="abc123")
    agent._sweep_command = config["command"]
    agent._command_run({"type": "run", "run_id": "r1xyz", "program": config["program"],
                        "args": {"optimizer.lr": {"value": 0.0012}, "data.batch_size": {"value": 8}}})
    argv = launched[0]
    assert argv[1] == "foundry-train"
    # foundry-train is `python -m train.ops.main`; the test shrinks the trial after the agent's own arguments
    res = run(cli(*argv[2:], *small(f"paths.output_dir={tmp_path}", "logger=wandb", "logger.offline=false")),
              tmp_path, WANDB_MODE="offline", WANDB_SWEEP_ID="abc123", WANDB_RUN_ID="r1xyz")
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "digits_lr_bs-r1xyz"
    assert json.loads((run_dir / "summary.json").read_text())["val/prompt_accuracy"] >= 0
    record, records = wandb_run_of(run_dir)
    assert record["run_id"] == "r1xyz" and record["run_group"] == "digits_lr_bs-abc123"
    assert record["job_type"] == "sweep-trial" and record["display_name"] == "digits_lr_bs-r1xyz"
    config = {k: v for rec in records if rec["type"] == "config" for k, v in rec["config"]["update"].items()}
    assert config["optimizer"]["lr"] == 0.0012


def test_cfg_job_resolve_prints_the_resolved_config(tmp_path):
    res = run(cli("--cfg", "job", "--resolve", f"paths.output_dir={tmp_path}", "run_name=shown"), tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    printed = yaml.safe_load(res.stdout)
    assert printed["run_name"] == "shown" and printed["paths"]["run_dir"] == f"{tmp_path}/shown"
    assert not any(tmp_path.iterdir()), "--cfg must not start a run"


@pytest.mark.slow
def test_digits_sweep_acceptance(tmp_path):
    """The acceptance sweep as shipped: 4 Optuna trials of 300 tiny_pixel steps on the digits world."""
    res = run(cli("-m", "sweep=digits_lr_bs", f"paths.output_dir={tmp_path}", "trainer.enable_progress_bar=false"),
              tmp_path, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    sweep_dir, = (tmp_path / "sweeps").iterdir()
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert summary["n_completed"] == 4 and summary["best"]["value"] == max(t["value"] for t in summary["trials"])
    runs = [wandb_run_of(Path(t["run_dir"]))[0] for t in summary["trials"]]
    assert len({r["run_id"] for r in runs}) == 4 and {r["run_group"] for r in runs} == {sweep_dir.name}
    png = tmp_path / "report.png"
    assert run([sys.executable, "-m", "train.ops.report", str(sweep_dir), "--out", str(png)], tmp_path).returncode == 0
    assert Image.open(png).size[0] >= 1200
