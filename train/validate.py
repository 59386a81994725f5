"""Reject bad configurations before any heavy work, with one line naming the key and the fix.

Hydra already rejects unknown keys (the config is in struct mode); this checks types, ranges and
combinations that would otherwise fail minutes later, deep inside Lightning or a worker process.
"""
from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

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


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first problem found."""
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
    _check(cfg, "lr_scheduler.warmup_steps", lambda v: _int(v) and v >= 0, "an integer >= 0")
    _check(cfg, "checkpoint.every_n_steps", lambda v: _int(v) and v > 0, "a positive integer")
    _check(cfg, "checkpoint.keep_last", lambda v: _int(v) and (v > 0 or v == -1), "a positive integer (or -1: all)")
    _check(cfg, "loss.min_snr_gamma", lambda v: _num(v) and v > 0, "a positive number or null", optional=True)
    _check(cfg, "module.max_nonfinite_steps", lambda v: _int(v) and v > 0, "a positive integer")
    _check(cfg, "run_name", lambda v: isinstance(v, str) and v and "/" not in v, "a name without '/'")
    if cfg.data.get("resampled") and cfg.data.get("steps_per_epoch") is None:
        raise ConfigError("data.resampled=true needs data.steps_per_epoch (a resampled stream never ends)")
    warmup, steps = _get(cfg, "lr_scheduler.warmup_steps"), _get(cfg, "trainer.max_steps")
    if steps and steps > 0 and warmup >= steps:
        raise ConfigError(f"lr_scheduler.warmup_steps={warmup} >= trainer.max_steps={steps}: the learning rate "
                          "would never leave warmup; lower warmup_steps")
