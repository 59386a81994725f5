"""`foundry-eval PATH`: the digits-world evaluation (train/digits_eval.py) of a checkpoint (.ckpt), a run directory or an
exported pipeline folder, at several guidance scales; prints JSON."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from train.build import load_pipeline
from train.digits_eval import evaluate_digits

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="foundry-eval", description="Score a model on the digits world.")
    ap.add_argument("model", help="a Lightning checkpoint (.ckpt) or an exported pipeline folder")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    ap.add_argument("--n-per-digit", type=int, default=20)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--no-ema", action="store_true", help="score the raw weights of a checkpoint, not the EMA")
    ap.add_argument("--sampler", default="ddim", help="ddim, ddpm, dpmpp, euler or lcm (few-step students)")
    ap.add_argument("--out", help="also write the metrics as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        pipe = load_pipeline(args.model, use_ema=not args.no_ema, sampler=args.sampler)
    except (FileNotFoundError, ValueError) as e:
        print(f"foundry-eval: {e}", file=sys.stderr)
        return 2
    metrics = evaluate_digits(pipe, guidance_scales=args.guidance, n_per_digit=args.n_per_digit, steps=args.steps,
                              seed=args.seed)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
