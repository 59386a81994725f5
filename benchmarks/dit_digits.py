"""Modern-backbone recipes on the digits world, each through the real CLI at the same number of steps:

- `dit`:     a ~1.2 M-parameter DiT (`experiment=dit`: rectified flow, SD3 logit-normal timesteps);
- `mask50`, `mask75`: the same with micro-budget deferred masking at 50% / 75% (final 20% of steps unmasked);
- `repa`:    the same with REPA against a small DINOv2-architecture encoder (transformers' Dinov2Model) trained here
             on the real digits without labels (contrastive, two augmentations per digit: the encoder that guides
             training never sees what the judge grades), saved and loaded from its folder like any DINOv2
             checkpoint;
- `unet`:    the UNet preset (tiny_pixel, the base-training row) for comparison at equal wall-clock (`--unet-steps`).

Writes OUT/result_<variant>.json per run (so variants can run in parallel processes) and prints every variant's
wall-clock, steps and digits evaluation found in OUT.

    python benchmarks/dit_digits.py --out DIR [--only dit mask50 mask75 repa unet] [--steps 1500]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import dump_results, run_result, save_result, train

VARIANTS = {
    "dit": ["experiment=dit"],
    "mask50": ["experiment=dit", "masking.ratio=0.5"],
    "mask75": ["experiment=dit", "masking.ratio=0.75"],
    "repa": ["experiment=dit"],  # + repa.encoder=<trained here>
    "unet": [],
}


def _views(x: torch.Tensor, g: torch.Generator, shift: int = 2, noise: float = 0.1) -> torch.Tensor:
    """A random augmentation per image: a translation of up to `shift` pixels (edges repeated) and pixel noise."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=g)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return (out + noise * torch.randn(out.shape, generator=g)).clamp(-1, 1)


def train_encoder(out: Path, epochs: int = 60, seed: int = 0, temperature: float = 0.2) -> dict:
    """A tiny DINOv2-architecture ViT (16x16 input, 4x4 patches) trained WITHOUT labels, as DINOv2 is: a contrastive
    objective (InfoNCE, SimCLR-style) between two random augmentations of each real digit. The labels are used only
    afterwards, to report a linear probe's held-out accuracy (a probe no training step of the encoder saw). Saved with
    save_pretrained so `repa.encoder` loads it like a DINOv2 folder."""
    import torch.nn.functional as F
    from transformers import Dinov2Config, Dinov2Model

    from models.digits_judge import real_digit_images

    images, labels = real_digit_images(16)
    labels = torch.from_numpy(labels)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    train_idx, test_idx = order[:1500], order[1500:]
    torch.manual_seed(seed)
    enc = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                   image_size=16, patch_size=4))
    proj = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    opt = torch.optim.AdamW([*enc.parameters(), *proj.parameters()], lr=1e-3)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)

    def embed(x):
        return enc(pixel_values=((x + 1) / 2 - mean) / std).last_hidden_state[:, 1:].mean(1)  # as models/repa.py

    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = train_idx[torch.randperm(len(train_idx), generator=g)]
        for i in range(0, len(perm) - 1, 128):
            x = images[perm[i:i + 128]]
            z = F.normalize(proj(embed(torch.cat([_views(x, g), _views(x, g)]))), dim=-1)
            sim = z @ z.t() / temperature
            sim.fill_diagonal_(float("-inf"))
            n = len(x)
            target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
            loss = F.cross_entropy(sim, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    enc.eval()
    with torch.no_grad():  # linear probe (evaluation only): least squares on frozen features, train split -> test
        feats = embed(images)
        a = torch.cat([feats, torch.ones(len(feats), 1)], 1)
        onehot = F.one_hot(labels, 10).float()
        w = torch.linalg.lstsq(a[train_idx], onehot[train_idx]).solution
        acc = ((a[test_idx] @ w).argmax(1) == labels[test_idx]).float().mean().item()
    enc.save_pretrained(out)
    return {"encoder": str(out), "objective": "contrastive, no labels", "linear_probe_accuracy": round(acc, 3),
            "train_seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--unet-steps", type=int, default=1500, help="the UNet's steps (set for equal wall-clock)")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        overrides = [*VARIANTS[name], f"trainer.max_steps={args.unet_steps if name == 'unet' else args.steps}",
                     *args.extra]
        if name == "repa":
            enc_dir = args.out / "digits_dinov2_ssl"
            if not (enc_dir / "config.json").exists():
                (args.out / "result_encoder.json").write_text(json.dumps(train_encoder(enc_dir), indent=2))
            overrides.append(f"repa.encoder={enc_dir}")
        save_result(args.out, name, run_result(train(args.out, name, *overrides)))
    dump_results(args.out)


if __name__ == "__main__":
    main()
