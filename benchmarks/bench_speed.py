"""Speed switches: training samples/s of the same model and batch with each `model.*` switch against eager.

Variants: eager; `model.compile=true` (inductor); `model.channels_last=true`; `model.gradient_checkpointing=true`
(memory for time). Each variant is the platform's own module built from config (train/build.py), stepping the
denoise method's loss with AdamW; variants alternate within rounds in one process; ratios are of medians.
On CUDA also reports peak memory per variant and MFU from the counted FLOPs (models/flops.py).

    python benchmarks/bench_speed.py [--preset tiny_pixel] [--batch 64] [--steps 20] [--rounds 3]
    python benchmarks/bench_speed.py --preset tiny_pixel dit_tiny mmdit_tiny --only eager   # backbones vs the first
    # GPU: --preset sd15 --resolution 64 --device cuda --precision bf16 --batch 16 --peak-tflops 989
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics

import torch
from common import random_batch, train_step_seconds

VARIANTS = {"eager": [], "compile": ["model.compile=true"], "channels_last": ["model.channels_last=true"],
            "grad_ckpt": ["model.gradient_checkpointing=true"]}


def build(preset: str, resolution: int | None, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from train.build import build_module
    from train.ops.resolvers import register_resolvers

    register_resolvers()
    model = ["model=dit_tiny"] if preset.startswith("dit") else []
    with initialize_config_dir(config_dir=str(__import__("common").ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*model, f"model.preset={preset}", "logger=none", *overrides,
                                          *([f"model.resolution={resolution}"] if resolution else [])])
    return build_module(cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", nargs="+", default=["tiny_pixel"], help="several: each variant on each preset")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak, for MFU")
    ap.add_argument("--only", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from models.flops import train_flops_per_sample

    dtype = torch.bfloat16 if args.precision == "bf16" else None
    modules, opts, batches = {}, {}, {}
    for preset in args.preset:
        for variant in args.only:
            name = variant if len(args.preset) == 1 else f"{preset}:{variant}"
            m = build(preset, args.resolution, VARIANTS[variant]).to(args.device).train()
            modules[name], opts[name] = m, torch.optim.AdamW(m.trainable_parameters(), lr=1e-4)
            batches[name] = random_batch(m.components, args.batch, args.device)
    rates: dict[str, list[float]] = {n: [] for n in modules}
    peak: dict[str, float] = {}
    for _ in range(args.rounds):
        for name in modules:
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            secs = train_step_seconds(modules[name], opts[name], batches[name], args.steps, args.device, dtype)
            rates[name].append(args.steps * args.batch / secs)
            if args.device == "cuda":
                peak[name] = torch.cuda.max_memory_allocated() / 2**30
    med = {n: statistics.median(v) for n, v in rates.items()}
    flops = {n: train_flops_per_sample(m.components) * args.batch for n, m in modules.items()}  # per training step
    first = next(iter(modules.values()))
    base = next(iter(med))
    result = {
        "benchmark": "speed_switches", "preset": args.preset, "resolution": first.components.resolution,
        "batch": args.batch, "steps": args.steps, "rounds": args.rounds, "device": args.device,
        "precision": args.precision, "threads": torch.get_num_threads(),
        "samples_per_s": {n: [round(v, 1) for v in vals] for n, vals in rates.items()},
        f"ratio_vs_{base}": {n: round(med[n] / med[base], 3) for n in med},
        "train_tflops_per_s": {n: round(flops[n] * med[n] / args.batch / 1e12, 4) for n in med},
    }
    if args.peak_tflops:
        result["mfu"] = {n: round(flops[n] * med[n] / args.batch / 1e12 / args.peak_tflops, 4) for n in med}
    if peak:
        result["peak_memory_gib"] = {n: round(v, 2) for n, v in peak.items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
