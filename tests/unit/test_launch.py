"""Launch plans, strategy configs and the bad setups that must fail in one line before any work."""
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli, compose, small
from train.ops.launch import make_plan, resolve_batch
from train.ops.validate import ConfigError, check_offload_path, check_offload_room, validate


def plan(*overrides, urls=None):
    return make_plan(compose(list(overrides)), urls)


def test_global_batch_sets_accumulation_from_world_size():
    p = plan("trainer.num_nodes=2", "trainer.devices=8", "data.batch_size=16", "data.global_batch_size=1024")
    assert (p.world_size, p.per_device_batch, p.accumulation, p.global_batch) == (16, 16, 4, 1024)


def test_global_batch_sets_the_per_device_batch_when_it_is_left_open():
    p = plan("trainer.devices=4", "data.batch_size=null", "data.global_batch_size=256",
             "trainer.accumulate_grad_batches=2")
    assert (p.per_device_batch, p.accumulation) == (32, 2)


def test_without_a_global_batch_it_is_what_the_ranks_add_up_to():
    p = plan("trainer.devices=2", "data.batch_size=8", "trainer.accumulate_grad_batches=3")
    assert p.global_batch == 48 and p.samples_seen == 48 * p.max_steps


def test_indivisible_global_batch_fails_in_one_line():
    with pytest.raises(ConfigError, match=r"data.global_batch_size=100 is not divisible by world size 2 x "
                                          r"data.batch_size 64"):
        resolve_batch(compose(["trainer.devices=2", "data.batch_size=64", "data.global_batch_size=100"]), 2)


def test_fewer_shards_than_ranks_without_resampling_fails():
    with pytest.raises(ConfigError, match="1 shard.*for 4 rank"):
        plan("trainer.devices=4", "data.resampled=false", urls=["/data/only.tar"])
    assert plan("trainer.devices=4", urls=["/data/only.tar"]).shards_per_rank == 0.25  # resampled: fine


def test_strategy_configs_compose_and_name_themselves():
    for name in ("single", "ddp", "fsdp", "deepspeed_stage2", "deepspeed_stage2_offload", "deepspeed_stage3",
                 "deepspeed_stage3_offload"):
        cfg = compose([f"strategy={name}"])
        expected = {"single": "single_device", "ddp": "ddpstrategy", "fsdp": "fsdp"}.get(name, name)
        assert plan(f"strategy={name}").strategy == expected
        if name.startswith("deepspeed"):
            zero = cfg.strategy.config.zero_optimization
            assert zero.stage == int(name[len("deepspeed_stage")])
            assert ("offload_optimizer" in zero) == name.endswith("offload")


def test_strategy_objects_build_from_their_config():
    from train.ops.trainer import build_strategy
    from train.strategies import FSDP, DeepSpeed

    ds = build_strategy(compose(["strategy=deepspeed_stage3_offload"]))
    assert isinstance(ds, DeepSpeed) and ds.stage == 3 and ds.exclude_frozen_parameters
    assert isinstance(ds.config, dict) and ds.config["zero_optimization"]["offload_param"]["device"] == "cpu"
    fsdp = build_strategy(compose(["strategy=fsdp"]))
    assert isinstance(fsdp, FSDP) and fsdp.kwargs["use_orig_params"]


def test_deepspeed_where_it_cannot_run_is_refused(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match="DeepSpeed is not installed"):
        validate(compose(["strategy=deepspeed_stage2"]))
    monkeypatch.setattr(importlib.util, "find_spec", real)
    with pytest.raises(ConfigError, match="offload_param needs stage 3"):
        validate(compose(["strategy=deepspeed_stage2",
                          "+strategy.config.zero_optimization.offload_param={device: cpu}"]))


def test_fsdp_without_a_gpu_is_refused_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: FSDP can run")
    with pytest.raises(ConfigError, match="strategy=fsdp needs CUDA GPUs"):
        validate(compose(["strategy=fsdp"]))


def test_offload_path_without_room_is_refused(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="not a writable folder"):
        check_offload_path(str(tmp_path / "missing"), "strategy.config.zero_optimization.offload_optimizer.nvme_path")
    nvme = ["strategy=deepspeed_stage3_offload", "strategy.config.zero_optimization.offload_optimizer.device=nvme",
            f"+strategy.config.zero_optimization.offload_optimizer.nvme_path={tmp_path}"]
    cfg = compose(nvme)
    validate(cfg)  # the folder exists and is writable
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 2**20))  # 1 MiB free
    with pytest.raises(ConfigError, match="1 MiB|0.0 GiB free but the offloaded state needs about"):
        check_offload_room(cfg, n_trainable=10**8, n_total=10**8, world_size=1)


