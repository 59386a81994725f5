"""The latent/text cache writer: `foundry-shards encode IN --out OUT --model MODEL` runs a trained or pretrained
model's VAE and text encoder over image shards (engine side: it restores models). The format, the manifest check and
the reader are data/latent_cache.py's.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from safetensors.torch import save as save_tensors

from data.latent_cache import DTYPES, FORMAT, MANIFEST, MEMBER, VAE_DTYPES, model_fingerprint
from data.transforms import BadSample, ImageTransform, decode_caption, load_image
from data.webdataset import IMAGE_KEYS, tar_samples
from models.tokens import tokenize
from train.build import load_components

log = logging.getLogger(__name__)


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_tensors({k: v.contiguous() for k, v in tensors.items()})


def _samples(url: str, counts: Counter):
    """(key, caption, meta bytes, image bytes) of one image shard; unreadable members counted, not fatal."""
    def handler(exn: Exception) -> bool:
        counts["read"] += 1
        return True

    for sample in tar_samples(iter([{"url": url}]), handler=handler):
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            counts["no_image"] += 1
            continue
        yield sample["__key__"], sample.get("txt"), sample.get("json"), sample[image_key]


def encode_shard(url: str, dest: Path, comps, transform, *, dtype: str, text: bool, batch_size: int,
                 vae_dtype: torch.dtype) -> Counter:
    """Encode one image shard into `dest` (through a temporary file); returns counts (written and skipped)."""
    counts: Counter = Counter()
    tmp = dest.with_name(f".{dest.name}.tmp")
    rng = random.Random(0)  # center crop, no flip: the transform draws nothing

    def flush(batch: list, sink) -> None:
        pixels = torch.stack([b[3] for b in batch])
        device = next(comps.vae.parameters()).device
        with torch.no_grad():

            mean, std = comps.spec.encode_latents(comps.vae, pixels.to(device, vae_dtype))
            ctx = None
            if text:
                ids = tokenize(comps.tokenizer, [b[1] for b in batch]).to(device)
                ctx = comps.text_encoder(ids)[0]
        for i, (key, caption, meta, _) in enumerate(batch):
            tensors = {"latent_mean": mean[i].to(DTYPES[dtype]).cpu(), "latent_std": std[i].to(DTYPES[dtype]).cpu()}
            if ctx is not None:
                tensors["context"] = ctx[i].to(DTYPES[dtype]).cpu()
            record = {"__key__": key, MEMBER: _tensor_bytes(tensors), "txt": caption.encode("utf-8")}
            if meta is not None:
                record["json"] = meta
            sink.write(record)
            counts["written"] += 1

    with wds.TarWriter(str(tmp), encoder=False, mtime=0) as sink:
        batch: list = []
        for key, txt, meta, data in _samples(url, counts):
            try:
                caption = decode_caption(txt, allow_missing=True)
                pixels = transform(load_image(data), rng)
            except BadSample as exn:
                counts[exn.reason] += 1
                continue
            batch.append((key, caption, meta, pixels))
            if len(batch) == batch_size:
                flush(batch, sink)
                batch = []
        if batch:
            flush(batch, sink)
    os.replace(tmp, dest)
    return counts


def manifest_for(comps, model: str, dtype: str, text: bool, resolution: int) -> dict[str, Any]:
    shape = [comps.in_channels, comps.sample_size, comps.sample_size]
    ctx_shape = None
    if text:
        with torch.no_grad():
            ids = tokenize(comps.tokenizer, [""]).to(next(comps.text_encoder.parameters()).device)
            ctx_shape = list(comps.text_encoder(ids)[0].shape[1:])
    return {"format": FORMAT, "model": str(model), "vae_fingerprint": model_fingerprint(comps.vae),
            "text_fingerprint": model_fingerprint(comps.text_encoder) if text else None,
            "scaling_factor": comps.vae.config.scaling_factor,
            "shift_factor": getattr(comps.vae.config, "shift_factor", None), "resolution": resolution,
            "latent_shape": shape, "context_shape": ctx_shape, "dtype": dtype, "stored": "mean_std"}


def encode_shards(urls: list[str], out: str | Path, model: str, *, dtype: str = "fp16", text: bool = True,
                  batch_size: int = 64, part: tuple[int, int] = (0, 1), device: str = "cpu",
                  vae_dtype: str = "fp32") -> dict[str, Any]:
    """This part's share of `urls` (shard i goes to part i % N), skipping shards already written."""
    if dtype not in DTYPES:
        raise ValueError(f"foundry-shards encode: --dtype {dtype} is not one of {', '.join(DTYPES)}")
    if vae_dtype not in VAE_DTYPES:
        raise ValueError(f"foundry-shards encode: --vae-dtype {vae_dtype}: use fp32 or bf16 (fp16 overflows in "
                         "SDXL's VAE)")
    k, n = part
    if not 0 <= k < n:
        raise ValueError(f"foundry-shards encode: --part {k}/{n}: K must be in 0..{n - 1}")
    comps = load_components(model)
    if comps.vae is None:
        raise ValueError(f"foundry-shards encode: --model {model} has no VAE (a pixel-space model); latents need a "
                         "latent model (vae/ in the folder)")
    comps.vae.to(device, DTYPES[vae_dtype]).eval()
    comps.text_encoder.to(device).eval()
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    manifest = manifest_for(comps, model, dtype, text, comps.resolution)
    mpath = out / MANIFEST
    if mpath.is_file():
        old = json.loads(mpath.read_text())
        keys = ("vae_fingerprint", "text_fingerprint", "latent_shape", "context_shape", "dtype")
        if any(old.get(key) != manifest[key] for key in keys):
            raise ValueError(f"foundry-shards encode: '{out}' holds a cache made with other settings or encoders "
                             f"({old.get('model')}); use a new --out")
    else:
        tmp = mpath.with_name(f".{MANIFEST}.tmp.{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, mpath)
    transform = ImageTransform(comps.resolution, center_crop=True, random_flip=False)
    done, written, counts = [], [], Counter()
    t0 = time.perf_counter()
    for i, url in enumerate(urls):
        if i % n != k:
            continue
        dest = out / Path(url.split()[-1] if url.startswith("pipe:") else url).name
        if dest.is_file():
            done.append(dest.name)
            continue
        counts += encode_shard(url, dest, comps, transform, dtype=dtype, text=text, batch_size=batch_size,
                               vae_dtype=DTYPES[vae_dtype])
        written.append(dest.name)
        log.info("encoded %s (%d samples so far)", dest.name, counts["written"])
    return {"written": written, "already_present": done, "samples": counts.pop("written", 0),
            "skipped": dict(counts), "seconds": round(time.perf_counter() - t0, 2), "out": str(out)}


def encode_parallel(urls: list[str], out: str | Path, model: str, procs: int = 1,
                    parts: list[tuple[int, int]] | None = None, **kw) -> dict[str, Any]:
    """One process per part (default: `procs` parts of this machine's whole share), each encoding its shards;
    results merged."""
    parts = parts or [(k, procs) for k in range(procs)]
    if len(parts) == 1:
        return encode_shards(urls, out, model, part=parts[0], **kw)
    ctx = mp.get_context("spawn")
    with ctx.Pool(len(parts)) as pool:
        results = pool.starmap(_encode_part, [(urls, str(out), model, part, kw) for part in parts])
    merged: dict[str, Any] = {"written": [], "already_present": [], "samples": 0, "skipped": Counter(),
                              "seconds": 0.0, "out": str(out)}
    for res in results:
        merged["written"] += res["written"]
        merged["already_present"] += res["already_present"]
        merged["samples"] += res["samples"]
        merged["skipped"].update(res["skipped"])
        merged["seconds"] = max(merged["seconds"], res["seconds"])
    merged["skipped"] = dict(merged["skipped"])
    return merged


def _encode_part(urls, out, model, part, kw):
    torch.set_num_threads(1)
    return encode_shards(urls, out, model, part=part, **kw)
