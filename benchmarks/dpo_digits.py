"""Diffusion-DPO on the digits world: pairs from the base model's own samples, ranked by the digit judge.

1. For each digit, `--per-digit` prompts x 2 seeds, sampled unguided (guidance 1) from the base; the judge's
   probability of the prompted digit ranks the two; pairs closer than `--min-gap` are dropped.
2. Those pairs -> a pair table -> `foundry-shards pairs` (the user's path for their own preference data).
3. `experiment=dpo` and `experiment=dpo_lora` through the real CLI.
4. Prompt accuracy of unguided sampling (guidance 1) before and after, on held-out seeds, plus a guidance sweep.

    python benchmarks/dpo_digits.py --base RUN_DIR --out /tmp/dpo
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from common import ROOT, digits_metrics, dump, pipeline, plot, train
from PIL import Image

GUIDANCE = (1.0, 2.0, 3.0)


def make_pairs(base: Path, out: Path, per_digit: int, min_gap: float, steps: int = 25) -> dict:
    from data.digits import eval_prompt
    from models.digits_judge import DigitJudge

    judge = DigitJudge.cached()
    pipe = pipeline(base)
    out.mkdir(parents=True, exist_ok=True)
    rows, kept_gaps = [], []
    for digit in range(10):
        prompt = eval_prompt(digit)
        n = 2 * per_digit
        gens = [torch.Generator().manual_seed(10_000_000 + 1000 * digit + i) for i in range(n)]  # not eval seeds
        images = pipe([prompt] * n, num_inference_steps=steps, guidance_scale=1.0, generator=gens,
                      output_type="pt").images.float()
        probs = judge.predict_proba(images * 2 - 1)[:, digit]
        for i in range(per_digit):
            p0, p1 = probs[2 * i], probs[2 * i + 1]
            if abs(p0 - p1) < min_gap:
                continue
            names = []
            for j in (2 * i, 2 * i + 1):
                name = f"d{digit}_{j:04d}.png"
                arr = (images[j].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
                Image.fromarray(arr).save(out / name)
                names.append(name)
            rows.append({"caption": prompt, "image_0": names[0], "image_1": names[1], "label_0": int(p0 > p1)})
            kept_gaps.append(abs(p0 - p1))
    (out / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return {"pairs": len(rows), "mean_gap": round(float(np.mean(kept_gaps)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="a run directory or .ckpt (the model to tune)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--per-digit", type=int, default=80)
    ap.add_argument("--min-gap", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--beta", type=float, default=5000.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--variants", nargs="+", default=["dpo", "dpo_lora"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"benchmark": "dpo_digits", "base": str(args.base)}
    result["before"] = digits_metrics(pipeline(args.base), GUIDANCE)
    result["pair_data"] = make_pairs(args.base, args.out / "pair_images", args.per_digit, args.min_gap)
    subprocess.run([sys.executable, "-m", "train.ops.shards", "pairs", str(args.out / "pair_images" / "pairs.jsonl"),
                    "--out", str(args.out / "pair_shards")], cwd=ROOT, check=True)
    for variant in args.variants:
        lr = args.lora_lr if variant.endswith("lora") else args.lr
        s = train(args.out, variant, f"experiment={variant}", f"model.pretrained={args.base}",
                  f"data.urls={args.out / 'pair_shards'}", f"trainer.max_steps={args.steps}", f"optimizer.lr={lr}",
                  f"method.beta={args.beta}", "callbacks.digits_eval.enabled=false",
                  "callbacks.sample_images.every_n_steps=0")
        ckpt = args.out / variant / "checkpoints" / "last.ckpt"
        result[variant] = {"train_seconds": s["wall_seconds"], "command": s["command"],
                           "implicit_acc": s.get("train/implicit_acc"),
                           "after": digits_metrics(pipeline(ckpt), GUIDANCE)}
    result["curves_png"] = [plot(args.out, args.variants, m) for m in ("train/reward_margin", "train/implicit_acc")]
    dump(result, args.out / "dpo_digits.json")


if __name__ == "__main__":
    main()
