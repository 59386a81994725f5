"""Reflow couplings: `foundry-shards couplings --teacher RUN` samples (noise, x0) pairs from a teacher (engine side:
it restores the teacher). The shard format and the reader are data/couplings.py's.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from data.couplings import couplings_prompts, npy_bytes
from train.build import load_pipeline


@torch.no_grad()
def write_couplings(teacher: str, out: str | Path, n: int, prompts: str = "digits", steps: int = 25,
                    guidance: float = 3.0, maxcount: int = 256, seed: int = 0, rank: int = 0, world: int = 1,
                    batch_size: int = 64) -> dict[str, Any]:
    """This rank's share of the couplings; returns written and skipped (already present) shard names."""
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(teacher)
    texts = couplings_prompts(prompts, n)
    comps_shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    written, present = [], []
    for k in range((n + maxcount - 1) // maxcount):
        if k % world != rank:
            continue
        name = f"couplings-{k:06d}.tar"
        if (out / name).exists():
            present.append(name)
            continue
        tmp = out / f".{name}.tmp"
        with wds.TarWriter(str(tmp), encoder=False, mtime=0) as sink:
            for start in range(k * maxcount, min(n, (k + 1) * maxcount), batch_size):
                idx = list(range(start, min(n, (k + 1) * maxcount, start + batch_size)))
                noise = torch.stack([torch.randn(comps_shape, generator=torch.Generator().manual_seed(seed * 10**9 + i))
                                     for i in idx])
                x0 = pipe([texts[i] for i in idx], num_inference_steps=steps, guidance_scale=guidance, latents=noise,
                          output_type="latent").images
                for j, i in enumerate(idx):
                    meta = {"teacher": str(teacher), "steps": steps, "guidance": guidance, "seed": seed, "index": i}
                    sink.write({"__key__": f"{i:08d}", "noise.npy": npy_bytes(noise[j].numpy().astype(np.float32)),
                                "x0.npy": npy_bytes(x0[j].float().cpu().numpy()), "txt": texts[i].encode("utf-8"),
                                "json": json.dumps(meta).encode("utf-8")})
        os.replace(tmp, out / name)
        written.append(name)
    return {"written": written, "already_present": present}
