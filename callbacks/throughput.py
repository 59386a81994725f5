"""Training throughput (samples/s across all ranks, data loading included), the learning rate, and peak memory
per rank at the end (CUDA: the device's peak allocated bytes; CPU: the process's peak resident set).

Next to samples/s: `perf/train_tflops_per_s`, the backbone's training FLOPs (models/flops.py: 3 x its forward,
attention included) times samples/s, and `perf/mfu`, that over the devices' dense bf16 peak (known GPUs, or
`peak_tflops`). For methods that call the backbone more than once per sample (teachers, rollouts) this counts the
trained backbone's one forward and backward only, so it is a lower bound there."""
from __future__ import annotations

import logging
import resource
import sys
import time

import lightning as L
import torch

from models.flops import peak_tflops, train_flops_per_sample

log = logging.getLogger(__name__)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class Throughput(L.Callback):
    def __init__(self, log_every_n_steps: int = 10, peak_tflops: float | None = None):
        self.every = log_every_n_steps
        self.peak_override = peak_tflops
        self.flops_per_sample: int | None = None
        self.peak: float | None = None
        self.last_metrics: dict[str, float] = {}
        self._t0: float | None = None
        self._samples = 0

    def on_fit_start(self, trainer, module) -> None:
        self.peak = peak_tflops(module.device, self.peak_override)
        devices = [module.device] if module.device.type == "cuda" else []
        was_training = module.unet.training
        try:  # zeros through the backbone once; the RNG and train mode are left as they were
            with torch.random.fork_rng(devices=devices):
                module.unet.eval()
                self.flops_per_sample = train_flops_per_sample(module.components)
        except Exception as e:  # e.g. parameters partitioned by ZeRO-3: throughput is still logged
            log.info("throughput: no FLOP count for this backbone (%s); MFU not logged", e)
            self.flops_per_sample = None
        finally:
            module.unet.train(was_training)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._samples += len(batch["keys"]) * trainer.world_size
        if self._t0 is None:  # the first batch includes worker start-up: start the clock after it
            self._t0, self._samples = now, 0
            return
        if trainer.global_step % self.every == 0 and now > self._t0:
            rate = self._samples / (now - self._t0)
            module.log("perf/samples_per_sec", rate, prog_bar=True)
            if self.flops_per_sample:
                tflops = self.flops_per_sample * rate / 1e12
                module.log("perf/train_tflops_per_s", tflops)
                if self.peak:
                    module.log("perf/mfu", tflops / (self.peak * trainer.world_size))
            module.log("train/lr", trainer.optimizers[0].param_groups[0]["lr"])
            self._t0, self._samples = now, 0

    def on_train_end(self, trainer, module) -> None:
        """Every rank's peak, gathered (a collective: all ranks get here), into the run summary."""
        mine = torch.tensor([peak_memory_mb(module.device)], device=module.device)
        peaks = trainer.strategy.all_gather(mine).flatten().tolist() if trainer.world_size > 1 else [mine.item()]
        self.last_metrics = {"perf/peak_memory_mb": max(peaks),
                             **{f"perf/peak_memory_mb_rank{r}": v for r, v in enumerate(peaks)}}
