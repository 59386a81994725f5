"""Where one training step's time goes: each stage of the denoise step timed on its own, in milliseconds.

The stages are those every latent-diffusion trainer runs (diffusers' script and ours alike, on the same modules):
text encoder, VAE encode, denoiser forward, backward, gradient clipping, the non-finite check, the optimizer step
(for-loop, foreach and fused AdamW). Their sum against a program's measured ms per step (benchmarks/peer_speed.py)
is that program's loop and data overhead. Stages alternate within rounds; medians of `--rounds`.

    python benchmarks/step_anatomy.py --pretrained DIR [--batch 32] [--rounds 20]
    python benchmarks/step_anatomy.py            # the tiny_latent preset at 32 px (what peer_speed.py exports)
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch
from common import ROOT, random_batch


def build(pretrained: str | None):
    from hydra import compose, initialize_config_dir

    from train.build import build_module
    from train.ops.resolvers import register_resolvers

    register_resolvers()
    model = ["model=pretrained", f"model.pretrained={pretrained}"] if pretrained else ["model.preset=tiny_latent"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*model, "model.resolution=32", "logger=none", "loss.min_snr_gamma=null",
                                          "model.gradient_checkpointing=false"])
    return build_module(cfg).train()


def timed(fn, rounds: int) -> float:
    """Median milliseconds of `fn()` over `rounds` calls after one warm-up call."""
    fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from train.nonfinite import gradients_finite

    m = build(args.pretrained)
    batch = random_batch(m.components, args.batch)
    params = m.trainable_parameters()
    with torch.no_grad():
        x0 = m.encode_images(batch["pixels"])
        ctx = m.encode_text(batch["input_ids"])
    t = torch.randint(0, 1000, (args.batch,))
    noisy = torch.randn_like(x0)

    def forward():
        return m.unet(noisy, t, encoder_hidden_states=ctx).sample

    def forward_backward():
        forward().square().mean().backward()

    forward_backward()
    optimizers = {f"optimizer_{k}": torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **kw)
                  for k, kw in {"forloop": {"foreach": False}, "foreach": {"foreach": True},
                                "fused": {"fused": True}}.items()}
    grads = [p.grad.clone() for p in params]

    def restore_grads():
        for p, g in zip(params, grads):
            p.grad = g.clone()

    stages = {
        "text_encoder": lambda: m.encode_text(batch["input_ids"]),
        "vae_encode": lambda: m.encode_images(batch["pixels"]),
        "denoiser_forward": lambda: forward(),
        "denoiser_forward_backward": forward_backward,
        "clip_grad_norm": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
        "nonfinite_check": lambda: gradients_finite(params),
        **{name: (lambda o=o: (restore_grads(), o.step())) for name, o in optimizers.items()},
        "restore_grads (subtracted from the optimizer rows)": restore_grads,
    }
    with torch.no_grad():
        ms = {name: [] for name in stages}
        for _ in range(3):  # alternate the stages in rounds (the machine is noisy)
            for name, fn in stages.items():
                with torch.enable_grad() if "backward" in name else torch.no_grad():
                    ms[name].append(timed(fn, max(1, args.rounds // 3)))
    med = {k: statistics.median(v) for k, v in ms.items()}
    base = med.pop("restore_grads (subtracted from the optimizer rows)")
    for k in optimizers:
        med[k] = max(0.0, med[k] - base)
    med["backward"] = med["denoiser_forward_backward"] - med["denoiser_forward"]
    print(json.dumps({"benchmark": "step_anatomy", "batch": args.batch, "threads": torch.get_num_threads(),
                      "trainable_parameters": sum(p.numel() for p in params), "tensors": len(params),
                      "ms": {k: round(v, 2) for k, v in med.items()}}, indent=2))


if __name__ == "__main__":
    main()
