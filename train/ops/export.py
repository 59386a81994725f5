"""`foundry-export`: a training checkpoint (or run directory) -> what people load.

- A full-model run: a diffusers pipeline folder.
- An adapter run (LoRA, DoRA, LoHa, LoKr): the adapter files (`pytorch_lora_weights.safetensors` for
  `pipeline.load_lora_weights`, `lora_kohya.safetensors` for A1111/ComfyUI/kohya), plus `base/`, the pipeline
  the adapter was trained on, when that base is not already a diffusers folder on disk.
- `--merge` (or `adapter.merge=true`): the adapter folded into a full pipeline folder.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from models.adapter_files import save_adapter
from models.adapters import AdapterSpec, has_peft_adapter, merge_adapters
from models.export import export_pipeline
from train.build import load_module
from train.checkpoint import find_checkpoint, is_diffusers_folder, is_sharded_checkpoint, write_consolidated  # noqa: F401

log = logging.getLogger(__name__)

LOAD_HINT = {True: "DiffusionPipeline.from_pretrained(path, trust_remote_code=True)",
             False: "StableDiffusionPipeline.from_pretrained(path)"}


def export_run(checkpoint: str | Path, out: str | Path, use_ema: bool = True, sampler: str = "ddim",
               merge: bool = False) -> dict[str, Path]:
    """Export one checkpoint; returns what was written ({"pipeline"| "diffusers" | "kohya" | "base": path})."""
    module, cfg = load_module(find_checkpoint(checkpoint), use_ema)
    comps = module.components
    spec = AdapterSpec(**cfg.adapter) if cfg.get("adapter") else AdapterSpec()
    adapted = [m for m in (comps.unet, comps.text_encoder) if has_peft_adapter(m)]
    out = Path(out)
    if not adapted or merge or spec.merge:
        for model in adapted:
            merge_adapters(model)
        return {"pipeline": export_pipeline(comps, out, sampler)}
    base = cfg.model.get("pretrained")
    base_id = str(base) if base else f"preset:{cfg.model.preset}@seed{cfg.model.seed}"
    trigger = cfg.data.get("instance_prompt") if cfg.get("data") else None
    written = save_adapter(comps, spec, out, base_model=base_id, trigger=trigger)
    if not (base and is_diffusers_folder(base)):  # give the adapter a pipeline to load into
        for model in adapted:
            merge_adapters(model, merge=False)
        written["base"] = export_pipeline(comps, out / "base", sampler)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="foundry-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a .ckpt file or a run directory")
    ap.add_argument("out", help="output folder")
    ap.add_argument("overrides", nargs="*", help="adapter.merge=true (same as --merge)")
    ap.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    ap.add_argument("--merge", action="store_true", help="fold an adapter into a full pipeline folder")
    ap.add_argument("--sampler", default="ddim", help="scheduler saved with the pipeline: ddim, ddpm, dpmpp, euler")
    ap.add_argument("--consolidate", metavar="FILE", help="also write a sharded (DeepSpeed) checkpoint as one .ckpt file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    merge = args.merge
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key != "adapter.merge" or value.lower() not in ("true", "false"):
            print(f"foundry-export: unknown override '{item}'; the only one is adapter.merge=true|false",
                  file=sys.stderr)
            return 2
        merge = merge or value.lower() == "true"
    try:
        if args.consolidate:
            ckpt = find_checkpoint(args.checkpoint)
            if not is_sharded_checkpoint(ckpt):
                raise ValueError(f"--consolidate: {ckpt} is already a single file; only sharded checkpoints need it")
            print(f"consolidated {ckpt} -> {write_consolidated(ckpt, args.consolidate)}")
        written = export_run(args.checkpoint, args.out, use_ema=not args.no_ema, sampler=args.sampler, merge=merge)
    except (FileNotFoundError, ValueError) as e:
        print(f"foundry-export: {e}", file=sys.stderr)
        return 2
    if "pipeline" in written:
        pixel = not (written["pipeline"] / "vae").is_dir()
        print(f"exported to {written['pipeline']}; load it with {LOAD_HINT[pixel]}")
    else:
        for kind, path in written.items():
            print(f"{kind}: {path}")
        print("load: pipe.load_lora_weights(<folder with pytorch_lora_weights.safetensors>) on the base pipeline"
              + (f" ({written['base']})" if "base" in written else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
