"""Run identity, git records, secret redaction and W&B artifacts/tables (a real offline W&B run, no network)."""
import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from hydra.types import RunMode
from omegaconf import OmegaConf

from tests.conftest import ROOT
from callbacks.wandb_log import log_samples_table
from train.ops import tracking
from train.ops.report import wandb_records

SECRET = "local-0123456789abcdef0123456789abcdef01234567"


def test_trial_names_come_from_the_swept_overrides():
    overrides = ["optimizer.lr=0.0017692267954532756", "sweep=digits_lr_bs", "data.batch_size=32",
                 "paths.output_dir=/tmp/x", "logger=wandb", "data.urls=/data/*.tar", f"+logger.api_key={SECRET}"]
    assert tracking.trial_run_name("digits_lr_bs", 3, overrides, keys=["optimizer.lr", "data.batch_size"]) == \
        "digits_lr_bs-3-optimizer.lr=0.001769,data.batch_size=32"
    name = tracking.trial_run_name("run", 0, overrides)  # no sweeper params: all but where/how it is logged
    assert name == "run-0-optimizer.lr=0.001769,data.batch_size=32,data.urls=_data_.tar"
    long = tracking.trial_run_name("run", 1, [f"model.pretrained=/models/{'x' * 200}"])
    assert len(long) <= 110 and "/" not in long
    assert long != tracking.trial_run_name("run", 1, [f"model.pretrained=/models/{'x' * 199}y"])  # hash keeps it unique


def test_single_run_names_follow_the_launcher(monkeypatch):
    assert tracking.single_run_name({"FOUNDRY_RUN_NAME": "mine", "SLURM_JOB_ID": "9"}) == "mine"
    assert tracking.single_run_name({"SLURM_JOB_ID": "9"}) == "job-9"
    assert tracking.single_run_name({}).startswith("run-")
    monkeypatch.setattr(tracking, "choice", lambda group, hc=None: "dreambooth" if group == "experiment" else None)
    assert tracking.single_run_name({"TORCHELASTIC_RUN_ID": "4"}) == "dreambooth-job-4"


def _hydra(mode, choices, sweep_dir="/out/sweeps/digits_lr_bs-2026-01-01_00-00-00"):
    return OmegaConf.create({"mode": mode, "runtime": {"choices": choices}, "sweep": {"dir": sweep_dir}})


def test_wandb_identity_groups_a_sweep_and_tags_the_run():
    cfg = OmegaConf.create({"sweep_name": "digits_lr_bs", "logger": {"group": None, "job_type": None, "tags": ["mine"]},
                            "method": {"_target_": "train.methods.denoise.Denoise"}, "model": {"preset": "tiny_pixel"}})
    trial = tracking.wandb_identity(cfg, _hydra(RunMode.MULTIRUN, {"sweep": "digits_lr_bs", "experiment": None}), {})
    assert trial == {"group": "digits_lr_bs-2026-01-01_00-00-00", "job_type": "sweep-trial",
                     "tags": ["mine", "sweep:digits_lr_bs", "method:denoise", "model:tiny_pixel"]}
    single = tracking.wandb_identity(cfg, _hydra(RunMode.RUN, {"sweep": None, "experiment": "base"}), {})
    assert single["group"] == "base" and single["job_type"] == "train" and "experiment:base" in single["tags"]
    agent = tracking.wandb_identity(cfg, _hydra(RunMode.RUN, {"sweep": "digits_lr_bs"}), {"WANDB_SWEEP_ID": "ab12"})
    assert agent["group"] == "digits_lr_bs-ab12" and agent["job_type"] == "sweep-trial"
    cfg.logger.group, cfg.logger.job_type = "chosen", "eval"
    assert tracking.wandb_identity(cfg, None, {})[("group")] == "chosen"


