"""Sweeps without training: objective direction, trial checks and summary, and the W&B sweep bridge."""
import json
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, ROOT
from train.ops.objective import SweepError, check_trial_launch, objective_direction, objective_value
from train.ops.sweep import (SWEEP_DIR, build_wandb_sweep, check_direction, main, swept_keys, trial_record,
                             wandb_violations, write_summary)

SWEEP_FILES = sorted(SWEEP_DIR.glob("*.yaml"))


@pytest.mark.parametrize("metric, direction", [
    ("val/prompt_accuracy", "maximize"), ("val/prompt_accuracy_g3", "maximize"), ("val/clip_score", "maximize"),
    ("train/loss", "minimize"), ("val/loss", "minimize"), ("val/frechet", "minimize"), ("val/fid", "minimize"),
])
def test_direction_follows_the_metric(metric, direction):
    assert objective_direction(metric) == direction


def test_unknown_metric_direction_is_one_clear_line():
    with pytest.raises(SweepError) as err:
        objective_direction("val/widgets")
    assert "objective='val/widgets'" in str(err.value) and "hydra.sweeper.direction" in str(err.value)
    assert "\n" not in str(err.value)


def test_objective_value_fails_a_trial_without_its_metric():
    assert objective_value({"val/prompt_accuracy": 0.5}, "val/prompt_accuracy", strict=True) == 0.5
    for summary in ({"train/loss": 0.3}, {"val/prompt_accuracy": float("nan")}):
        with pytest.raises(SweepError, match="objective=val/prompt_accuracy"):
            objective_value(summary, "val/prompt_accuracy", strict=True)
        assert objective_value(summary, "val/prompt_accuracy", strict=False) is None  # a single run still ends


def test_ddp_trials_under_an_in_process_multirun_are_refused():
    cfg = OmegaConf.create({"trainer": {"devices": 2, "num_nodes": 1}})
    with pytest.raises(SweepError, match="trainer.devices=2 under multirun.*submitit_slurm"):
        check_trial_launch(cfg, multirun=True, environ={})
    check_trial_launch(cfg, multirun=False, environ={})  # a single DDP run is fine
    check_trial_launch(cfg, multirun=True, environ={"SLURM_JOB_ID": "7"})  # submitit: one job per trial


def test_plain_optuna_direction_must_match_the_objective():
    cfg = OmegaConf.create({"objective": "val/prompt_accuracy", "hydra": {"sweeper": {"direction": "minimize"}}})
    with pytest.raises(SweepError, match="hydra/sweeper=optuna_objective"):
        check_direction(cfg)
    cfg.hydra.sweeper.direction = "maximize"
    check_direction(cfg)


def _job(tmp_path, num, status, value, overrides):
    from hydra.core.utils import JobReturn, JobStatus

    run_dir = tmp_path / f"trial{num}"
    run_dir.mkdir()
    cfg = OmegaConf.create({"run_name": f"trial{num}", "objective": "train/loss",
                            "hydra": {"job": {"num": num}, "runtime": {"output_dir": str(run_dir)}}})
    ret = JobReturn(overrides=overrides, status=JobStatus[status])
    ret.return_value = value
    record = trial_record(cfg, ret)
    (run_dir / "trial.json").write_text(json.dumps(record))
    return record


def test_summary_reports_best_and_failed_trials(tmp_path, monkeypatch):
    secret = "sk-0123456789abcdefghij"
    monkeypatch.setenv("SOME_API_TOKEN", secret)
    _job(tmp_path, 0, "COMPLETED", 0.30, ["optimizer.lr=0.001"])
    _job(tmp_path, 1, "FAILED", ValueError(f"optimizer.lr=-1.0: expected a positive number {secret}\nmore"),
         ["optimizer.lr=-1.0", f"+logger.api_key={secret}"])
    _job(tmp_path, 2, "COMPLETED", 0.20, ["optimizer.lr=0.002"])
    summary = write_summary(tmp_path, "train/loss", "minimize")
    assert (summary["n_trials"], summary["n_completed"], summary["n_failed"]) == (3, 2, 1)
    assert summary["best"]["num"] == 2 and summary["best"]["value"] == 0.20  # minimized
    failed = summary["trials"][1]
    assert failed["status"] == "FAILED" and failed["value"] is None
    assert failed["error"] == "ValueError: optimizer.lr=-1.0: expected a positive number <redacted>"
    assert json.loads((tmp_path / "sweep_summary.json").read_text()) == summary
    assert secret not in (tmp_path / "sweep_summary.json").read_text()
    assert write_summary(tmp_path, "train/loss", "maximize")["best"]["num"] == 0


