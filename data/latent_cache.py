"""Latent and text-embedding caches: `foundry-shards encode IN --out OUT --model MODEL`.

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

import hashlib
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT = "foundry-latents/1"
MANIFEST = "cache.json"
MEMBER = "latents.safetensors"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
VAE_DTYPES = ("fp32", "bf16")


def weights_fingerprint(model: torch.nn.Module | None) -> str | None:
    """A digest of a network's weights (per-tensor shape, sum and sum of squares in float64)."""
    if model is None:
        return None
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().double()
        h.update(f"{name}:{tuple(t.shape)}:{float(t.sum()):.9e}:{float((t * t).sum()):.9e}".encode())
    return h.hexdigest()[:16]


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
    ours = weights_fingerprint(comps.vae)
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
        theirs, mine = manifest["text_fingerprint"], weights_fingerprint(comps.text_encoder)
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

    from data.transforms import BadSample

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


# ----- the writer -----

def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def _samples(url: str, counts: Counter):
    """(key, caption, meta bytes, image bytes) of one image shard; unreadable members counted, not fatal."""
    from data.webdataset import IMAGE_KEYS, tar_samples

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
    import webdataset as wds

    from data.batch import tokenize
    from data.transforms import BadSample, decode_caption, load_image

    counts: Counter = Counter()
    tmp = dest.with_name(f".{dest.name}.tmp")
    rng = __import__("random").Random(0)  # center crop, no flip: the transform draws nothing

    def flush(batch: list, sink) -> None:
        pixels = torch.stack([b[3] for b in batch])
        device = next(comps.vae.parameters()).device
        with torch.no_grad():
            from models.components import vae_moments

            mean, std = vae_moments(comps.vae, pixels.to(device, vae_dtype))
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
        from data.batch import tokenize

        with torch.no_grad():
            ids = tokenize(comps.tokenizer, [""]).to(next(comps.text_encoder.parameters()).device)
            ctx_shape = list(comps.text_encoder(ids)[0].shape[1:])
    return {"format": FORMAT, "model": str(model), "vae_fingerprint": weights_fingerprint(comps.vae),
            "text_fingerprint": weights_fingerprint(comps.text_encoder) if text else None,
            "scaling_factor": comps.vae.config.scaling_factor,
            "shift_factor": getattr(comps.vae.config, "shift_factor", None), "resolution": resolution,
            "latent_shape": shape, "context_shape": ctx_shape, "dtype": dtype, "stored": "mean_std"}


def encode_shards(urls: list[str], out: str | Path, model: str, *, dtype: str = "fp16", text: bool = True,
                  batch_size: int = 64, part: tuple[int, int] = (0, 1), device: str = "cpu",
                  vae_dtype: str = "fp32") -> dict[str, Any]:
    """This part's share of `urls` (shard i goes to part i % N), skipping shards already written."""
    from data.transforms import ImageTransform
    from train.checkpoint import load_components

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
    import multiprocessing as mp

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
