"""`foundry-eval PATH`: score a checkpoint (.ckpt), a run directory or an exported pipeline folder; prints JSON.

Without `--prompts`: the digits-world evaluation (train/digits_eval.py) at several guidance scales.
With `--prompts FILE|NAME`: images for those prompts at each guidance scale, scored by any rewards
(`--reward pickscore=/models/PickScore_v1 --reward hpsv2=/models/HPSv2.1`), FID/KID against real images
(`--real DIR|SHARDS --features clip:FOLDER|inception:FILE`), and a held-out denoising loss at fixed timesteps and
noise (`--heldout SHARDS`, checkpoints and runs only). Results go to stdout, `--out`, the run's `eval/` folder
(read by `foundry-report`) and, with `--wandb PROJECT`, a W&B run.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from train.build import load_module, load_pipeline
from train.digits_eval import evaluate_digits
from train.ops.resolvers import CONF_DIR
from train.prompt_eval import ImageFeatures, evaluate_prompts, heldout_loss, read_prompts, real_images

log = logging.getLogger(__name__)


def build_reward(spec: str):
    """`NAME` or `NAME=PATH`: conf/reward/NAME.yaml, its `path` set to PATH."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    name, _, path = spec.partition("=")
    file = Path(CONF_DIR) / "reward" / f"{name}.yaml"
    if not file.is_file():
        known = sorted(p.stem for p in file.parent.glob("*.yaml"))
        raise ValueError(f"--reward: '{name}' is not one of {', '.join(known)}")
    cfg = OmegaConf.load(file)
    if path:
        cfg.path = path
    elif "path" in cfg.keys() and OmegaConf.is_missing(cfg, "path"):
        raise ValueError(f"--reward: '{name}' needs its weights: --reward {name}=/path/to/model")
    try:
        return name, instantiate(cfg)
    except Exception as e:  # hydra wraps the reward's own one-line error
        raise ValueError(f"--reward {name}: {str(e.__cause__ or e).splitlines()[0]}") from None


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="foundry-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a Lightning checkpoint (.ckpt), a run directory or an exported pipeline folder")
    ap.add_argument("--guidance", type=float, nargs="+", default=None, help="digits: 1 3 5; prompts: 1 3")
    ap.add_argument("--n-per-digit", type=int, default=20)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--no-ema", action="store_true", help="score the raw weights of a checkpoint, not the EMA")
    ap.add_argument("--sampler", default="ddim", help="ddim, ddpm, dpmpp, euler or lcm (few-step students)")
    ap.add_argument("--out", help="also write the metrics as JSON here")
    p = ap.add_argument_group("prompts (beyond the digits world)")
    p.add_argument("--prompts", help="a .txt (one per line), .json or .jsonl file, or a named set: digits")
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--reward", action="append", default=[], metavar="NAME[=PATH]",
                   help="a conf/reward/ config scoring the images, e.g. pickscore=/models/PickScore_v1 (repeatable)")
    p.add_argument("--real", help="real images for FID/KID: a folder of images or WebDataset shards")
    p.add_argument("--features", help="FID/KID features: clip:FOLDER (CLIPModel) or inception:FILE (torch-fidelity)")
    p.add_argument("--max-real", type=int, default=2000)
    p.add_argument("--heldout", help="held-out shards for the denoising loss (checkpoints and runs only)")
    p.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    p.add_argument("--heldout-batches", type=int, default=4)
    p.add_argument("--images", help="also save the generated images here, a folder per guidance scale")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--wandb", metavar="PROJECT", help="log the metrics to a W&B run in this project")
    return ap.parse_args(argv)


def prompt_metrics(args: argparse.Namespace) -> dict:
    prompts = read_prompts(args.prompts)
    rewards = dict(build_reward(spec) for spec in args.reward)
    if bool(args.real) != bool(args.features):
        raise ValueError("--real and --features go together (FID/KID needs real images and a feature network)")
    pipe = load_pipeline(args.model, use_ema=not args.no_ema, sampler=args.sampler)
    features = ImageFeatures(args.features) if args.features else None
    real = (lambda size: real_images(args.real, size, args.max_real, tokenizer=pipe.tokenizer)) if args.real else None
    metrics = evaluate_prompts(pipe, prompts, tuple(args.guidance or (1.0, 3.0)), args.steps, args.per_prompt,
                               args.seed, rewards, real, features, args.batch_size,
                               Path(args.images) if args.images else None)
    if args.heldout:
        if Path(args.model).is_dir() and (Path(args.model) / "model_index.json").is_file():
            raise ValueError("--heldout: needs a checkpoint or a run (an export has no training loss config)")
        module, cfg = load_module(args.model, use_ema=not args.no_ema)
        metrics.update({f"eval/{k}": v for k, v in heldout_loss(
            module, args.heldout, int(cfg.data.resolution), args.timesteps, args.heldout_batches).items()})
    metrics["eval/prompts"], metrics["eval/images_per_scale"] = len(prompts), len(prompts) * args.per_prompt
    return metrics


def publish(metrics: dict, args: argparse.Namespace) -> None:
    text = json.dumps(metrics, indent=2)
    print(text)
    targets = [Path(args.out)] if args.out else []
    run = Path(args.model)
    run = run if run.is_dir() else run.parent.parent if run.parent.name == "checkpoints" else None
    if args.prompts and run is not None and (run / "checkpoints").is_dir():  # foundry-report reads eval/
        targets.append(run / "eval" / "prompts.json")
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if args.wandb:
        import wandb

        with wandb.init(project=args.wandb, job_type="eval", config={"model": args.model, "prompts": args.prompts,
                                                                     "guidance": args.guidance, "steps": args.steps}) as r:
            r.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.prompts:
            metrics = prompt_metrics(args)
        else:
            pipe = load_pipeline(args.model, use_ema=not args.no_ema, sampler=args.sampler)
            metrics = evaluate_digits(pipe, guidance_scales=args.guidance or [1.0, 3.0, 5.0],
                                      n_per_digit=args.n_per_digit, steps=args.steps, seed=args.seed)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"foundry-eval: {e}", file=sys.stderr)
        return 2
    publish(metrics, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