@pytest.mark.parametrize("sweep_file", SWEEP_FILES, ids=[p.stem for p in SWEEP_FILES])
def test_wandb_bridge_gives_a_valid_sweep_with_program_and_arguments(sweep_file):
    config, n_trials = build_wandb_sweep(sweep_file, project="p")
    assert wandb_violations(config) == []
    from sweeps import SweepConfig  # imported (quietly) by wandb_violations

    SweepConfig(config)  # W&B's own loader accepts and fills it
    assert config["program"] == "train/ops/main.py" and (ROOT / config["program"]).is_file()
    assert config["command"] == ["${env}", "foundry-train", f"sweep={sweep_file.stem}", "logger=wandb",
                                 "logger.offline=false", "${args_no_hyphens}"]
    assert config["metric"] == {"name": "val/prompt_accuracy", "goal": "maximize"} and config["project"] == "p"
    file_params = OmegaConf.load(sweep_file).hydra.sweeper.params
    assert set(config["parameters"]) == set(file_params) and n_trials > 0
    assert config["method"] == "bayes"  # TPE
    lr = config["parameters"]["optimizer.lr"]
    assert lr["distribution"] == "log_uniform_values" and 0 < lr["min"] < lr["max"]


def test_acceptance_sweep_maps_the_batch_size_choice():
    config, n_trials = build_wandb_sweep(SWEEP_DIR / "digits_lr_bs.yaml")
    assert n_trials == 4 and config["parameters"]["data.batch_size"] == {"values": [16, 32, 64]}
    assert config["parameters"]["optimizer.lr"] == {"distribution": "log_uniform_values", "min": 5e-4, "max": 5e-3}


def test_wandb_schema_check_catches_bad_configs():
    config, _ = build_wandb_sweep(SWEEP_DIR / "lr.yaml")
    bad = json.loads(json.dumps(config))
    bad["parameters"]["optimizer.lr"].update(min=1e-2, max=1e-4)
    assert wandb_violations(bad)
    bad = {**config, "method": "tpe"}
    assert wandb_violations(bad)


def test_the_agent_runs_foundry_train_with_hydra_overrides(monkeypatch, tmp_path):
    """W&B's own agent code builds the command; Hydra composes it into the intended config."""
    import wandb.wandb_agent as agent_mod
    from hydra import compose, initialize_config_dir

    from train.ops.resolvers import register_resolvers

    config, _ = build_wandb_sweep(SWEEP_DIR / "digits_lr_bs.yaml")
    for var in ("WANDB_DIR", "WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):
        monkeypatch.setenv(var, str(tmp_path) if var == "WANDB_DIR" else "x")
    launched = []
    monkeypatch.setattr(agent_mod, "AgentProcess",
                        lambda command=None, **kw: launched.append(command) or SimpleNamespace())
    agent = agent_mod.Agent(api=None, queue=None, sweep_id="abc123")
    agent._sweep_command = config["command"]
    agent._command_run({"type": "run", "run_id": "r1", "program": config["program"],
                        "args": {"optimizer.lr": {"value": 0.0012}, "data.batch_size": {"value": 32}}})
    argv = launched[0]
    assert argv[:3] == ["/usr/bin/env", "foundry-train", "sweep=digits_lr_bs"]
    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=argv[2:])
    assert cfg.optimizer.lr == 0.0012 and cfg.data.batch_size == 32
    assert cfg.logger.offline is False and cfg.trainer.max_steps == 300  # the sweep file's fixed settings


def test_cli_prints_and_refuses_to_create_offline(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep.yaml"
    assert main(["wandb", str(SWEEP_DIR / "digits_lr_bs.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "program: train/ops/main.py" in printed.out and out.read_text() == printed.out
    assert "wandb agent --count 4" in printed.err
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["wandb", str(SWEEP_DIR / "lr.yaml"), "--create"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("foundry-sweep: WANDB_MODE=offline: creating a sweep needs the W&B server")


def test_cli_create_hands_the_validated_config_to_wandb(capsys, monkeypatch):
    import wandb

    calls = []
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "sweep", lambda sweep, project=None, entity=None: calls.append(
        (sweep, project, entity)) or "sw33p")
    assert main(["wandb", str(SWEEP_DIR / "lr.yaml"), "--create", "--project", "proj", "--entity", "team"]) == 0
    (sweep, project, entity), = calls
    assert (project, entity) == ("proj", "team") and wandb_violations(sweep) == []
    assert "wandb agent --count 8 team/proj/sw33p" in capsys.readouterr().err


@pytest.mark.parametrize("path, message", [
    ("conf/sweep/nope.yaml", "no such sweep file"),
    ("conf/train.yaml", "sweep files must live in"),
])
def test_cli_bad_sweep_file_is_one_line(path, message, capsys):
    assert main(["wandb", str(ROOT / path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_summary_command_rereads_trials(tmp_path, capsys):
    _job(tmp_path, 0, "COMPLETED", 0.5, [])
    write_summary(tmp_path, "train/loss", "minimize")
    assert main(["summary", str(tmp_path)]) == 0
    assert "best: #0 trial0 = 0.5000" in capsys.readouterr().out
    assert main(["summary", str(tmp_path / "trial0")]) == 2



def test_swept_keys_are_what_hydra_parses_as_sweeps():
    overrides = ["optimizer.lr=tag(log, interval(5e-4, 5e-3))", "data.batch_size=choice(16, 32)", "model=a,b",
                 "+extra=range(1,3)", "trainer.max_steps=4", "sweep=digits_lr_bs", "callbacks.sample_images.seeds=[0,1]"]
    assert swept_keys(overrides) == ["optimizer.lr", "data.batch_size", "model", "extra"]
