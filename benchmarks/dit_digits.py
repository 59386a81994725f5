"""Modern-backbone recipes on the digits world, each through the real CLI at the same number of steps:

- `dit`:     a ~1.2 M-parameter DiT (`experiment=dit`: rectified flow, SD3 logit-normal timesteps);
- `mask50`, `mask75`: the same with micro-budget deferred masking at 50% / 75% (final 20% of steps unmasked);
- `repa`:    the same with REPA against a small DINOv2-architecture encoder (transformers' Dinov2Model) trained here
             on the real digits (a digit classifier on its mean patch token), saved and loaded from its folder
             like any DINOv2 checkpoint;
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


def train_encoder(out: Path, epochs: int = 40, seed: int = 0) -> dict:
    """A tiny DINOv2-architecture ViT (16x16 input, 4x4 patches) trained to classify the real digits; saved with
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
    head = torch.nn.Linear(64, 10)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=1e-3)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)

    def logits(idx):
        x = ((images[idx] + 1) / 2 - mean) / std  # what models/repa.py feeds it
        return head(enc(pixel_values=x).last_hidden_state[:, 1:].mean(1))

    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = train_idx[torch.randperm(len(train_idx), generator=g)]
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(logits(idx), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    enc.eval()
    with torch.no_grad():
        acc = (logits(test_idx).argmax(1) == labels[test_idx]).float().mean().item()
    enc.save_pretrained(out)
    return {"encoder": str(out), "held_out_accuracy": round(acc, 3), "train_seconds": round(time.perf_counter() - t0, 1)}


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
            enc_dir = args.out / "digits_dinov2"
            if not (enc_dir / "config.json").exists():
                (args.out / "result_encoder.json").write_text(json.dumps(train_encoder(enc_dir), indent=2))
            overrides.append(f"repa.encoder={enc_dir}")
        save_result(args.out, name, run_result(train(args.out, name, *overrides)))
    dump_results(args.out)


if __name__ == "__main__":
    main()
