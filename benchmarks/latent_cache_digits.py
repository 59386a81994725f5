"""The latent digits world trained from images (VAE on the fly) and from cached latents, same model, same steps.

1. `base`:    the tiny_latent preset with its VAE trained on the digits (`python -m models.tiny_vae`);
2. `encode`:  `foundry-shards encode` of the digits shards with that model (latents + text embeddings);
3. `images`:  `foundry-train model=pretrained model.pretrained=BASE` on the image shards (the VAE encodes each batch);
4. `cached`:  the same run on the cached shards (`data.urls=CACHE`): no VAE, no text encoder in the training step.

Writes OUT/result_<step>.json per step (the training variants can run in parallel processes) and prints all.

    python benchmarks/latent_cache_digits.py --out DIR [--only base encode images cached] [--steps 1500]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, dump_results, run_result, save_result, train

STEPS = ("base", "encode", "images", "cached")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", nargs="+", default=list(STEPS), choices=STEPS)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--vae-steps", type=int, default=300)
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for both training runs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base, cache = args.out / "base", args.out / "cache"
    for step in args.only:
        if step == "base":
            from models.tiny_vae import build_latent_digits_model

            result = build_latent_digits_model(base, args.vae_steps)
        elif step == "encode":
            from data.digits import ensure_digits_shards

            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "train.ops.shards", "encode", ensure_digits_shards(16), "--out",
                                  str(cache), "--model", str(base)], cwd=ROOT, capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(res.stderr[-2000:])
            result = {"line": res.stdout.strip().splitlines()[-1], "wall_seconds": round(time.perf_counter() - t0, 1)}
        else:
            overrides = ["model=pretrained", f"model.pretrained={base}", f"trainer.max_steps={args.steps}",
                         *([f"data.urls={cache}"] if step == "cached" else []), *args.extra]
            result = run_result(train(args.out, step, *overrides), ("val/", "perf/"))
        save_result(args.out, step, result)
    dump_results(args.out)


if __name__ == "__main__":
    main()
