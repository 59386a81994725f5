"""The launch plan: how a run spreads over nodes, devices, batches and shards, decided before any heavy work.

`data.global_batch_size` is the number the optimizer sees per step; with the world size it fixes the per-device batch
or the gradient accumulation (whichever is not given). `launcher.dry_run=true` prints the plan, and the commands
that start it on every node (torchrun, or an sbatch script), without starting anything.
"""
from __future__ import annotations

import copy
import json
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from train.build import build_base
from train.ops.validate import ConfigError
from train.plan import MemoryPlan
from train.plan_config import plan_for_config, plans_real_size


@dataclass
class LaunchPlan:
    strategy: str
    num_nodes: int
    devices_per_node: int
    world_size: int
    per_device_batch: int
    accumulation: int
    global_batch: int
    shards: int | None
    shards_per_rank: float | None
    workers_per_rank: int
    resampled: bool
    steps_per_epoch: int | None
    max_steps: int
    samples_seen: int


def devices_per_node(devices: Any, accelerator: str = "auto") -> int:
    """`trainer.devices` as a count ('auto': every visible GPU, or 1 process on CPU, as Lightning does)."""
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if isinstance(devices, str) and devices != "auto":
        return len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    if devices == "auto":
        import torch

        return torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else 1
    return int(devices)


def strategy_name(cfg: DictConfig) -> str:
    node = cfg.get("strategy") or {}
    target = str(node.get("_target_", ""))
    if target.endswith("DeepSpeed"):
        stage = OmegaConf.select(node, "config.zero_optimization.stage")
        offload = OmegaConf.select(node, "config.zero_optimization.offload_optimizer") is not None
        return f"deepspeed_stage{stage}" + ("_offload" if offload else "")
    if target:
        return target.rsplit(".", 1)[-1].lower()
    return str(node.get("name", "auto"))


def resolve_batch(cfg: DictConfig, world: int) -> tuple[int, int, int]:
    """(per-device batch, accumulation, global batch); one line naming the keys when they cannot agree."""
    per_device, accum = cfg.data.get("batch_size"), int(cfg.trainer.accumulate_grad_batches)
    global_batch = cfg.data.get("global_batch_size")
    if global_batch is None:
        if per_device is None:
            raise ConfigError("data.batch_size=null needs data.global_batch_size (the per-device batch derives from it)")
        return int(per_device), accum, int(per_device) * world * accum
    global_batch = int(global_batch)
    if per_device is None:  # accumulation fixed: the per-device batch follows
        if global_batch % (world * accum):
            raise ConfigError(f"data.global_batch_size={global_batch} is not divisible by world size {world} x "
                              f"trainer.accumulate_grad_batches {accum}; pick a multiple of {world * accum}")
        return global_batch // (world * accum), accum, global_batch
    per_device = int(per_device)
    if global_batch % (world * per_device):
        raise ConfigError(f"data.global_batch_size={global_batch} is not divisible by world size {world} x "
                          f"data.batch_size {per_device} (= {world * per_device}); pick a multiple of "
                          f"{world * per_device} or another data.batch_size")
    return per_device, global_batch // (world * per_device), global_batch


def make_plan(cfg: DictConfig, urls: list[str] | None = None) -> LaunchPlan:
    nodes = int(cfg.trainer.num_nodes)
    per_node = devices_per_node(cfg.trainer.devices, str(cfg.trainer.get("accelerator", "auto")))
    world = nodes * per_node
    per_device, accum, global_batch = resolve_batch(cfg, world)
    workers = int(cfg.data.get("num_workers") or 0)
    resampled = bool(cfg.data.get("resampled", True))
    shards = len(urls) if urls is not None else None
    if shards is not None and not resampled and shards < world:
        raise ConfigError(f"data.urls: {shards} shard(s) for {world} rank(s) with data.resampled=false: some ranks "
                          "would get no data; write at least one shard per rank (foundry-shards --maxcount) or set "
                          "data.resampled=true")
    steps = int(cfg.trainer.max_steps)
    return LaunchPlan(strategy=strategy_name(cfg), num_nodes=nodes, devices_per_node=per_node, world_size=world,
                      per_device_batch=per_device, accumulation=accum, global_batch=global_batch, shards=shards,
                      shards_per_rank=None if shards is None else round(shards / world, 2),
                      workers_per_rank=workers, resampled=resampled, steps_per_epoch=cfg.data.get("steps_per_epoch"),
                      max_steps=steps, samples_seen=steps * global_batch if steps > 0 else -1)


