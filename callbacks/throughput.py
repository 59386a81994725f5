"""Training throughput (samples/s across all ranks, data loading included) and the learning rate."""
from __future__ import annotations

import time

import lightning as L


class Throughput(L.Callback):
    def __init__(self, log_every_n_steps: int = 10):
        self.every = log_every_n_steps
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
