"""DreamBooth on the digits world: a base model that never saw a nine learns "a handwritten digit sks" from 5 nines.

1. Shards of the digits 0-8 only, and a base model trained on them (or `--base RUN_DIR` to reuse one).
2. Five real nines as the instance folder (16x16 PNGs, exactly what a user's photo folder is to SD).
3. DreamBooth through the real CLI (`experiment=dreambooth_lora` by default), with and without prior preservation.
4. Subject fidelity: the share of "a handwritten digit sks" samples the digit judge calls nine.
   Prior preservation: prompt accuracy on "a handwritten digit k", k = 0..8, before vs after.

    python benchmarks/dreambooth_digits.py --out /tmp/db [--base RUN_DIR] [--experiment dreambooth_lora]
    (Flux: --base-extra experiment=flux model.pretrained=VAE_DIR --extra loss.timestep_sampling=logit_normal)
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import ROOT, digits_metrics, dump, pipeline, train

INSTANCE_PROMPT = "a handwritten digit {}"  # {} = the identifier (sks by default)
CLASS_PROMPT = "a handwritten digit"
GUIDANCE = (1.0, 2.0, 3.0, 4.0)


def write_instance_images(folder: Path, n: int = 5) -> None:
    from data.digits import digit_images

    folder.mkdir(parents=True, exist_ok=True)
    images, labels = digit_images(16)
    nines = [img for img, label in zip(images, labels) if label == 9][-n:]  # the last nines: fixed, reproducible
    for i, img in enumerate(nines):
        img.save(folder / f"nine_{i}.png")


def write_real_class_images(folder: Path, per_digit: int = 22) -> None:
    """Real digits 0-8 as the class folder (PNG + same-named .txt caption), the first `per_digit` of each: what a
    user's own regularization photos are to DreamBooth (no generation needed when the folder is full)."""
    from data.digits import digit_images, eval_prompt

    folder.mkdir(parents=True, exist_ok=True)
    images, labels = digit_images(16)
    seen: dict[int, int] = {}
    for img, label in zip(images, labels):
        label = int(label)
        if label == 9 or seen.get(label, 0) >= per_digit:
            continue
        seen[label] = seen.get(label, 0) + 1
        stem = folder / f"real_{label}_{seen[label]:02d}"
        img.save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(eval_prompt(label))


def fidelity(pipe, identifier: str) -> dict:
    from train.digits_eval import prompt_share

    prompt = INSTANCE_PROMPT.format(identifier)
    return {f"g{g:g}": round(prompt_share(pipe, prompt, 9, n=100, guidance_scale=g), 3) for g in GUIDANCE}


def scores(run_or_ckpt, identifier: str) -> dict:
    pipe = pipeline(Path(run_or_ckpt) / "checkpoints" / "last.ckpt" if Path(run_or_ckpt).is_dir() else run_or_ckpt)
    prior = digits_metrics(pipe, GUIDANCE, n_per_digit=20, digits=range(9))
    return {"fidelity_nine": fidelity(pipe, identifier), "prior_accuracy_0_8": prior["prompt_accuracy"],
            "prior_accuracy_by_guidance": {k: v for k, v in prior.items() if k.startswith("prompt_accuracy_g")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base", type=Path, help="reuse a base run directory trained on digits 0-8")
    ap.add_argument("--base-steps", type=int, default=1500)
    ap.add_argument("--experiment", default="dreambooth_lora")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for the DreamBooth runs")
    ap.add_argument("--base-extra", nargs="*", default=[],
                    help="overrides for the base run (another family: experiment=flux model.pretrained=VAE_DIR)")
    ap.add_argument("--variants", nargs="+", default=["with_prior", "without_prior"],
                    choices=["with_prior", "without_prior"], help="which DreamBooth runs (default both)")
    ap.add_argument("--class-prompts", choices=["class", "digits"], default="class",
                    help="class: one class prompt ('a handwritten digit'); digits: the nine prompts 'a handwritten "
                         "digit k', k = 0..8, whose accuracy the prior-preservation figure measures")
    ap.add_argument("--class-source", choices=["generated", "real"], default="generated",
                    help="generated: the base model's samples (DreamBooth's prior preservation); real: real digits 0-8 "
                         "with their captions (regularization images; needs --class-prompts digits)")
    ap.add_argument("--identifier", default="sks", help="the subject's identifier word in the instance prompt")
    ap.add_argument("--class-guidance", type=float, default=2.0, help="guidance of the generated class images")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"benchmark": "dreambooth_digits", "experiment": args.experiment}

    base = args.base
    if base is None:
        shards = args.out / "shards-0-8"
        subprocess.run([sys.executable, "-m", "train.ops.shards", "digits", "--digits", "0-8", "--out", str(shards)],
                       cwd=ROOT, check=True)
        s = train(args.out, "base-0-8", f"data.urls={shards}", f"trainer.max_steps={args.base_steps}",
                  "callbacks.digits_eval.enabled=false", *args.base_extra)
        result["base_train_seconds"] = s["wall_seconds"]
        base = args.out / "base-0-8"
    result["base"] = str(base)
    result["identifier"] = args.identifier
    result["before"] = scores(base, args.identifier)

    instance = args.out / "instance"
    write_instance_images(instance)
    from data.digits import eval_prompt

    class_prompt = CLASS_PROMPT if args.class_prompts == "class" else f"[{','.join(eval_prompt(d) for d in range(9))}]"
    result["class_prompt"] = class_prompt
    if args.class_source == "real":
        if args.class_prompts != "digits":
            raise SystemExit("--class-source real needs --class-prompts digits (each real digit keeps its own caption)")
        class_dir = args.out / "class_images_real"
        write_real_class_images(class_dir)
    else:
        class_dir = args.out / f"class_images_{args.class_prompts}_g{args.class_guidance:g}"
    result["class_source"], result["class_dir"] = args.class_source, str(class_dir)
    for name, prior in (("with_prior", True), ("without_prior", False)):
        if name not in args.variants:
            continue
        s = train(args.out, f"db-{name}", f"experiment={args.experiment}", f"model.pretrained={base}",
                  f"data.instance_dir={instance}", f"data.instance_prompt={INSTANCE_PROMPT.format(args.identifier)}",
                  f"data.class_prompt={class_prompt}", f"data.prior_preservation={str(prior).lower()}",
                  f"data.class_dir={class_dir}", "data.num_class_images=198",
                  f"trainer.max_steps={args.steps}", f"optimizer.lr={args.lr}", "data.batch_size=8",
                  # digits are not mirror-symmetric (a flipped 3 is no 3): no flips; generated class images at the
                  # base's best guidance (--class-guidance), so the prior loss replays what the base does well
                  "data.random_flip=false", f"data.class_generation.guidance_scale={args.class_guidance}", *args.extra)
        result[name] = {"train_seconds": s["wall_seconds"], "peak_rss_mib": s["peak_rss_mib"], "command": s["command"],
                        **scores(args.out / f"db-{name}", args.identifier)}
    dump(result, args.out / "dreambooth_digits.json")


if __name__ == "__main__":
    main()
