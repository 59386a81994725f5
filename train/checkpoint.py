"""Checkpoints: atomic writes, safe loads, resume resolution, and checkpoint -> components/pipeline.

Every checkpoint carries the run's resolved config (secrets scrubbed) so sampling, export and evaluation
rebuild exactly the module that was trained, through the same builder as training.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to `<name>.tmp`, fsync, then rename: a crash mid-write leaves the previous checkpoint loadable,
    and a failed write (disk full) raises with the path named while the old file stays intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OSError(f"could not write checkpoint '{path}': {e.strerror or e}; the previous checkpoint is "
                          "untouched. Free space or set paths.output_dir to a larger disk.") from e

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        fs = get_filesystem(path)
        if not fs.exists(path):
            raise FileNotFoundError(f"ckpt_path: no checkpoint at '{path}'")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


# The only non-tensor objects DeepSpeed (0.14-0.19) pickles into its shard files: bookkeeping of the loss scaler, the
# ZeRO stage and where each parameter's fragment lies. Nothing else is unpickled from a shard.
DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address")


def check_shard_files(folder: str | Path) -> None:
    """Refuse a sharded checkpoint whose files carry pickled objects beyond tensors, containers and DeepSpeed's own
    bookkeeping classes: such a file could run code when loaded. The scan reads only each pickle's opcodes
    (`torch.serialization.get_unsafe_globals_in_checkpoint`, which also rejects the opcodes that import by other
    means); it runs nothing. DeepSpeed's readers (resume, `zero_to_fp32`) load the files only after this check."""
    for f in sorted(Path(folder).rglob("*.pt")):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
        except Exception as e:  # not a zip/pickle torch can scan: refuse rather than hand it to a full unpickler
            raise ValueError(f"checkpoint shard '{f}' cannot be checked ({type(e).__name__}: {e}); only load "
                             "sharded checkpoints written by foundry-train") from None
        extra = sorted(set(unsafe) - set(DEEPSPEED_GLOBALS))
        if extra:
            raise ValueError(f"checkpoint shard '{f}' carries pickled object(s) {', '.join(extra)}: refusing to load "
                             "it (it could run code). Load sharded checkpoints only from your own runs; exported "
                             "safetensors folders and LoRA files are safe from any source")


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A DeepSpeed checkpoint folder (one shard per rank) as foundry-train writes it under ZeRO."""
    p = Path(path).expanduser()
    return p.is_dir() and ((p / "latest").is_file() or (p / "checkpoint").is_dir())


def is_checkpoint(path: str | Path) -> bool:
    return Path(path).expanduser().is_file() or is_sharded_checkpoint(path)


def checkpoint_step(path: str | Path) -> int | str:
    """The global step a checkpoint was written at (read without loading a sharded one)."""
    p = Path(path)
    if is_sharded_checkpoint(p):
        meta = p / "foundry.json"
        return json.loads(meta.read_text()).get("global_step", "?") if meta.is_file() else "?"
    return torch.load(p, map_location="cpu", weights_only=True).get("global_step", "?")


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str | Path) -> str | None:
    """`last` -> the run's last.ckpt if it exists (a requeued run resumes); a path must exist.

    A sharded last.ckpt is a folder; if a crash fell between its two renames, `last.ckpt.old` is the last whole one."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        last = Path(run_dir) / "checkpoints" / "last.ckpt"
        for candidate in (last, last.with_name("last.ckpt.old")):
            if is_checkpoint(candidate):
                return _checked(str(candidate))
        log.info("no checkpoint at %s: starting fresh", last)
        return None
    if not is_checkpoint(ckpt_path):
        raise FileNotFoundError(f"ckpt_path: no checkpoint at '{ckpt_path}'; give a .ckpt file (or a sharded "
                                "checkpoint folder), 'last' or null")
    return _checked(ckpt_path)


def _checked(path: str) -> str:
    """A file checkpoint loads with `weights_only=True` (AtomicCheckpointIO); DeepSpeed resumes a sharded one with
    its own unrestricted loader, so its files are scanned first."""
    if is_sharded_checkpoint(path):
        check_shard_files(path)
    return path


