"""`foundry-sample`: images from a checkpoint, a run directory or an exported/pretrained folder."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from models.pipeline import labelled_grid
from train.build import load_pipeline
from train.ops.export import find_checkpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="foundry-sample", description=__doc__)
    ap.add_argument("model", help="a .ckpt, a run directory, or a diffusers folder")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    ap.add_argument("--n", type=int, default=4, help="images per prompt")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--no-ema", action="store_true")
    ap.add_argument("--out", default="samples.png", help="grid PNG (one row per prompt)")
    args = ap.parse_args(argv)
    try:
        path = Path(args.model)
        source = path if (path.is_dir() and (path / "unet").is_dir()) else find_checkpoint(path)
        pipe = load_pipeline(source, use_ema=not args.no_ema, sampler=args.sampler)
    except (FileNotFoundError, ValueError) as e:
        print(f"foundry-sample: {e}", file=sys.stderr)
        return 2
    pipe.set_progress_bar_config(disable=False)
    prompts = [p for p in args.prompt for _ in range(args.n)]
    gens = [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens,
                  output_type="np").images
    rows = [f"{p} (seeds {args.seed + i * args.n}-{args.seed + (i + 1) * args.n - 1})" for i, p in enumerate(args.prompt)]
    labelled_grid(images, rows, [f"#{j}" for j in range(args.n)]).save(args.out)
    print(f"wrote {len(prompts)} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
