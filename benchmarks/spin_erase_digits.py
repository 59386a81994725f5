"""SPIN-Diffusion and concept erasure on the digits world, through the real CLI.

SPIN: two self-play iterations on the digits captions; prompt accuracy and Fréchet distance after iteration 1 and 2.
Erasure of "seven": the share of "a handwritten digit seven" samples judged seven, and the accuracy on the other
digits, before and after (full cross-attention fine-tuning, and as a LoRA at load-time scales 0.5 / 1).

    python benchmarks/spin_erase_digits.py --base RUN_DIR --out /tmp/spin_erase [--only spin|erase]
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from common import digits_metrics, dump, pipeline, plot, train

from data.digits import eval_prompt

GUIDANCE = (1.0, 2.0, 3.0)
SEVEN = "a handwritten digit seven"


def erase_scores(pipe, guidance=(2.0, 3.0)) -> dict:
    from train.digits_eval import prompt_share

    others = digits_metrics(pipe, guidance, n_per_digit=20, digits=[d for d in range(10) if d != 7])
    return {"seven_share": {f"g{g:g}": round(prompt_share(pipe, SEVEN, 7, n=100, guidance_scale=g), 3)
                            for g in guidance},
            "others_accuracy": {k: v for k, v in others.items() if k.startswith("prompt_accuracy")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", choices=["spin", "erase"])
    ap.add_argument("--spin-steps", type=int, default=150, help="optimizer steps per SPIN iteration")
    ap.add_argument("--spin-lr", type=float, default=None, help="default: experiment=spin's own")
    ap.add_argument("--erase-steps", type=int, default=200)
    ap.add_argument("--erase-lr", type=float, default=None, help="default: experiment=erase's own (x10 for LoRA)")
    ap.add_argument("--no-preserve", action="store_true", help="erase without the preservation prompts")
    ap.add_argument("--erase-variants", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for the erasure runs")
    ap.add_argument("--spin-extra", nargs="*", default=[], help="overrides for the SPIN run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"benchmark": "spin_erase_digits", "base": str(args.base)}
    if args.only in (None, "spin"):
        result["spin_before"] = digits_metrics(pipeline(args.base), GUIDANCE)
        s = train(args.out, "spin", "experiment=spin", f"model.pretrained={args.base}",
                  f"method.steps_per_iteration={args.spin_steps}", f"trainer.max_steps={2 * args.spin_steps}",
                  f"checkpoint.every_n_steps={args.spin_steps}", "checkpoint.keep_last=-1",
                  *([f"optimizer.lr={args.spin_lr}"] if args.spin_lr else []),
                  "callbacks.digits_eval.enabled=false", "callbacks.sample_images.every_n_steps=0", *args.spin_extra)
        ckpts = sorted((args.out / "spin" / "checkpoints").glob("step*.ckpt"))
        result["spin"] = {"train_seconds": s["wall_seconds"], "command": s["command"],
                          **{f"after_iteration_{i + 1}": digits_metrics(pipeline(c), GUIDANCE)
                             for i, c in enumerate(ckpts[:2])}}
    if args.only in (None, "erase"):
        result["erase_before"] = erase_scores(pipeline(args.base))
        others = ",".join(eval_prompt(d) for d in range(10) if d != 7)
        keep = [] if args.no_preserve else [f"method.preserve=[{others}]"]
        variants = {"erase_full": [], "erase_lora": ["adapter=lora", "adapter.target=xattn", "adapter.rank=4"]}
        for name, extra in ((k, v) for k, v in variants.items() if k.removeprefix("erase_") in args.erase_variants):
            base_lr = args.erase_lr or 1e-4  # experiment=erase's; a LoRA takes 10x
            lr = [f"optimizer.lr={base_lr * (10 if extra else 1)}"] if (args.erase_lr or extra) else []
            s = train(args.out, name, "experiment=erase", f"method.concept={SEVEN}", f"model.pretrained={args.base}",
                      f"trainer.max_steps={args.erase_steps}", *keep, *lr,
                      "callbacks.digits_eval.enabled=false", "callbacks.sample_images.every_n_steps=0", *extra, *args.extra)
            result[name] = {"train_seconds": s["wall_seconds"], "command": s["command"],
                            "after": erase_scores(pipeline(args.out / name / "checkpoints" / "last.ckpt"))}
        if "erase_lora" in result:
            result["erase_lora"]["load_time_scales"] = lora_scales(args.out / "erase_lora", args.out / "erase_lora_export")
    result["curves_png"] = plot(args.out, ["spin", "erase_full", "erase_lora"], "train/loss")
    dump(result, args.out / "spin_erase_digits.json")


def lora_scales(run: Path, out: Path) -> dict:
    """The exported erasure LoRA loaded into the base pipeline at scales 0, 0.5, 1 (strength at load time)."""
    import subprocess
    import sys

    from common import ROOT
    from diffusers import DiffusionPipeline

    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "train.ops.export", str(run), str(out)], cwd=ROOT, check=True)
    pipe = DiffusionPipeline.from_pretrained(out / "base", trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(out, adapter_name="erase")
    scores = {}
    for scale in (0.0, 0.5, 1.0):
        pipe.set_adapters(["erase"], adapter_weights=[scale])
        scores[f"scale_{scale:g}"] = erase_scores(pipe, guidance=(3.0,))
    return scores


if __name__ == "__main__":
    main()
