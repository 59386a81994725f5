"""Sample grids for fixed prompts and seeds every N steps: PNG in the run directory and the logger's images."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from callbacks.ema import inference_weights, samples_here
from callbacks.periodic import EveryNSteps
from callbacks.wandb_log import log_samples_table
from models.export import make_pipeline
from models.pipeline import labelled_grid

log = logging.getLogger(__name__)


def run_dir(trainer) -> Path:
    return Path(trainer.default_root_dir)


class SampleImages(EveryNSteps):
    def __init__(self, prompts: list[str], every_n_steps: int = 500, seeds: list[int] | tuple[int, ...] = (0, 1),
                 num_inference_steps: int = 25, guidance_scale: float = 3.0, sampler: str = "ddim",
                 use_ema: bool = True):
        # a list entry may itself be a list (e.g. `${data.class_prompt}` with several class prompts): flatten it
        self.prompts = [q for p in prompts for q in ([p] if isinstance(p, str) else list(p))]
        self.every = every_n_steps
        self.seeds = list(seeds)
        self.steps = num_inference_steps
        self.guidance = guidance_scale
        self.sampler = sampler
        self.use_ema = use_ema
        self._last = -1

    def run(self, trainer, module):
        return self.sample(trainer, module)

    @torch.no_grad()
    def sample(self, trainer, module) -> Path | None:
        self._last = trainer.global_step
        if not samples_here(trainer):  # images are made and logged once, on rank 0
            return None
        prompts = [p for p in self.prompts for _ in self.seeds]
        gens = [torch.Generator().manual_seed(s) for _ in self.prompts for s in self.seeds]
        with inference_weights(trainer, module, self.use_ema):
            pipe = make_pipeline(module.components, self.sampler)
            pipe.set_progress_bar_config(disable=not trainer.is_global_zero or not sys.stderr.isatty(), leave=False,
                                         desc=f"sampling step {trainer.global_step}")
            images = pipe(prompts, num_inference_steps=self.steps, guidance_scale=self.guidance,
                          generator=gens, output_type="np").images
        if not trainer.is_global_zero:
            return None
        grid = labelled_grid(images, self.prompts, [f"seed {s}" for s in self.seeds])  # one row per prompt
        path = run_dir(trainer) / "samples" / f"step_{trainer.global_step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        for lg in trainer.loggers:
            if hasattr(lg, "log_image"):
                lg.log_image(key="samples", images=[grid], step=trainer.global_step,
                             caption=[f"step {trainer.global_step}, guidance {self.guidance}"])
        log_samples_table(trainer, prompts, [s for _ in self.prompts for s in self.seeds], images,
                          trainer.global_step)  # W&B: one (prompt, seed, step, image) row per sample
        log.info("sample grid: %s", path)
        return path
