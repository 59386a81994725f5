"""A model family's architecture learning the digits world in latent space, through the real CLI (the issue-22
proof for Flux.1: packing, position ids, resolution-dependent shift and guidance embedding all in the loop):

1. `base`:  the family's tiny preset with its VAE trained on the digits (`python -m models.tiny_vae --preset P`),
            saved as the family's diffusers folder;
2. `train`: `foundry-train experiment=<family> model.pretrained=BASE` for `--steps` steps; the run's closing
            evaluation samples 20 images per digit at guidance 1-4 (25 Euler steps, fixed seeds) and the digit judge
            scores them (trained on the real digits, never used by training).

Writes OUT/result_<step>.json and prints all.

    python benchmarks/family_digits.py --out DIR [--preset flux_tiny] [--experiment flux] [--steps 3000]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import dump_results, run_result, save_result, train

STEPS = ("base", "train")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", nargs="+", default=list(STEPS), choices=STEPS)
    ap.add_argument("--preset", default="flux_tiny")
    ap.add_argument("--experiment", default="flux")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--vae-steps", type=int, default=300)
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for the training run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / "base"
    for step in args.only:
        if step == "base":
            from models.tiny_vae import build_latent_digits_model

            result = build_latent_digits_model(base, args.vae_steps, preset=args.preset)
        else:
            overrides = [f"experiment={args.experiment}", f"model.pretrained={base}",
                         f"trainer.max_steps={args.steps}", *args.extra]
            result = run_result(train(args.out, args.experiment, *overrides), ("val/", "perf/"))
        save_result(args.out, step, result)
    dump_results(args.out)


if __name__ == "__main__":
    main()
