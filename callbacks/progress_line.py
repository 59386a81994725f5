"""A plain progress line for logs (nohup, SLURM, CI), where a progress bar shows nothing until the end:
`step 120/1500 (8%) | 141 samples/s | loss 0.0213 | elapsed 0:01:02 | ETA 0:09:48`, every `every_seconds` and at the
last step. foundry-train adds it (and drops the bar) when its output is not a terminal."""
from __future__ import annotations

import datetime
import logging
import time

import lightning as L

log = logging.getLogger("foundry.progress")


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class ProgressLine(L.Callback):
    def __init__(self, every_seconds: float = 30.0):
        self.every = float(every_seconds)
        self._start: float | None = None
        self._first_step = 0
        self._last = 0.0

    def on_train_start(self, trainer, module) -> None:
        self._start = self._last = time.monotonic()
        self._first_step = trainer.global_step

    def line(self, trainer) -> str:
        step, total = trainer.global_step, trainer.max_steps
        elapsed = time.monotonic() - (self._start or time.monotonic())
        done = max(step - self._first_step, 0)
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total and total > 0 else f"step {step}"]
        metrics = trainer.callback_metrics
        if "perf/samples_per_sec" in metrics:
            parts.append(f"{float(metrics['perf/samples_per_sec']):.0f} samples/s")
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4g}")
        parts.append(f"elapsed {_clock(elapsed)}")
        if done and total and total > 0:
            parts.append(f"ETA {_clock(elapsed / done * (total - step))}")
        return " | ".join(parts)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        last_step = trainer.max_steps and trainer.global_step >= trainer.max_steps
        if trainer.is_global_zero and (now - self._last >= self.every or last_step):
            self._last = now
            log.info(self.line(trainer))