def consolidate(path: str | Path) -> dict[str, Any]:
    """A sharded DeepSpeed checkpoint (ZeRO-2 or 3) -> one checkpoint dict with the whole fp32 trained weights.

    The trained tensors are gathered from every rank's shard by DeepSpeed's own converter; frozen ones were never
    saved (they come from the rebuilt base). DeepSpeed's converter unpickles the shard files without restriction,
    so they are scanned first (`check_shard_files`); the result is plain tensors and loads with `weights_only=True`.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, get_model_state_file
    from lightning.pytorch.utilities.deepspeed import ds_checkpoint_dir

    p = Path(path)
    check_shard_files(p)
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(p), exclude_frozen_parameters=True)
    meta = json.loads((p / "foundry.json").read_text()) if (p / "foundry.json").is_file() else {}
    model_file = get_model_state_file(ds_checkpoint_dir(str(p)), meta.get("zero_stage", 2))
    client = torch.load(model_file, map_location="cpu", weights_only=True)  # tensors and containers only
    engine_keys = {"module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps", "global_steps",
                   "dp_world_size", "mp_world_size", "ds_config", "ds_version", "buffer_names", "param_shapes",
                   "frozen_param_shapes", "shared_params", "frozen_param_fragments", "data_sampler",
                   "random_ltd", "sparse_tensor_module_names"}
    checkpoint = {k: v for k, v in client.items() if k not in engine_keys}
    checkpoint["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in state_dict.items()}
    return checkpoint


def write_consolidated(path: str | Path, out: str | Path) -> Path:
    """`foundry-export --consolidate`: a sharded checkpoint -> one .ckpt file (atomic), usable everywhere a .ckpt is."""
    out = Path(out)
    AtomicCheckpointIO().save_checkpoint(consolidate(path), out)
    return out


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint, loaded without unpickling arbitrary objects (a sharded one is consolidated first)."""
    p = Path(path)
    if is_sharded_checkpoint(p):
        return consolidate(p)
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at '{p}'; give a .ckpt file from <run_dir>/checkpoints/")
    return torch.load(p, map_location="cpu", weights_only=True)


def find_checkpoint(path: str | Path) -> Path:
    """Accept a .ckpt, or a run directory (its checkpoints/last.ckpt)."""
    p = Path(path).expanduser()
    if p.is_dir() and is_checkpoint(p / "checkpoints" / "last.ckpt"):
        return p / "checkpoints" / "last.ckpt"
    if is_checkpoint(p):
        return p
    raise FileNotFoundError(f"no checkpoint at '{p}'; give a .ckpt or a run directory with checkpoints/last.ckpt")


def is_training_checkpoint(path: str | Path) -> bool:
    """A .ckpt file or a run directory (as opposed to a diffusers folder)."""
    p = Path(path).expanduser()
    return is_checkpoint(p) or is_checkpoint(p / "checkpoints" / "last.ckpt")


def is_diffusers_folder(path: str | Path) -> bool:
    """A model folder of any family (a denoiser in unet/ or transformer/, or a pipeline's model_index.json)."""
    p = Path(path).expanduser()
    return p.is_dir() and any((p / name).exists() for name in ("unet", "transformer", "model_index.json"))


# ----- resuming onto a rebuilt module: what the checkpoint holds must fit it -----
def check_state_dict(module, state_dict: dict[str, Any], fingerprint: str | None) -> None:
    """A checkpoint must hold every trainable tensor; the frozen ones come from the rebuilt base, which must match."""
    frozen = module.frozen_keys()
    missing = [k for k, _ in module.named_parameters() if k not in state_dict and k not in frozen]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} trainable tensor(s) (e.g. '{missing[0]}'): it was written "
                         "by a run with other adapter/model settings; resume with the same model and adapter config")
    check_fingerprint(module, fingerprint)


def check_family(module, family: str | None) -> None:
    if family and family != module.components.family:
        raise ValueError(f"checkpoint: written by a {family}-family model, but this run builds a "
                         f"{module.components.family}-family one; resume with the checkpoint's model config")


def check_fingerprint(module, fingerprint: str | None) -> None:
    if fingerprint and fingerprint != module._frozen_fingerprint:
        raise ValueError("checkpoint: the frozen base weights differ from the ones this checkpoint was trained on "
                         "(model.pretrained changed on disk, or another preset/seed); point model.* at the same base")
