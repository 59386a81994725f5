"""An evaluation every N steps (and at the end): `measure` under the inference weights (EMA when present) on every
rank that samples, then on rank 0 the loggers get the metrics under `logged_prefix` and the run's
`eval/<file_prefix>_step_N.json` gets all of them (what foundry-report reads)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from callbacks.ema import inference_weights, samples_here
from callbacks.periodic import EveryNSteps

log = logging.getLogger(__name__)


class Evaluation(EveryNSteps):
    file_prefix = "eval"
    logged_prefix = ""
    use_ema = True
    last_metrics: dict[str, float] = {}

    def measure(self, trainer, module) -> dict[str, float]:
        raise NotImplementedError

    def describe(self, metrics: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))

    def run(self, trainer, module):
        return self.evaluate(trainer, module)

    @torch.no_grad()
    def evaluate(self, trainer, module) -> dict[str, float]:
        self._last = trainer.global_step
        if not samples_here(trainer):
            return {}
        with inference_weights(trainer, module, self.use_ema):
            metrics = self.measure(trainer, module)
        if not trainer.is_global_zero:
            return {}
        metrics["trainer/global_step"] = float(trainer.global_step)
        for lg in trainer.loggers:
            lg.log_metrics({k: v for k, v in metrics.items() if k.startswith(self.logged_prefix)},
                           step=trainer.global_step)
        path = Path(trainer.default_root_dir) / "eval" / f"{self.file_prefix}_step_{trainer.global_step:06d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2))
        log.info("%s eval at step %d: %s -> %s", self.file_prefix, trainer.global_step, self.describe(metrics), path)
        self.last_metrics = metrics
        return metrics
