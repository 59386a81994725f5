"""`foundry-plan`: will this run fit? The memory planner (train/plan.py) on the config `foundry-train` would compose
from the same overrides, printed as a table (or JSON with --json) before anything is launched.

    foundry-plan experiment=flux_lora model.preset=flux1_dev launcher.gpu_memory_gb=24
    foundry-plan experiment=dreambooth_lora model.pretrained=/models/sdxl data.batch_size=4 --json

Full-size presets (flux1_dev, sdxl, sd15, sd35_large, qwen_image, zimage) plan on the meta device, with no weights on
disk; a folder or a digits preset is built first (its weights are read) and planned from its own modules.
Exit status 0 when the run fits, 1 when it does not.
"""
from __future__ import annotations

import json
import logging
import sys

from data.webdataset import expand_urls
from train.ops.launch import memory_plan
from train.ops.resolvers import compose_config


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args
    args = [a for a in args if a != "--json"]
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        cfg = compose_config(args)
        plan = memory_plan(cfg, expand_urls(cfg.data.urls) if cfg.data.get("urls") else None)
    except (ValueError, FileNotFoundError) as err:
        print(f"foundry-plan: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(plan.to_json(), indent=2) if as_json else plan.table())
    sys.exit(0 if plan.fits else 1)


if __name__ == "__main__":
    main()
