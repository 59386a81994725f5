"""Few-step students on the digits world through the real CLI: LCM, LCM-LoRA and guidance distillation of a
trained teacher. Prompt accuracy and Fréchet distance of each student at 1, 2, 4 (and 8) steps against the teacher at
25 guided DDIM steps; the guidance-distilled student at 25 and 12 steps (one forward per step) vs the teacher.

    python benchmarks/distill_digits.py --teacher RUN_DIR --out /tmp/distill [--variants lcm lcm_lora guidance_distill]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import digits_metrics, dump, train

GUIDANCE = (1.5, 2.0, 3.0)


def scores(model, sampler: str, steps: int, guidance=GUIDANCE) -> dict:
    from train.build import load_pipeline

    m = digits_metrics(load_pipeline(model, sampler=sampler), guidance, steps=steps)
    return {"prompt_accuracy": m["prompt_accuracy"], "frechet": m["frechet"], "best_guidance": m["best_guidance"]}


VARIANTS = {"lcm": ["experiment=lcm"], "lcm_lora": ["experiment=lcm_lora"],
            "guidance_distill": ["experiment=guidance_distill"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--extra", nargs="*", default=[])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher / "checkpoints" / "last.ckpt" if args.teacher.is_dir() else args.teacher
    result: dict = {"benchmark": "distill_digits", "teacher": str(teacher),
                    "teacher_ddim25": scores(teacher, "ddim", 25)}
    for name in args.variants:
        s = train(args.out, name, *VARIANTS[name], f"method.teacher={teacher}", f"trainer.max_steps={args.steps}",
                  "callbacks.digits_eval.enabled=false", "callbacks.sample_images.every_n_steps=0", *args.extra)
        ckpt = args.out / name / "checkpoints" / "last.ckpt"
        entry = {"train_seconds": s["wall_seconds"], "command": s["command"]}
        if name.startswith("lcm"):
            for steps in (1, 2, 4, 8):
                entry[f"lcm_{steps}_steps"] = scores(ckpt, "lcm", steps)
        else:
            entry["ddim_25_steps_one_forward"] = scores(ckpt, "ddim", 25)
            entry["ddim_12_steps_one_forward"] = scores(ckpt, "ddim", 12)
        result[name] = entry
    dump(result, args.out / "distill_digits.json")


if __name__ == "__main__":
    main()
