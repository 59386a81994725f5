"""Where a run is, for people and for tools. `Progress.snapshot()` is step/total, samples/s, loss, elapsed and ETA;
`ProgressLine` logs it as a plain line for logs (nohup, SLURM, CI), where a progress bar shows nothing until the end:
`step 120/1500 (8%) | 141 samples/s | loss 0.0213 | elapsed 0:01:02 | ETA 0:09:48`, every `every_seconds` and at the
last step. foundry-train adds it (and drops the bar) when its output is not a terminal. callbacks/run_status.py
writes the same snapshot to the run folder for foundry-ui."""
from __future__ import annotations

import datetime
import logging
import time

import lightning as L

log = logging.getLogger("foundry.progress")


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class Progress(L.Callback):
    """Rank 0 acts every `every_seconds` and at the last step (`report`); subclasses say what acting is."""

    def __init__(self, every_seconds: float = 30.0):
        self.every = float(every_seconds)
        self._start: float | None = None
        self._first_step = 0
        self._last = 0.0

    def on_train_start(self, trainer, module) -> None:
        self._start = self._last = time.monotonic()
        self._first_step = trainer.global_step

    def snapshot(self, trainer) -> dict:
        step, total = trainer.global_step, trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        elapsed = time.monotonic() - (self._start or time.monotonic())
        done = max(step - self._first_step, 0)
        metrics = trainer.callback_metrics
        return {"step": step, "max_steps": total, "elapsed_seconds": round(elapsed, 1),
                "samples_per_sec": float(metrics["perf/samples_per_sec"]) if "perf/samples_per_sec" in metrics else None,
                "loss": float(metrics["train/loss"]) if "train/loss" in metrics else None,
                "eta_seconds": round(elapsed / done * (total - step), 1) if done and total else None}

    def report(self, trainer) -> None:
        raise NotImplementedError

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        last_step = trainer.max_steps and trainer.global_step >= trainer.max_steps
        if trainer.is_global_zero and (now - self._last >= self.every or last_step):
            self._last = now
            self.report(trainer)


class ProgressLine(Progress):
    @staticmethod
    def format(s: dict) -> str:
        step, total = s["step"], s["max_steps"]
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        if s["samples_per_sec"] is not None:
            parts.append(f"{s['samples_per_sec']:.0f} samples/s")
        if s["loss"] is not None:
            parts.append(f"loss {s['loss']:.4g}")
        parts.append(f"elapsed {_clock(s['elapsed_seconds'])}")
        if s["eta_seconds"] is not None:
            parts.append(f"ETA {_clock(s['eta_seconds'])}")
        return " | ".join(parts)

    def line(self, trainer) -> str:
        return self.format(self.snapshot(trainer))

    def report(self, trainer) -> None:
        log.info(self.line(trainer))
