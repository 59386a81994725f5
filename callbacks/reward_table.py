"""The newest rollout as (prompt, image, reward): a W&B Table when W&B logs, and a PNG grid + JSON on disk."""
from __future__ import annotations

import json
import logging

import lightning as L
from PIL import Image

from callbacks.sample_images import run_dir
from models.pipeline import to_uint8_grid
from train.rewards import to_numpy_images

log = logging.getLogger(__name__)


class RewardTable(L.Callback):
    def __init__(self, every_n_steps: int = 20, max_rows: int = 32):
        self.every, self.max_rows, self._last = every_n_steps, max_rows, -1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        rollout = getattr(module.method, "last_rollout", None)
        if not rollout or not trainer.is_global_zero or step == self._last or not self.every or step % self.every:
            return
        self._last = step
        n = min(self.max_rows, len(rollout["prompts"]))
        images = to_numpy_images(rollout["images"][:n])
        rewards = [float(r) for r in rollout["rewards"][:n]]
        out = run_dir(trainer) / "rollouts"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_uint8_grid(images, nrow=8)).save(out / f"step_{step:06d}.png")
        (out / f"step_{step:06d}.json").write_text(json.dumps(
            [{"prompt": p, "reward": r} for p, r in zip(rollout["prompts"][:n], rewards)], indent=1))
        for lg in trainer.loggers:
            if hasattr(lg, "log_table"):
                import wandb

                rows = [[p, wandb.Image(img), r, step] for p, img, r in zip(rollout["prompts"][:n], images, rewards)]
                lg.log_table(key="rollouts", columns=["prompt", "image", "reward", "step"], data=rows, step=step)
