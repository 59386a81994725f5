"""Training steps/s from cached latents vs from images through the VAE: the same module, the same batch, one run.

The cached batch holds what `foundry-shards encode` stores (the VAE's latent mean/std and the text context of the
same images), so the two differ only in the encoders' work. Variants alternate within rounds; ratios of medians.

- `digits`:  the tiny_latent preset (16x16 images, 2x VAE), batch 64;
- `tiny_sd`: SD's VAE architecture (AutoencoderKL 128-256-512-512, 8x, 83 M parameters, random weights) under the
  tiny_latent UNet on 16x16x4 latents, i.e. 128x128 images, batch 8: the encoder-heavy case MosaicML measured.

    python benchmarks/bench_latent_cache.py [--configs digits tiny_sd] [--steps 5] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics

import torch
from common import ROOT, random_batch, train_step_seconds

CONFIGS = {"digits": {"resolution": 16, "batch": 64, "sd_vae": False},
           "tiny_sd": {"resolution": 32, "batch": 8, "sd_vae": True}}


def build(resolution: int, sd_vae: bool):
    from diffusers import AutoencoderKL
    from hydra import compose, initialize_config_dir

    from train.build import build_module
    from train.ops.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model.preset=tiny_latent", f"model.resolution={resolution}", "logger=none"])
    module = build_module(cfg)
    if sd_vae:  # Stable Diffusion's VAE layout at random weights: 128x128 images -> 16x16x4 latents
        torch.manual_seed(0)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            norm_num_groups=32, sample_size=128, scaling_factor=0.18215).requires_grad_(False).eval()
        module.components.vae = vae
        object.__setattr__(module, "vae", vae)  # frozen models are plain attributes of the module
    return module.train()


def cached_batch(module, batch: dict) -> dict:
    from models.components import vae_moments

    with torch.no_grad():
        mean, std = vae_moments(module.vae, batch["pixels"])
        context = module.components.text_encoder(batch["input_ids"])[0]
    return {"latent_mean": mean, "latent_std": std, "context": context, "input_ids": batch["input_ids"],
            "context_dropped": torch.zeros(len(mean), dtype=torch.bool)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    out = {"benchmark": "latent_cache", "threads": torch.get_num_threads(), "steps": args.steps,
           "rounds": args.rounds, "configs": {}}
    for name in args.configs:
        c = CONFIGS[name]
        module = build(c["resolution"], c["sd_vae"])
        opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)
        images = random_batch(module.components, c["batch"])
        batches = {"images": images, "cached": cached_batch(module, images)}
        rates: dict[str, list[float]] = {k: [] for k in batches}
        for _ in range(args.rounds):
            for k, b in batches.items():
                rates[k].append(args.steps * c["batch"] / train_step_seconds(module, opt, b, args.steps))
        med = {k: statistics.median(v) for k, v in rates.items()}
        out["configs"][name] = {"image_size": module.components.resolution,
                                "latent_size": module.components.sample_size, "batch": c["batch"],
                                "vae_parameters_m": round(sum(p.numel() for p in module.vae.parameters()) / 1e6, 2),
                                "samples_per_s": {k: [round(v, 2) for v in vals] for k, vals in rates.items()},
                                "ratio_cached_vs_images": round(med["cached"] / med["images"], 2)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