def apply_plan(cfg: DictConfig, plan: LaunchPlan) -> None:
    """Write the derived per-device batch and accumulation back, so every later reader sees the same numbers."""
    with open_dict(cfg):
        cfg.data.batch_size = plan.per_device_batch
        cfg.trainer.accumulate_grad_batches = plan.accumulation


def user_overrides() -> list[str]:
    """The command line's Hydra overrides, without the dry-run switch (what every node must run)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        items = list(HydraConfig.get().overrides.task)
    else:
        items = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    return [o for o in items if not o.startswith("launcher.dry_run")]


def launch_commands(cfg: DictConfig, plan: LaunchPlan, run_dir: Path) -> dict[str, Any]:
    """What starts this run: the torchrun line per node, or the sbatch script (rendered into the run directory)."""
    launcher = cfg.get("launcher") or {}
    kind = launcher.get("kind", "local")
    overrides = user_overrides()
    run_name = [] if any(o.startswith("run_name=") for o in overrides) else [f"run_name={cfg.run_name}"]
    args = " ".join(shlex.quote(a) for a in [*overrides, *run_name])
    if kind == "torchrun":
        master = launcher.get("master_addr") or "MASTER_HOST"
        return {"kind": kind, "per_node": [
            f"torchrun --nnodes {plan.num_nodes} --nproc_per_node {plan.devices_per_node} --node_rank {rank} "
            f"--master_addr {master} --master_port {launcher.get('master_port', 29500)} -m train.ops.main {args}"
            for rank in range(plan.num_nodes)]}
    if kind == "slurm":
        script = render_sbatch(cfg, plan, args)
        path = run_dir / "launch.sbatch"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        return {"kind": kind, "sbatch": str(path), "submit": f"sbatch {path}"}
    python = "foundry-train" if plan.world_size == 1 else "foundry-train  # Lightning starts one process per device"
    return {"kind": "local", "command": f"{python} {args}".strip()}


SBATCH = """#!/bin/bash
# Written by `foundry-train ... launcher=slurm launcher.dry_run=true`; submit with: sbatch {path_hint}
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={per_node}
#SBATCH --gpus-per-node={per_node}
#SBATCH --cpus-per-task={cpus}
#SBATCH --mem=0
#SBATCH --time={time}
#SBATCH --signal=SIGUSR1@{signal_s}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={output}
{partition}{account}
set -euo pipefail
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-1}} WANDB_MODE=${{WANDB_MODE:-offline}}
export SLURM_KILL_BAD_EXIT=1
# one task per GPU (Lightning's SLURM environment); SIGUSR1 saves last.ckpt at a batch boundary and requeues
srun {python} -m train.ops.main {args}
"""


def render_sbatch(cfg: DictConfig, plan: LaunchPlan, args: str) -> str:
    launcher = cfg.launcher
    partition = f"#SBATCH --partition={launcher.partition}\n" if launcher.get("partition") else ""
    account = f"#SBATCH --account={launcher.account}\n" if launcher.get("account") else ""
    return SBATCH.format(path_hint="<run_dir>/launch.sbatch", job_name=cfg.run_name, nodes=plan.num_nodes,
                         per_node=plan.devices_per_node, cpus=launcher.get("cpus_per_task", 8),
                         time=launcher.get("time", "24:00:00"), signal_s=launcher.get("signal_delay_s", 90),
                         output=launcher.get("output", "slurm-%x-%j.out"), partition=partition, account=account,
                         python=launcher.get("python", "python"), args=args)


def memory_plan(cfg: DictConfig, urls: list[str] | None = None) -> MemoryPlan:
    """The memory planner (train/plan.py) on the config as it would run: the launch plan's per-device batch applied
    (`data.global_batch_size` with `data.batch_size=null` sets it); a full-size preset plans on the meta device,
    anything else from its base components built here."""
    planned = copy.deepcopy(cfg)
    apply_plan(planned, make_plan(planned, urls))
    return plan_for_config(planned, None if plans_real_size(planned) else build_base(planned))


def dry_run(cfg: DictConfig, urls: list[str] | None, run_dir: Path) -> dict[str, Any]:
    """Print the plan and the launch commands as JSON (stdout), start nothing."""
    plan = make_plan(cfg, urls)
    memory = memory_plan(cfg, urls)
    out = {"launch_plan": asdict(plan), "launch": launch_commands(cfg, plan, run_dir), "run_dir": str(run_dir),
           "memory_plan": memory.to_json()}
    print(json.dumps(out, indent=2), flush=True)
    print(memory.table(), file=sys.stderr, flush=True)
    return out

