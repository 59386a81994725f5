"""`foundry-export`: a training checkpoint (or run directory) -> a diffusers pipeline folder."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from models.export import export_pipeline
from train.checkpoint import load_components

log = logging.getLogger(__name__)


def find_checkpoint(path: str | Path) -> Path:
    """Accept a .ckpt, or a run directory (its checkpoints/last.ckpt)."""
    p = Path(path)
    if p.is_dir() and (p / "checkpoints" / "last.ckpt").is_file():
        return p / "checkpoints" / "last.ckpt"
    if p.is_file():
        return p
    raise FileNotFoundError(f"no checkpoint at '{p}'; give a .ckpt or a run directory with checkpoints/last.ckpt")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="foundry-export", description=__doc__)
    ap.add_argument("checkpoint", help="a .ckpt file or a run directory")
    ap.add_argument("out", help="output folder (diffusers layout)")
    ap.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    ap.add_argument("--sampler", default="ddim", help="scheduler saved with the pipeline: ddim, ddpm, dpmpp, euler")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        comps = load_components(find_checkpoint(args.checkpoint), use_ema=not args.no_ema)
    except (FileNotFoundError, ValueError) as e:
        print(f"foundry-export: {e}", file=sys.stderr)
        return 2
    out = export_pipeline(comps, args.out, args.sampler)
    kind = "DiffusionPipeline.from_pretrained(path, trust_remote_code=True)" if comps.vae is None else \
        "StableDiffusionPipeline.from_pretrained(path)"
    print(f"exported to {out}; load it with {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
