"""Training throughput (samples/s across all ranks, data loading included), the learning rate, and peak memory
per rank at the end (CUDA: the device's peak allocated bytes; CPU: the process's peak resident set)."""
from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class Throughput(L.Callback):
    def __init__(self, log_every_n_steps: int = 10):
        self.every = log_every_n_steps
        self.last_metrics: dict[str, float] = {}
        self._t0: float | None = None
        self._samples = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._samples += len(batch["keys"]) * trainer.world_size
        if self._t0 is None:  # the first batch includes worker start-up: start the clock after it
            self._t0, self._samples = now, 0
            return
        if trainer.global_step % self.every == 0 and now > self._t0:
            module.log("perf/samples_per_sec", self._samples / (now - self._t0), prog_bar=True)
            module.log("train/lr", trainer.optimizers[0].param_groups[0]["lr"])
            self._t0, self._samples = now, 0

    def on_train_end(self, trainer, module) -> None:
        """Every rank's peak, gathered (a collective: all ranks get here), into the run summary."""
        mine = torch.tensor([peak_memory_mb(module.device)], device=module.device)
        peaks = trainer.strategy.all_gather(mine).flatten().tolist() if trainer.world_size > 1 else [mine.item()]
        self.last_metrics = {"perf/peak_memory_mb": max(peaks),
                             **{f"perf/peak_memory_mb_rank{r}": v for r, v in enumerate(peaks)}}
