"""`foundry-recipe NAME`: one README results row, reproduced from the digits world in one command.

A recipe is a proof chain: make what it starts from (the base run, a DiT base, a family's VAE folder) unless given,
then run the proof script under benchmarks/ that trains and judges, and print the same JSON the README row was
measured from. Runs land under `--out`; prerequisites under `OUT/prereq/` and are reused when the recipe runs again.

    foundry-recipe list
    foundry-recipe lcm --out outputs/recipes/lcm [--base RUN] [--smoke] [-- script args ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"

# The README's rows start from one of these; each is itself made by a proof script.
PREREQS = {
    "base": ("base_digits.py", ["--name", "base"], "base"),  # the demo: foundry-train with its defaults
    "dit_base": ("base_digits.py", ["--name", "dit_base", "--extra", "experiment=dit", "trainer.max_steps=1500"],
                 "dit_base"),
    "flux_vae": ("family_digits.py", ["--only", "base"], "base"),  # the flux_tiny folder with its digits VAE
}


@dataclass(frozen=True)
class Recipe:
    script: str
    args: list[str]
    about: str
    needs: str | None = None  # a PREREQS key; `{base}` in args is replaced by its path
    smoke: list[str] = field(default_factory=list)  # script args that shrink data making under --smoke
    minutes: int = 15  # about, on a 2-core CPU

    def command(self, base: str | None, out: Path, extra: list[str]) -> list[str]:
        args = [a.replace("{base}", base or "") for a in self.args]
        return [sys.executable, str(BENCH / self.script), "--out", str(out), *args, *extra]


def _rl(variants: str, steps: int, needs: str = "base", *extra: str, minutes: int = 20) -> Recipe:
    return Recipe("rl_digits.py", ["--base", "{base}", "--steps", str(steps), "--variants", *variants.split(),
                                   *(["--extra", *extra] if extra else [])],
                  f"rl_digits {variants} ({steps} steps) from the {'DiT' if needs == 'dit_base' else 'demo'} base",
                  needs, minutes=minutes)


_DB = ["--class-prompts", "digits", "--class-source", "real", "--steps", "1000", "--lr", "1e-3", "--extra",
       "adapter.rank=16", "adapter.target=attn_mlp", "data.prior_caption_dropout=0.2", "method.prior_loss_weight=5"]
_FLUX_DB = ["--base-extra", "experiment=flux", "model.pretrained={base}", *_DB, "loss.timestep_sampling=logit_normal"]
_ONESTEP_SMOKE = ["--couplings", "32", "--reflow-steps", "4", "--distill-steps", "4", "--convert-steps", "4",
                  "--round-steps", "4", "--dm-steps", "4"]

RECIPES: dict[str, Recipe] = {
    "base": Recipe("base_digits.py", [], "the demo: foundry-train with its defaults, then the digits evaluation",
                   minutes=13),
    "lcm": Recipe("distill_digits.py", ["--teacher", "{base}", "--variants", "lcm"], "LCM student of the demo base",
                  "base"),
    "lcm_lora": Recipe("distill_digits.py", ["--teacher", "{base}", "--variants", "lcm_lora"],
                       "LCM-LoRA over the demo base", "base"),
    "guidance_distill": Recipe("distill_digits.py", ["--teacher", "{base}", "--variants", "guidance_distill"],
                               "guidance distillation of the demo base (one forward per step)", "base", minutes=12),
    "dpo_lora": Recipe("dpo_digits.py", ["--base", "{base}", "--variants", "dpo_lora"],
                       "Diffusion-DPO LoRA on pairs of the base's own samples ranked by the digits judge", "base",
                       ["--per-digit", "4", "--min-gap", "0"]),
    "dpo": Recipe("dpo_digits.py", ["--base", "{base}", "--variants", "dpo", "--lr", "3e-5"],
                  "Diffusion-DPO, full", "base", ["--per-digit", "4", "--min-gap", "0"]),
    "ddpo": _rl("ddpo", 300),
    "ddpo_lora": _rl("ddpo_lora", 300, "base", "optimizer.lr=1e-3"),
    "ddpo_jpeg": _rl("jpeg", 60),
    "alignprop": _rl("alignprop alignprop_augmented", 60),
    "draft2": _rl("draft2", 60),
    "grpo_window": _rl("grpo_window", 300, "dit_base"),
    "grpo_full": _rl("grpo_full", 300, "dit_base"),
    "grpo_full_no_kl": _rl("grpo_full_no_kl", 300, "dit_base"),
    "grpo_full_shuffled": _rl("grpo_full_shuffled", 300, "dit_base"),
    "grpo_full_jpeg": _rl("grpo_full_jpeg", 300, "dit_base"),
    "grpo_lora": _rl("grpo", 300, "dit_base"),
    "reflow": Recipe("onestep_digits.py", ["--teacher", "{base}", "--routes", "reflow"],
                     "2-rectified flow on teacher couplings, then distilled at sigma=1 (InstaFlow)", "base",
                     _ONESTEP_SMOKE, 20),
    "progressive": Recipe("onestep_digits.py", ["--teacher", "{base}", "--routes", "progressive"],
                          "progressive distillation to one step (from a v-prediction teacher)", "base",
                          _ONESTEP_SMOKE, 27),
    "dmd2": Recipe("onestep_digits.py", ["--teacher", "{base}", "--routes", "dmd2", "dmd2_2step", "dmd2_4step"],
                   "DMD2 one-, two- and four-step students", "base", _ONESTEP_SMOKE, 60),
    "dmd2_gan": Recipe("onestep_digits.py", ["--teacher", "{base}", "--routes", "dmd2_gan"],
                       "DMD2 with its GAN term", "base", _ONESTEP_SMOKE, 25),
    "vsd": Recipe("onestep_digits.py", ["--teacher", "{base}", "--routes", "vsd", "vsd_t999"],
                  "image-free VSD one-step students (t_c 899, and from T-1)", "base", _ONESTEP_SMOKE, 40),
    "spin": Recipe("spin_erase_digits.py", ["--base", "{base}", "--only", "spin"],
                   "SPIN-Diffusion self-play, 2 iterations", "base", minutes=10),
    "erase": Recipe("spin_erase_digits.py", ["--base", "{base}", "--only", "erase", "--erase-variants", "full",
                                             "--erase-lr", "1e-4", "--extra", "method.preserve_weight=3"],
                    "concept erasure (ESD-x) of 'seven', the other digits preserved", "base", minutes=10),
    "dreambooth_lora": Recipe("dreambooth_digits.py", _DB,
                              "DreamBooth LoRA: a base on digits 0-8 learns 'sks' from 5 nines (makes its base)",
                              smoke=["--base-steps", "4"], minutes=35),
    "dreambooth_flux": Recipe("dreambooth_digits.py", _FLUX_DB, "DreamBooth LoRA on the Flux.1 architecture",
                              "flux_vae", ["--base-steps", "4"], 40),
    "dreambooth_flux_int8": Recipe("dreambooth_digits.py", [*_FLUX_DB, "model.quantize=int8"],
                                   "the same over an int8-quantized base (QLoRA-style)", "flux_vae",
                                   ["--base-steps", "4"], 55),
    "dit": Recipe("dit_digits.py", ["--only", "dit"], "DiT, rectified flow + logit-normal timesteps", minutes=30),
    "dit_vs_unet": Recipe("dit_digits.py", ["--only", "unet"], "the UNet beside the DiT, same conditions",
                          minutes=35),
    "dit_mask50": Recipe("dit_digits.py", ["--only", "mask50"], "DiT + deferred masking 50%", minutes=15),
    "dit_mask75": Recipe("dit_digits.py", ["--only", "mask75"], "DiT + deferred masking 75%", minutes=15),
    "dit_repa": Recipe("dit_digits.py", ["--only", "repa"], "DiT + REPA (a label-free DINOv2-architecture encoder)",
                       minutes=55),
    "flux": Recipe("family_digits.py", ["--steps", "1500"], "Flux.1 architecture (flux_tiny) with its digits VAE",
                   smoke=["--vae-steps", "4"], minutes=11),
    "sd35": Recipe("family_digits.py", ["--preset", "sd35_tiny", "--experiment", "sd3", "--steps", "1500"],
                   "SD3.5 architecture (sd35_tiny) with its digits VAE", smoke=["--vae-steps", "4"], minutes=11),
    "latent_cache": Recipe("latent_cache_digits.py", ["--extra", "model.gradient_checkpointing=false"],
                           "latent digits from images, then from cached latents + text embeddings",
                           smoke=["--vae-steps", "4"], minutes=35),
}


def listing() -> str:
    pad = max(map(len, RECIPES)) + 2
    lines = [f"  {name:<{pad}}~{r.minutes:>3} min  {r.about}" + (f"  [starts from: {r.needs}]" if r.needs else "")
             for name, r in RECIPES.items()]
    return "\n".join(["recipes (minutes on a 2-core CPU, prerequisites made first unless --base is given):", *lines,
                      "Use: foundry-recipe NAME --out DIR [--base RUN] [--smoke]; README 'Results' has each row's."])


def last_json(text: str) -> dict:
    """The last top-level JSON object a proof script printed (its result; training logs go to files)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line == "{"]
    if not starts:
        raise SystemExit("foundry-recipe: the proof script printed no JSON result; see its output above")
    return json.JSONDecoder().raw_decode("\n".join(lines[starts[-1]:]))[0]


