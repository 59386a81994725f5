"""Logging to the live W&B run from callbacks (rank 0 only); a no-op without a WandbLogger."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from lightning.pytorch.loggers import WandbLogger


def wandb_run(trainer) -> Any | None:
    """The live W&B run of this trainer's WandbLogger, on rank 0 only."""
    if not trainer.is_global_zero:
        return None
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            return lg.experiment
    return None


def log_samples_table(trainer, prompts: Sequence[str], seeds: Sequence[int], images, step: int) -> None:
    """A W&B Table of (prompt, seed, step, image), one row per sample, beside the grid image."""
    run = wandb_run(trainer)
    if run is None:
        return
    import wandb  # lazy: a slow import, needed only with a live run

    pixels = (np.clip(np.asarray(images), 0, 1) * 255).round().astype(np.uint8)
    table = wandb.Table(columns=["prompt", "seed", "step", "image"])
    for prompt, seed, img in zip(prompts, seeds, pixels, strict=True):
        table.add_data(prompt, int(seed), int(step), wandb.Image(img))
    run.log({"samples/table": table, "trainer/global_step": step})