def test_dry_run_prints_the_torchrun_line_for_every_node(tmp_path):
    res = subprocess.run(cli(*small(f"paths.output_dir={tmp_path}", "run_name=big", "launcher=torchrun",
                                    "launcher.master_addr=node0", "trainer.num_nodes=2", "trainer.devices=8",
                                    "data.batch_size=8", "data.global_batch_size=256", "launcher.dry_run=true")),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout[res.stdout.index("{"):res.stdout.rindex("}") + 1])
    p = out["launch_plan"]
    assert (p["world_size"], p["per_device_batch"], p["accumulation"], p["global_batch"]) == (16, 8, 2, 256)
    lines = out["launch"]["per_node"]
    assert len(lines) == 2 and "--node_rank 1" in lines[1] and "--nnodes 2 --nproc_per_node 8" in lines[0]
    assert "--master_addr node0" in lines[0] and "run_name=big" in lines[0] and "launcher.dry_run" not in lines[0]
    assert not (tmp_path / "big" / "checkpoints").exists(), "a dry run starts nothing"


def test_dry_run_writes_an_sbatch_script_that_parses(tmp_path):
    res = subprocess.run(cli(*small(f"paths.output_dir={tmp_path}", "run_name=cats", "launcher=slurm",
                                    "launcher.partition=gpu", "trainer.num_nodes=4", "trainer.devices=8",
                                    "launcher.dry_run=true")), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    script = (tmp_path / "cats" / "launch.sbatch").read_text()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=SIGUSR1@90", "#SBATCH --requeue", "#SBATCH --partition=gpu", "#SBATCH --job-name=cats"):
        assert line in script
    assert re.search(r"srun python -m train\.ops\.main .*trainer\.num_nodes=4", script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "cats" / "launch.sbatch")]).returncode == 0


def test_submitit_launcher_config_makes_a_correct_slurm_job(tmp_path, monkeypatch):
    """hydra/launcher=foundry_slurm resolves, and submitit turns it into the sbatch script a cluster would get
    (no cluster here: a stand-in `srun` on PATH lets submitit's executor start; nothing is submitted)."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    import submitit
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from tests.conftest import CONF_DIR
    from train.ops.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="train", return_hydra_config=True,
                            overrides=small("hydra/launcher=foundry_slurm", "trainer.num_nodes=2", "trainer.devices=8",
                                            "hydra.launcher.partition=gpu", f"paths.output_dir={tmp_path}"))
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    for key in ("nodes", "tasks_per_node", "gpus_per_node"):  # interpolations of trainer.*: resolve them by hand
        launcher[key] = OmegaConf.select(cfg, launcher[key][2:-1]) if isinstance(launcher[key], str) else launcher[key]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 8, 8)
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    executor.update_parameters(nodes=launcher["nodes"], tasks_per_node=launcher["tasks_per_node"],
                               gpus_per_node=launcher["gpus_per_node"], timeout_min=launcher["timeout_min"],
                               slurm_partition=launcher["partition"], slurm_signal_delay_s=launcher["signal_delay_s"],
                               slurm_setup=launcher["setup"])
    text = executor._executor._make_submission_file_text("python -m train.ops.main", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@90", "#SBATCH --time=1440"):
        assert line in text, text
    assert "scontrol show hostnames" in text


def test_dockerfile_install_matches_the_project():
    """The image cannot be built here; keep it honest against pyproject (no drift)."""
    docker = (ROOT / "docker" / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = re.findall(r'pip install -e "\.\[([a-z,]+)\]"', docker)
    assert extras and set(extras[0].split(",")) <= set(project["optional-dependencies"])
    torch_tag = re.search(r"FROM pytorch/pytorch:(\d+)\.(\d+)\.\d+-cuda", docker)
    torch_floor = re.search(r'"torch>=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert tuple(map(int, torch_tag.groups())) >= tuple(map(int, torch_floor.groups()))
    entry = re.search(r'ENTRYPOINT \["([a-z-]+)"\]', docker).group(1)
    assert entry in project["scripts"]
    assert "USER foundry" in docker and re.search(r"useradd .*foundry", docker)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "outputs", ".git"} <= set(ignored)
    assert os.path.isfile(ROOT / "docker" / "slurm" / "train.sbatch")
    assert subprocess.run(["bash", "-n", str(ROOT / "docker" / "slurm" / "train.sbatch")]).returncode == 0
    assert sys.version_info >= (3, 11)
    assert Path(ROOT / "docker" / "README.md").read_text().count("torchrun") >= 1