def run_script(cmd: list[str], env: dict) -> dict:
    print("+ " + shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    out = []
    for line in proc.stdout:  # echoed live, kept for the result
        sys.stdout.write(line)
        out.append(line)
    if proc.wait() != 0:
        raise SystemExit(f"foundry-recipe: {Path(cmd[1]).name} failed (exit {proc.returncode}); its run logs are "
                         f"under {cmd[cmd.index('--out') + 1]}")
    return last_json("".join(out))


def prerequisite(kind: str, out: Path, env: dict, smoke: list[str]) -> Path:
    script, args, folder = PREREQS[kind]
    where = out / "prereq" / kind
    made = where / folder
    if (made / "checkpoints" / "last.ckpt").is_file() or (made / "model_index.json").is_file():
        print(f"foundry-recipe: reusing {kind} at {made}", flush=True)
        return made
    print(f"foundry-recipe: making {kind} first (pass --base to start from your own)", flush=True)
    run_script([sys.executable, str(BENCH / script), "--out", str(where), *args,
                *(smoke if kind == "flux_vae" else [])], env)
    return made


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="foundry-recipe", description=__doc__, epilog="After --: more arguments for "
                                 "the proof script.", formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="a recipe (foundry-recipe list)")
    ap.add_argument("--out", type=Path, help="where the runs and the JSON go (default outputs/recipes/NAME)")
    ap.add_argument("--base", "--teacher", dest="base", help="the run (or family folder) the chain starts from")
    ap.add_argument("--smoke", action="store_true",
                    help="a few steps and samples per stage: checks the chain runs; its numbers mean nothing")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])  # after --: more arguments for the proof script, passed as they are
    extra = argv[cut + 1:]
    if args.name == "list":
        print(listing())
        return
    recipe = RECIPES.get(args.name)
    if recipe is None:
        raise SystemExit(f"foundry-recipe: no recipe {args.name!r}; `foundry-recipe list` shows the "
                         f"{len(RECIPES)} there are")
    if not (BENCH / recipe.script).is_file():
        raise SystemExit(f"foundry-recipe: {BENCH / recipe.script} is missing; recipes run from a source checkout "
                         "(pip install -e .)")
    if args.base and not Path(args.base).exists():
        raise SystemExit(f"foundry-recipe: --base {args.base} does not exist; give a run folder or omit --base to "
                         "make it")
    out = (args.out or Path("outputs") / "recipes" / args.name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    if args.smoke:
        env["FOUNDRY_RECIPE_SMOKE"] = "1"
    smoke = recipe.smoke if args.smoke else []
    t0 = time.perf_counter()
    base = args.base
    if recipe.needs and not base:
        base = str(prerequisite(recipe.needs, out, env, smoke))
    cmd = recipe.command(base and str(Path(base).resolve()), out, [*smoke, *extra])
    result = run_script(cmd, env)
    record = {"recipe": args.name, "about": recipe.about, "smoke": args.smoke, "base": base,
              "command": shlex.join(["foundry-recipe", *argv]),
              "script": shlex.join(cmd[1:]), "wall_seconds": round(time.perf_counter() - t0, 1), "result": result}
    (out / "recipe.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"foundry-recipe: {args.name} done in {record['wall_seconds']:.0f} s; {out / 'recipe.json'}", flush=True)


if __name__ == "__main__":
    main()
