"""Reject bad configurations before any heavy work, with one line naming the key and the fix.

Hydra already rejects unknown keys (the config is in struct mode); this checks types, ranges and
combinations that would otherwise fail minutes later, deep inside Lightning or a worker process.
"""
from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from models.quantize import check_quantization
from train.optim import OPTIMIZERS, SHARDABLE

PRECISIONS = {"32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true", "transformer-engine"}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def _check(cfg: DictConfig, key: str, ok: Callable[[Any], bool], expected: str, optional: bool = False) -> None:
    value = _get(cfg, key)
    if value is None and optional:
        return
    try:
        good = ok(value)
    except (TypeError, ValueError):
        good = False
    if not good:
        raise ConfigError(f"{key}={value!r}: expected {expected}")


def _missing(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys whose value is ??? (without resolving interpolations that point at them)."""
    out = []
    for key in node.keys():
        full = f"{prefix}{key}"
        if full == "hydra" or OmegaConf.is_interpolation(node, key):
            continue
        if OmegaConf.is_missing(node, key):
            out.append(full)
        elif isinstance(child := node._get_node(key), DictConfig):
            out += _missing(child, full + ".")
    return out


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first problem found."""
    missing = _missing(cfg)
    if missing:
        raise ConfigError(f"{', '.join(missing)}: required but not set (the config says ???); "
                          f"{making_hint(cfg, missing[0])}")
    _check(cfg, "trainer.max_steps", lambda v: _int(v) and (v > 0 or v == -1), "a positive integer (or -1)")
    _check(cfg, "trainer.devices", lambda v: v == "auto" or (_int(v) and v > 0) or isinstance(v, (list, str)),
           "a positive integer, a list of device ids or 'auto'")
    _check(cfg, "trainer.num_nodes", lambda v: _int(v) and v > 0, "a positive integer")
    _check(cfg, "trainer.precision", lambda v: str(v) in PRECISIONS, f"one of {sorted(PRECISIONS)}")
    _check(cfg, "trainer.accumulate_grad_batches", lambda v: _int(v) and v > 0, "a positive integer")
    _check(cfg, "trainer.gradient_clip_val", lambda v: _num(v) and v > 0, "a positive number or null", optional=True)
    _check(cfg, "data.batch_size", lambda v: _int(v) and v > 0, "a positive integer (samples per device)")
    _check(cfg, "data.num_workers", lambda v: _int(v) and v >= 0, "an integer >= 0")
    _check(cfg, "data.caption_dropout", lambda v: _num(v) and 0 <= v <= 1, "a probability in [0, 1]")
    _check(cfg, "data.steps_per_epoch", lambda v: _int(v) and v > 0, "a positive integer", optional=True)
    _check(cfg, "data.resolution", lambda v: _int(v) and v > 0, "a positive integer (pixels) or null (the model's)",
           optional=True)
    _check(cfg, "optimizer.lr", lambda v: _num(v) and v > 0, "a positive number")
    _check(cfg, "optimizer.name", lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}")
    _check(cfg, "lr_scheduler.warmup_steps", lambda v: _int(v) and v >= 0, "an integer >= 0")
    _check(cfg, "checkpoint.every_n_steps", lambda v: _int(v) and v > 0, "a positive integer")
    _check(cfg, "checkpoint.keep_last", lambda v: _int(v) and (v > 0 or v == -1), "a positive integer (or -1: all)")
    _check(cfg, "loss.min_snr_gamma", lambda v: _num(v) and v > 0, "a positive number or null", optional=True)
    _check(cfg, "module.max_nonfinite_steps", lambda v: _int(v) and v > 0, "a positive integer")
    _check(cfg, "run_name", lambda v: isinstance(v, str) and v and "/" not in v, "a name without '/'")
    if cfg.data.get("resampled") and cfg.data.get("steps_per_epoch") is None:
        raise ConfigError("data.resampled=true needs data.steps_per_epoch (a resampled stream never ends)")
    validate_combinations(cfg)


def making_hint(cfg: DictConfig, key: str) -> str:
    """How to make what `key` must point at, from the digits world (the command names the next step)."""
    kind = _get(cfg, "data.kind") or "image"
    if key == "method.teacher":
        return ("this experiment learns from a trained teacher: train one with `foundry-train run_name=teacher` (the "
                "digits demo), then pass method.teacher=outputs/teacher/checkpoints/last.ckpt")
    if key == "data.urls" and kind == "pair":
        return ("it needs preference-pair shards: `python benchmarks/dpo_digits.py --base RUN --out DIR` makes "
                "digits pairs from a base run, `foundry-shards pairs TABLE --out DIR` from your own table; then "
                "data.urls=DIR/...tar")
    if key == "data.urls" and kind == "coupling":
        return ("it needs teacher couplings: `foundry-shards couplings TEACHER_RUN --out DIR` writes them; then "
                "data.urls=DIR/...tar")
    if key == "model.pretrained":
        return "give a local diffusers folder or a run of ours: model.pretrained=outputs/<run>"
    return f"pass it on the command line, e.g. {key}=..."


def fit_short_run(cfg: DictConfig) -> str | None:
    """A run shorter than its warmup (`trainer.max_steps=10`, a smoke run of any experiment) gets a warmup of a tenth
    of its steps instead of a refusal; returns the one line saying so (None when nothing changed). The changed value
    is what the run records and resumes with."""
    warmup, steps = _get(cfg, "lr_scheduler.warmup_steps"), _get(cfg, "trainer.max_steps")
    if not (_int(warmup) and _int(steps) and steps > 0 and warmup >= steps):
        return None
    cfg.lr_scheduler.warmup_steps = steps // 10
    instead = f"warming up over {steps // 10} step(s) instead (a tenth of the run)" if steps >= 10 else \
        "no warmup instead (a tenth of the run is under one step)"
    return f"trainer.max_steps={steps} is shorter than lr_scheduler.warmup_steps={warmup}: {instead}"


def _target(cfg: DictConfig, key: str) -> str:
    return str(_get(cfg, f"{key}._target_") or "")


def validate_combinations(cfg: DictConfig) -> None:
    """Combinations that each look fine alone but cannot work together."""
    adapter = _get(cfg, "adapter.kind") or "none"
    if adapter != "none" and _get(cfg, "model.train_text_encoder"):
        raise ConfigError(f"model.train_text_encoder=true with adapter.kind={adapter}: the adapter run freezes the "
                          "base; use adapter.text_encoder=true (an adapter on the text encoder) or adapter=none")
    method, kind = _target(cfg, "method"), _get(cfg, "data.kind") or "image"
    if kind in ("pair", "coupling") and _get(cfg, "data.urls") is None and not _get(cfg, "data.mixture"):
        raise ConfigError(f"data.urls: required but not set (data.kind={kind}; the built-in digits are plain "
                          f"images); {making_hint(cfg, 'data.urls')}")
    pairs_method = method.endswith(".DiffusionDPO")
    if pairs_method and kind != "pair":
        raise ConfigError(f"method=dpo needs preference pairs but data.kind={kind}; use data=preference "
                          "(data.kind=pair) with data.urls pointing at pair shards")
    if kind == "pair" and not pairs_method:
        raise ConfigError("data.kind=pair (preference pairs) only feeds method=dpo; the other methods would train "
                          "on the preferred images only; use data=digits or a caption/image data set")
    if method.endswith(".Reflow") and kind != "coupling":
        raise ConfigError(f"method=reflow trains on teacher couplings but data.kind={kind}; use experiment=reflow "
                          "(data.kind=coupling) with data.urls from `foundry-shards couplings`")
    if kind == "coupling" and not method.endswith((".Reflow", ".VSD", ".DMD2")):
        raise ConfigError("data.kind=coupling (teacher couplings) feeds method=reflow, vsd or dmd2 only")
    if method.endswith((".VSD", ".DMD2")):
        validate_distribution_matching(cfg)
    if method.endswith(".DDPO"):
        steps, fraction = _get(cfg, "method.sample_steps"), _get(cfg, "method.timestep_fraction") or 1.0
        per_step = max(1, round(fraction * steps))
        if _get(cfg, "trainer.accumulate_grad_batches") != per_step:
            raise ConfigError(f"trainer.accumulate_grad_batches={_get(cfg, 'trainer.accumulate_grad_batches')} must "
                              f"equal the timesteps DDPO trains per trajectory ({per_step} = method.sample_steps x "
                              "method.timestep_fraction)")
    validate_strategy(cfg)
    validate_memory(cfg)
    if str(_get(cfg, "trainer.precision")) == "16-mixed" and _get(cfg, "trainer.accelerator") == "cpu":
        raise ConfigError("trainer.precision=16-mixed on trainer.accelerator=cpu: fp16 autocast needs a GPU; "
                          "use 32-true (or bf16-mixed) on CPU")


def validate_distribution_matching(cfg: DictConfig) -> None:
    """DMD2/VSD: the student starts as the teacher, and its phases leave one network or the other without gradients."""
    teacher, pretrained = _get(cfg, "method.teacher"), _get(cfg, "model.pretrained")
    if pretrained not in (None, teacher):
        raise ConfigError(f"method.teacher={teacher} but model.pretrained={pretrained}: the student starts as the "
                          "teacher; set method.teacher only (experiment=dmd2/vsd copies it into model.pretrained)")
    if _target(cfg, "strategy").endswith("DDPStrategy") and not _get(cfg, "strategy.find_unused_parameters"):
        raise ConfigError("strategy=ddp with method=dmd2/vsd: each step trains either the student or the fake score, "
                          "so set strategy.find_unused_parameters=true")


def validate_strategy(cfg: DictConfig) -> None:
    """Sharded strategies that cannot run here, or cannot run with these settings."""
    target = _target(cfg, "strategy")
    optimizer = _get(cfg, "optimizer.name") or "adamw"
    if (target.endswith(".FSDP") or target.endswith(".DeepSpeed")) and optimizer not in SHARDABLE:
        raise ConfigError(f"optimizer.name={optimizer} with a sharded strategy: each rank would see only its shard's "
                          f"statistics; use optimizer.name={' or '.join(SHARDABLE)}, or strategy=ddp")
    if target.endswith(".FSDP"):
        import torch

        if _get(cfg, "trainer.accelerator") == "cpu" or not torch.cuda.is_available():
            raise ConfigError("strategy=fsdp needs CUDA GPUs (PyTorch's FSDP has no CPU path); on CPU use "
                              "strategy=ddp, or strategy=deepspeed_stage3 for sharding")
    if target.endswith(".DeepSpeed"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("strategy=deepspeed_*: DeepSpeed is not installed; pip install "
                              "'diffusion-foundry[deepspeed]' (or pick strategy=ddp or fsdp)")
        if _get(cfg, "trainer.accelerator") == "mps":
            raise ConfigError("strategy=deepspeed_* with trainer.accelerator=mps: DeepSpeed runs on CUDA GPUs (and CPU "
                              "for tests); use strategy=auto on Apple silicon")
        if _get(cfg, "trainer.gradient_clip_algorithm") == "value":
            raise ConfigError("trainer.gradient_clip_algorithm=value with DeepSpeed: it clips by norm only; use "
                              "gradient_clip_algorithm=norm")
        zero = _get(cfg, "strategy.config.zero_optimization") or {}
        for what in ("offload_optimizer", "offload_param"):
            node = zero.get(what) or {}
            if node.get("device") == "nvme":
                check_offload_path(node.get("nvme_path"), f"strategy.config.zero_optimization.{what}.nvme_path")
        if zero.get("offload_param") and int(zero.get("stage", 0)) != 3:
            raise ConfigError("strategy.config.zero_optimization.offload_param needs stage 3 (parameters are only "
                              "partitioned, hence offloadable, in ZeRO-3); use strategy=deepspeed_stage3_offload")


def validate_memory(cfg: DictConfig) -> None:
    """`model.quantize` and `model.block_swap` combinations that cannot work (models/quantize.py, block_swap.py)."""
    _check(cfg, "model.block_swap", lambda v: _int(v) and v >= 0, "an integer >= 0 (transformer blocks to swap)",
           optional=True)
    target = _target(cfg, "strategy")
    sharded = target.endswith(".DeepSpeed") or target.endswith(".FSDP")
    adapter = (_get(cfg, "adapter.kind") or "none") != "none"
    if _get(cfg, "model.block_swap"):
        if not adapter:
            raise ConfigError(f"model.block_swap={_get(cfg, 'model.block_swap')}: block swap moves frozen weights and "
                              "a full fine-tune has none; add adapter=lora, or train on more GPUs (strategy=fsdp)")
        if sharded or _get(cfg, "model.compile"):
            raise ConfigError("model.block_swap: not with DeepSpeed, FSDP or model.compile (they wrap or trace the "
                              "parameters the swap replaces); use strategy=ddp or one device, eager")
    kind = _get(cfg, "model.quantize") or "none"
    if kind == "none":
        return
    import torch

    accelerator = str(_get(cfg, "trainer.accelerator") or "auto")
    if _get(cfg, "launcher.dry_run") or _get(cfg, "launcher.kind") == "slurm":
        device = "any"  # planned or submitted from a machine that is not the one that will train
    else:
        cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        device = "cuda" if cuda else accelerator
    try:
        check_quantization(kind, device, adapter=adapter, sharded=sharded)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_offload_path(path: Any, key: str, need_bytes: int = 0) -> None:
    """An NVMe offload folder must exist, be writable and have room for what will be swapped there."""
    import os
    import shutil

    if not path:
        raise ConfigError(f"{key}: NVMe offload needs a folder; set it to a fast local disk")
    if not os.path.isdir(path) or not os.access(path, os.W_OK):
        raise ConfigError(f"{key}={path!r}: not a writable folder; create it on a fast local disk")
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise ConfigError(f"{key}={path!r}: {free / 2**30:.1f} GiB free but the offloaded state needs about "
                          f"{need_bytes / 2**30:.1f} GiB; point it at a larger disk or use offload to cpu")


def check_offload_room(cfg: DictConfig, n_trainable: int, n_total: int, world_size: int) -> None:
    """After the model is built, before training: NVMe offload folders hold this rank's share of the optimizer state
    (fp32 master weights + two Adam moments: 12 bytes per trained parameter) and, in ZeRO-3, of the fp16 parameters."""
    zero = _get(cfg, "strategy.config.zero_optimization") or {}
    need = {"offload_optimizer": 12 * n_trainable // world_size, "offload_param": 2 * n_total // world_size}
    for what, nbytes in need.items():
        node = zero.get(what) or {}
        if node.get("device") == "nvme":
            check_offload_path(node.get("nvme_path"), f"strategy.config.zero_optimization.{what}.nvme_path", nbytes)
