"""Training noise schedules: a DDPM schedule (epsilon | v_prediction) or flow matching, and switching between them."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")  # flow: flow matching / rectified flow


def make_scheduler(prediction_type: str, beta_schedule: str = "squaredcos_cap_v2", num_train_timesteps: int = 1000,
                   flow_shift: float = 1.0):
    """The training noise schedule: a DDPM schedule (epsilon | v_prediction) or flow matching (`flow`, with SD3's
    `shift` of the timesteps toward noise; 1.0 is plain rectified flow)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"model.prediction_type: '{prediction_type}' is not one of {PREDICTION_TYPES}")
    if prediction_type == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=flow_shift)
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type=prediction_type, clip_sample=False)


def scheduler_objective(scheduler) -> str:
    return "flow" if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) else scheduler.config.prediction_type


def with_prediction_type(scheduler, prediction_type: str | None, flow_shift: float = 1.0):
    """The same model trained toward another objective: epsilon <-> v keep the noise schedule; to or from `flow` the
    schedule itself changes (reflow fine-tunes a VP teacher into a rectified-flow student)."""
    current = scheduler_objective(scheduler)
    if not prediction_type or prediction_type == current:
        return scheduler
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"model.prediction_type: '{prediction_type}' is not one of {PREDICTION_TYPES}")
    log.info("switching prediction_type %s -> %s", current, prediction_type)
    if prediction_type == "flow":
        return make_scheduler("flow", num_train_timesteps=scheduler.config.num_train_timesteps, flow_shift=flow_shift)
    if current == "flow":
        return make_scheduler(prediction_type, num_train_timesteps=scheduler.config.num_train_timesteps)
    return DDPMScheduler.from_config(scheduler.config, prediction_type=prediction_type)


def load_scheduler(folder: Path):
    """The training scheduler of a diffusers folder: flow-matching models keep theirs; others load as DDPM."""
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if "FlowMatch" in str(config.get("_class_name", "")):
        return FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    return DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
