"""`foundry-train list`: what a run can be composed of, read from the config folders themselves (each file's first
comment line), so the list cannot drift from conf/."""
from __future__ import annotations

from pathlib import Path

GROUPS = ("experiment", "model", "method", "data", "strategy", "reward", "adapter", "launcher", "sweep")


def first_comment(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text.startswith("#") and not text.startswith("# @package"):
            return text.lstrip("# ").rstrip()
        if text and not text.startswith("#"):
            break
    return "-"


def listing(conf_dir: str | Path, width: int = 118) -> str:
    conf = Path(conf_dir)
    out = []
    for group in GROUPS:
        files = sorted((conf / group).glob("*.yaml"))
        if not files:
            continue
        out.append(f"{group}=  ({len(files)})")
        pad = max(len(f.stem) for f in files) + 2
        for f in files:
            line = f"  {f.stem:<{pad}}{first_comment(f)}"
            out.append(line if len(line) <= width else line[: width - 3] + "...")
    for kind, names in model_presets().items():
        out.append(f"model.preset= ({kind}): " + ", ".join(names))
    out.append("Use: foundry-train experiment=NAME [group=NAME ...] [key=value ...]; see README 'Using it for real'.")
    return "\n".join(out)


def model_presets() -> dict[str, list[str]]:
    """Size presets by kind: the UNets, the transformers (DiT / MMDiT) and each family's."""
    import importlib

    from models.backbones import TRANSFORMER_PRESETS as TRANSFORMERS  # lazy: `list` loads torch only here
    from models.tiny import PRESETS as UNETS  # lazy: as above

    out = {"UNet": sorted(UNETS), "DiT/MMDiT": sorted(TRANSFORMERS)}
    for family in ("flux", "flux2", "sd3", "qwen_image", "zimage"):
        out[family] = sorted(importlib.import_module(f"models.families.{family}").PRESETS)
    return out
