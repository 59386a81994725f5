"""A latent digits world: a latent preset's AutoencoderKL trained on the real digits (`tiny_latent`: 16x16 -> 8x8x4;
`flux_tiny`: 16x16 -> 8x8x16), saved with the rest of the preset as its family's diffusers folder, which
`model=pretrained model.pretrained=DIR` trains from.

    python -m models.tiny_vae --out DIR [--preset tiny_latent|flux_tiny] [--steps 1500]

Loss: reconstruction MSE plus a small KL term (as in SD's VAE, without the GAN and perceptual terms, which the
digits do not need). The scaling factor is set afterwards to 1 / std of the latents, as SD's 0.18215 was, so the
UNet sees unit-variance inputs. The digit judge's accuracy on the reconstructions says whether the latents keep
the digits (printed with the reconstruction error).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from models.components import build_components
from models.digits_judge import DigitJudge, prompt_accuracy, real_digit_images


def train_digits_vae(vae, steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, kl_weight: float = 1e-5,
                     seed: int = 0, resolution: int = 16) -> dict:
    """Train `vae` in place on the 1,797 real digits; returns reconstruction error, judge accuracy on the
    reconstructions and the scaling factor it set."""
    images, labels = real_digit_images(resolution)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    vae.requires_grad_(True).train()
    t0 = time.perf_counter()
    for _ in range(steps):
        x = images[torch.randint(len(images), (batch_size,), generator=g)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        loss = torch.nn.functional.mse_loss(vae.decode(z).sample, x) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        post = vae.encode(images).latent_dist
        scaling = float(1.0 / post.mean.std())
        rec = vae.decode(post.mean).sample.clamp(-1, 1)
    vae.register_to_config(scaling_factor=scaling)
    judge = DigitJudge.cached()
    return {"steps": steps, "train_seconds": round(time.perf_counter() - t0, 1),
            "reconstruction_mse": float(torch.nn.functional.mse_loss(rec, images)),
            "judge_accuracy_reconstructions": prompt_accuracy(judge, rec, labels),
            "judge_accuracy_real": prompt_accuracy(judge, images, labels), "scaling_factor": scaling}


def build_latent_digits_model(out: str | Path, steps: int = 1500, seed: int = 0, preset: str = "tiny_latent") -> dict:
    """A latent preset (random denoiser and text encoder, like every preset) with its VAE trained on the digits,
    saved as its family's diffusers folder."""
    comps = build_components(preset=preset, resolution=16, seed=seed)
    if comps.vae is None:
        raise ValueError(f"--preset {preset}: a pixel-space preset has no VAE; use tiny_latent or flux_tiny")
    result = train_digits_vae(comps.vae, steps=steps, seed=seed)
    out = Path(out).expanduser()
    comps.save_pretrained(out)
    (out / "vae_training.json").write_text(json.dumps(result, indent=2))
    return {**result, "model": str(out)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the model folder to write")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="tiny_latent", help="a latent preset: tiny_latent | flux_tiny")
    args = ap.parse_args(argv)
    print(json.dumps(build_latent_digits_model(args.out, args.steps, args.seed, args.preset), indent=2))


if __name__ == "__main__":
    main()
