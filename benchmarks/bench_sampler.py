"""Trajectory sampler (train/sampling.py: stochastic DDIM recording states and log-probs, as DDPO uses it) vs plain
pipeline sampling of the same model, steps and batch; alternating rounds in one process, ratio of medians.

    python benchmarks/bench_sampler.py [--preset tiny_pixel] [--batch 64] [--steps 20] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.components import build_components, tokenize  # noqa: E402
from models.export import make_pipeline  # noqa: E402
from train.sampling import ddim_scheduler, guided, sample  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny_pixel")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    comps = build_components(preset=args.preset)
    pipe = make_pipeline(comps)
    prompts = ["a handwritten digit three"] * args.batch
    cond = comps.text_encoder(tokenize(comps.tokenizer, prompts))[0].detach()
    sched = ddim_scheduler(comps.scheduler, args.steps, clip_sample=True)
    size = comps.sample_size
    plain, ours = [], []
    with torch.no_grad():
        for r in range(args.rounds + 1):
            t0 = time.perf_counter()
            pipe(prompts, num_inference_steps=args.steps, guidance_scale=1.0, eta=1.0,
                 generator=torch.Generator().manual_seed(r), output_type="pt")
            t1 = time.perf_counter()
            sample(lambda x, t: guided(comps.unet, x, t, cond, None, 1.0), sched,
                   torch.randn(args.batch, 3, size, size), eta=1.0, generator=torch.Generator().manual_seed(r),
                   keep_states=True)
            t2 = time.perf_counter()
            if r:  # round 0 warms up
                plain.append(args.batch / (t1 - t0))
                ours.append(args.batch / (t2 - t1))
    print(json.dumps({"benchmark": "trajectory_sampler", "preset": args.preset, "batch": args.batch,
                      "steps": args.steps, "threads": torch.get_num_threads(),
                      "pipeline_samples_per_s": [round(v, 1) for v in plain],
                      "trajectory_samples_per_s": [round(v, 1) for v in ours],
                      "ratio_trajectory_over_pipeline": round(statistics.median(ours) / statistics.median(plain), 3)},
                     indent=2))


if __name__ == "__main__":
    main()
