"""Training throughput: our Lightning loop vs a plain hand-written PyTorch loop, same model, same batch.

Both run the same tiny_pixel model, the same in-memory batch and the same loss (train/diffusion.py), the same AdamW
(train/optim.py's, foreach on CPU), gradient clipping, fp32, no EMA, no logging to disk; ours with its encoder caches
off, so both do the same work and the figure is the loop's own cost. Rounds alternate (plain, ours, plain, ours,
...) in one process so machine noise hits both; the ratio of medians is the figure. Goal: ours >= 0.97 of plain.

    python benchmarks/bench_loop.py [--steps 60] [--rounds 3] [--batch 64] [--preset tiny_pixel]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from models.components import build_components, tokenize  # noqa: E402
from train.diffusion import DiffusionCore  # noqa: E402
from train.methods.denoise import Denoise  # noqa: E402
from train.module import DiffusionModule  # noqa: E402
from train.optim import build_optimizer  # noqa: E402


def make_batch(comps, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"pixels": torch.rand(batch, 3, comps.resolution, comps.resolution, generator=g) * 2 - 1,
            "input_ids": tokenize(comps.tokenizer, ["a handwritten digit seven"] * batch)}


def plain_loop(comps, core, batch, steps: int) -> float:
    unet, te = comps.unet, comps.text_encoder
    opt = build_optimizer({"name": "adamw", "lr": 1e-4}, [p for p in unet.parameters() if p.requires_grad])
    unet.train()
    t0 = None
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        x0 = batch["pixels"]
        with torch.no_grad():
            cond = te(batch["input_ids"])[0]
        noise = core.sample_noise(x0)
        t = core.sample_timesteps(x0.shape[0], x0.device)
        pred = unet(core.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        loss = core.per_sample_loss(pred, core.target(x0, noise, t), t).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


class _Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1 = warmup, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.t1 = time.perf_counter()


def lightning_loop(comps, core, batch, steps: int) -> float:
    module = DiffusionModule(comps, core, Denoise(), optimizer={"name": "adamw", "lr": 1e-4},
                             lr_scheduler={"name": "constant", "warmup_steps": 0}, text_cache_mb=0, latent_cache_mb=0)
    data = torch.utils.data.DataLoader([batch] * (steps + 2), batch_size=None)
    timer = _Timer(warmup=2)
    trainer = L.Trainer(max_steps=steps + 2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        callbacks=[timer], num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=data)
    return timer.t1 - timer.t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--preset", default="tiny_pixel")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    comps = build_components(preset=args.preset, resolution=16)
    core = DiffusionCore(comps.scheduler, min_snr_gamma=5.0)
    batch = make_batch(comps, args.batch)
    plain, ours = [], []
    for _ in range(args.rounds):
        plain.append(args.steps * args.batch / plain_loop(comps, core, batch, args.steps))
        ours.append(args.steps * args.batch / lightning_loop(comps, core, batch, args.steps))
    result = {
        "benchmark": "loop_throughput", "preset": args.preset, "batch": args.batch, "steps": args.steps,
        "rounds": args.rounds, "threads": torch.get_num_threads(), "device": "cpu",
        "plain_samples_per_s": [round(v, 1) for v in plain], "ours_samples_per_s": [round(v, 1) for v in ours],
        "ratio_ours_over_plain": round(statistics.median(ours) / statistics.median(plain), 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
