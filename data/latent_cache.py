"""Latent and text-embedding caches: the format and the reader (the writer, which runs the model, is
train/encode.py: `foundry-shards encode IN --out OUT --model MODEL`).

The VAE and the text encoder run once over image shards; training then reads the cached shards through the same
data module and the same model, and simply skips the encoders (`DiffusionModule.batch_x0` / `batch_context`).

- One cached shard per image shard, same name; each is written to a temporary name and renamed, so after a crash
  the next run skips the shards that exist and redoes only the rest (and any partial temporary file). Shards are
  shared by index between processes (`--procs N` here, or `--part K/N` on several machines or GPUs).
- Per sample, `latents.safetensors` holds `latent_mean` and `latent_std` (the VAE's distribution, already scaled
  to the UNet's space, so training draws a fresh latent each time exactly as on-the-fly encoding does) and,
  unless `--no-text`, `context` (the text encoder's output for the full caption; dropped captions get the empty
  prompt's context at training time). `txt` and `json` are kept. Stored in fp16 (default), bf16 or fp32; the VAE
  runs in fp32 or bf16, never fp16 (SDXL's VAE overflows in fp16).
- `cache.json` beside the shards records what made them: the model, fingerprints of the VAE and text encoder
  weights, the VAE scaling, the shapes and dtype. A run whose model has a different VAE or text encoder is
  refused in one line naming both; samples with a wrong shape or dtype are skipped and counted (`bad_tensor`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from data.transforms import BadSample
from models.fingerprint import CACHE_DIGITS, weights_fingerprint

log = logging.getLogger(__name__)

FORMAT = "foundry-latents/1"
MANIFEST = "cache.json"
MEMBER = "latents.safetensors"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
VAE_DTYPES = ("fp32", "bf16")


def model_fingerprint(model: torch.nn.Module | None) -> str | None:
    """The cache's record of an encoder (models/fingerprint.py)."""
    return None if model is None else weights_fingerprint(model.state_dict().items(), CACHE_DIGITS)


def manifest_path(urls: list[str]) -> Path | None:
    """`cache.json` beside local shards (None for remote URLs or image shards)."""
    local = [u for u in urls if not u.startswith("pipe:")]
    if not local:
        return None
    path = Path(local[0]).parent / MANIFEST
    return path if path.is_file() else None


def read_manifest(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"data.urls: '{path}' is not a latent cache manifest of format {FORMAT}; re-encode with "
                         "foundry-shards encode")
    return data


def check_cache(manifest: dict[str, Any], comps, where: str, text_trains: bool = False) -> None:
    """Refuse, in one line naming both, a cache made with other encoders than the run's model (or one whose
    latents the model cannot take)."""
    ours = model_fingerprint(comps.vae)
    if comps.vae is None:
        raise ValueError(f"data.urls: '{where}' holds cached latents (VAE {manifest['vae_fingerprint']} of "
                         f"{manifest['model']}) but this run's model is pixel-space; use a latent model or image shards")
    if manifest["vae_fingerprint"] != ours:
        raise ValueError(f"data.urls: '{where}' was encoded with the VAE of {manifest['model']} (fingerprint "
                         f"{manifest['vae_fingerprint']}), this run's VAE is {ours}; re-encode with foundry-shards "
                         "encode --model <this run's model> or train on the image shards")
    shape = [comps.in_channels, comps.sample_size, comps.sample_size]
    if list(manifest["latent_shape"]) != shape:
        raise ValueError(f"data.urls: '{where}' holds latents of shape {manifest['latent_shape']}, this run's model "
                         f"takes {shape}; re-encode at model.resolution={comps.resolution}")
    if manifest.get("text_fingerprint") is not None:
        theirs, mine = manifest["text_fingerprint"], model_fingerprint(comps.text_encoder)
        if theirs != mine:
            raise ValueError(f"data.urls: '{where}' holds text embeddings of the text encoder of {manifest['model']} "
                             f"(fingerprint {theirs}), this run's text encoder is {mine}; re-encode, or encode "
                             "with --no-text")
        if text_trains:
            raise ValueError(f"data.urls: '{where}' holds cached text embeddings but this run trains the text "
                             "encoder (model.train_text_encoder or adapter.text_encoder); encode with --no-text")


def expected_shapes(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the stream checks every cached sample against."""
    return {"latent_shape": tuple(manifest["latent_shape"]),
            "context_shape": tuple(manifest["context_shape"]) if manifest.get("context_shape") else None,
            "dtype": manifest["dtype"]}


def decode_cached(data: bytes, expect: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """One sample's tensors, checked; raises BadSample (counted by reason) for a bad one."""
    from safetensors.torch import load


    try:
        tensors = load(data)
    except Exception as exn:  # noqa: BLE001 - any parse failure is a corrupt member
        raise BadSample("bad_tensor", f"{MEMBER} unreadable: {exn}") from None
    if "latent_mean" not in tensors or "latent_std" not in tensors:
        raise BadSample("no_tensor", f"{MEMBER} lacks latent_mean/latent_std (has {sorted(tensors)})")
    dtype = DTYPES[expect["dtype"]] if expect else None
    for key, shape in (("latent_mean", expect and expect["latent_shape"]), ("latent_std", expect and
                       expect["latent_shape"]), ("context", expect and expect["context_shape"])):
        t = tensors.get(key)
        if t is None:
            if key == "context" and expect and expect["context_shape"]:
                raise BadSample("no_tensor", f"{MEMBER} lacks context")
            continue
        if expect and (tuple(t.shape) != tuple(shape or ()) or t.dtype != dtype):
            raise BadSample("bad_tensor", f"{key} {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
        if not bool(torch.isfinite(t).all()):
            raise BadSample("bad_tensor", f"{key} has non-finite values")
    return tensors