def test_secrets_are_redacted_from_text_overrides_and_logs(monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("SHORT_TOKEN", "1")  # too short to redact safely
    assert tracking.redact(f"key {SECRET} end") == "key <redacted> end"
    assert tracking.scrub_overrides(["+logger.api_key=abc", "optimizer.lr=1", f"x={SECRET}"]) == \
        ["+logger.api_key=<redacted>", "optimizer.lr=1", "x=<redacted>"]
    assert tracking.redact_text("a +x.password=hunter2,b=1 tokenizer: t") == "a +x.password=<redacted>,b=1 tokenizer: t"
    logger = logging.getLogger("test-redact")
    logger.addFilter(tracking.RedactSecrets())
    with caplog.at_level(logging.INFO, logger="test-redact"):
        logger.info("overrides: %s", f"+tracking.api_token=abc123 key={SECRET}")
    assert caplog.records[-1].getMessage() == "overrides: +tracking.api_token=<redacted> key=<redacted>"
    argv = list(sys.argv)
    monkeypatch.setattr(sys, "argv", ["prog", "+logger.api_key=abc", "a=1"])
    with tracking.scrubbed_argv():
        assert sys.argv == ["prog", "+logger.api_key=<redacted>", "a=1"]
    assert sys.argv == ["prog", "+logger.api_key=abc", "a=1"] and argv


def test_saved_hydra_files_are_scrubbed(tmp_path):
    (tmp_path / "overrides.yaml").write_text(yaml.safe_dump(["+logger.api_key=abc", "optimizer.lr=0.1"]))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"logger": {"api_key": "abc"}, "seed": 1}))
    (tmp_path / "hydra.yaml").write_text(yaml.safe_dump({"job": {"override_dirname": "+a.token=abc,b=1"}}))
    (tmp_path / "clean.yaml").write_text(yaml.safe_dump({"seed": 1, "prompts": ["a digit"]}))
    assert all(tracking.scrub_yaml_file(tmp_path / n) for n in ("overrides.yaml", "config.yaml", "hydra.yaml"))
    assert not tracking.scrub_yaml_file(tmp_path / "clean.yaml")
    assert "abc" not in "".join(p.read_text() for p in tmp_path.iterdir())
    assert yaml.safe_load((tmp_path / "overrides.yaml").read_text()) == ["+logger.api_key=<redacted>", "optimizer.lr=0.1"]


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_git_state_records_commit_and_redacted_dirty_diff(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    _git(tmp_path, "init", "-q")
    (tmp_path / "train.py").write_text("lr = 1\n")
    _git(tmp_path, "add", "train.py")
    _git(tmp_path, "commit", "-qm", "first")
    (tmp_path / "train.py").write_text(f"lr = 2\nkey = '{SECRET}'\napi_key = 'hunter2-not-in-env'\n")
    (tmp_path / "new.py").write_text("x = 1\n")
    state = tracking.git_state(tmp_path)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert state["commit"] == head and state["dirty"] is True and state["untracked"] == ["new.py"]
    assert "+lr = 2" in state["diff"] and SECRET not in state["diff"] and "hunter2" not in state["diff"]
    assert tracking.git_state(tmp_path / "nowhere")["commit"] is None


def test_record_run_writes_resolved_config_and_git(tiny_cfg, tmp_path):
    cfg = tiny_cfg("+tracking.api_token=abc123")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracking.record_run(cfg, run_dir)
    resolved = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    assert resolved["run_name"] == "test" and resolved["tracking"]["api_token"] == "<redacted>"
    git = json.loads((run_dir / "git.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert git["commit"] == head and isinstance(git["dirty"], bool)
    assert (run_dir / "git.diff").is_file() == bool(git["diff_file"])


def test_outputs_become_wandb_artifacts_and_samples_a_table(tmp_path, monkeypatch):
    """A real offline W&B run: small files uploaded, large ones by reference, pipelines by reference."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x" * 4096)
    (run_dir / "checkpoints" / "step0000010.ckpt").write_bytes(b"y" * 300_000)
    (run_dir / "exported" / "unet").mkdir(parents=True)
    (run_dir / "exported" / "model_index.json").write_text("{}")
    (run_dir / "exported" / "unet" / "model.safetensors").write_bytes(b"z" * 100)
    (run_dir / "lora").mkdir()
    (run_dir / "lora" / "adapter.safetensors").write_bytes(b"w" * 100)
    outputs = tracking.find_outputs(run_dir)
    assert [p.name for p in outputs["lora"]] == ["adapter.safetensors"]  # the pipeline's own file is not a LoRA

    run = wandb.init(project="t", dir=str(tmp_path), name="unit")
    names = tracking.log_artifacts(run, run_dir, "unit-run", {"global_step": 10, "val/x": 0.5}, min_ref_mb=0.1)
    trainer = SimpleNamespace(is_global_zero=True, loggers=[WandbLogger(experiment=run)])
    images = np.random.default_rng(0).random((4, 16, 16, 3))
    log_samples_table(trainer, ["a", "a", "b", "b"], [0, 1, 0, 1], images, step=10)
    run.finish()
    assert names == ["unit-run-checkpoints", "unit-run-pipeline-exported", "unit-run-lora"]

    records = wandb_records(next(tmp_path.glob("wandb/offline-run-*/run-*.wandb")))
    arts = {r["artifact"]["type"]: r["artifact"] for r in records if r["type"] == "artifact"}
    entries = {e["path"]: e for e in arts["model"]["manifest"]["contents"]}
    assert entries["step0000010.ckpt"]["ref"].startswith("file://")  # 300 kB >= 0.1 MB: by reference
    assert "ref" not in entries["last.ckpt"]  # 4 kB: uploaded
    assert all(e["ref"].startswith("file://") for e in arts["pipeline"]["manifest"]["contents"])
    assert [e["path"] for e in arts["lora"]["manifest"]["contents"]] == ["lora/adapter.safetensors"]
    table = [r["history"]["item"] for r in records if r["type"] == "history"
             and "samples/table.nrows" in r["history"]["item"]]
    assert table and table[0]["samples/table.nrows"] == 4 and table[0]["samples/table.ncols"] == 4


def test_close_wandb_marks_a_left_open_run_failed(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.init(project="t", dir=str(tmp_path), name="crashed")
    tracking.close_wandb(ok=False)
    assert wandb.run is None
    records = wandb_records(next(Path(tmp_path).glob("wandb/offline-run-*/run-*.wandb")))
    assert [r["exit"].get("exit_code") for r in records if r["type"] == "exit"] == [1]
    tracking.close_wandb(ok=True)  # nothing open: a no-op


@pytest.mark.parametrize("mode", [RunMode.RUN, RunMode.MULTIRUN])
def test_in_multirun_reads_hydra_mode(mode):
    assert tracking.in_multirun(_hydra(mode, {})) is (mode == RunMode.MULTIRUN)


def test_a_wandb_agent_run_is_named_after_its_sweep_and_run_id(monkeypatch):
    monkeypatch.setattr(tracking, "choice", lambda group, hc=None: "lr" if group == "sweep" else None)
    assert tracking.run_name_from_context({"WANDB_SWEEP_ID": "s1", "WANDB_RUN_ID": "r9"}) == "lr-r9"
    assert tracking.run_name_from_context({}) is None  # a plain run: the launcher's name or a timestamp


@pytest.mark.parametrize("name", ["WANDB_API_KEY", "HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                  "GOOGLE_APPLICATION_CREDENTIALS", "STRIPE_KEY", "logger.api_key", "+db.password",
                                  "ssh_private_key", "encryption-key", "service.key", "SENTRY_KEY_ID", "aws_credentials"])
def test_secret_names_are_recognised(name):
    from train.redaction import is_secret_name

    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["data.caption_key", "image_keys", "model.preset", "keyframes", "monkey", "tokenizer_dir", "max_tokens"])
def test_ordinary_settings_are_not_secret(name):
    from train.redaction import is_secret_name

    assert not is_secret_name(name)


def test_one_rule_redacts_configs_overrides_env_and_free_text(monkeypatch):
    """Configs (build), overrides, environment values and free text (tracking) all go through train/redaction.py."""
    from train.build import resolved_config  # noqa: F401 - build scrubs with the same function
    from train import build, redaction

    assert build.scrub is redaction.scrub and tracking.redact_text is redaction.redact_text
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAABCDEFGHIJKLMNOP")
    assert redaction.scrub({"a": {"aws_secret_access_key": "x", "lr": 1}}) == {"a": {"aws_secret_access_key":
                                                                                       "<redacted>", "lr": 1}}
    assert tracking.scrub_overrides(["+storage.key=abc", "data.caption_key=json"]) == [
        "+storage.key=<redacted>", "data.caption_key=json"]
    line = "launch AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP client_credentials: 'x y' at http://host:80"
    assert tracking.redact_text(line) == ("launch AWS_ACCESS_KEY_ID=<redacted> client_credentials: <redacted> at "
                                          "http://host:80")
