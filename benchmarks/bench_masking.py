"""Deferred patch masking: training throughput at masking ratios 0, 0.5 and 0.75, same transformer, same batch.

The training step is the platform's own (the denoise method's loss through DiffusionModule, with its patch masking),
then backward and AdamW. Ratios alternate within each round in one process, so machine noise hits all of them;
the figures are medians over rounds and the ratios are against the unmasked step.

    python benchmarks/bench_masking.py [--preset dit_tiny] [--resolution 16] [--batch 64] [--steps 20] [--rounds 3]
    # GPU: --preset dit_xl2 --resolution 32 --device cuda --precision bf16 --batch 32 (DiT-XL/2 at 256 tokens)
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics

import torch
from common import random_batch, train_step_seconds

from models.components import build_components
from train.diffusion import DiffusionCore
from train.methods.denoise import Denoise
from train.module import DiffusionModule

RATIOS = (0.0, 0.5, 0.75)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="dit_tiny")
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mixer-layers", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    comps = build_components(preset=args.preset, resolution=args.resolution, prediction_type="flow")
    core = DiffusionCore(comps.scheduler, timestep_sampling="logit_normal")
    module = DiffusionModule(comps, core, Denoise(), masking={"ratio": 0.75, "mixer_layers": args.mixer_layers})
    module.to(args.device).train()
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)
    batch = random_batch(comps, args.batch, args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    rates: dict[float, list[float]] = {r: [] for r in RATIOS}
    for _ in range(args.rounds):
        for r in RATIOS:
            module.masking.ratio = r
            rates[r].append(args.steps * args.batch / train_step_seconds(module, opt, batch, args.steps, args.device,
                                                                         dtype))
    med = {r: statistics.median(v) for r, v in rates.items()}
    tokens = (args.resolution // comps.unet.config.patch_size) ** 2
    print(json.dumps({
        "benchmark": "patch_masking_throughput", "preset": args.preset, "resolution": args.resolution,
        "tokens": tokens, "mixer_layers": args.mixer_layers, "batch": args.batch, "steps": args.steps,
        "rounds": args.rounds, "device": args.device, "precision": args.precision, "threads": torch.get_num_threads(),
        "samples_per_s": {str(r): [round(v, 1) for v in vals] for r, vals in rates.items()},
        "ratio_vs_unmasked": {str(r): round(med[r] / med[0.0], 3) for r in RATIOS},
    }, indent=2))


if __name__ == "__main__":
    main()
