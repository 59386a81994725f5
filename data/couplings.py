"""Teacher couplings: (noise, teacher output, caption) triples, for reflow (2-rectified flow) and DMD's regression loss.

`foundry-shards couplings --teacher RUN --out DIR` samples the teacher's deterministic ODE (DDIM, eta 0) from seeded
noise and writes shards of `noise.npy` (the exact float32 noise, restored bit for bit), `x0.npy` (the teacher's
output in the model's own space: pixels, or latents for latent models), `txt` and `json`. Shard k holds couplings
[k*maxcount, (k+1)*maxcount); rank r of W writes the shards k with k % W == r; each finished shard is renamed into
place, so a crashed run resumes by skipping the shards that exist. Streams read them as `data.kind=coupling`:
`batch["noise"]`, `batch["x0"]`; a sample without its noise (or with a malformed tensor) is skipped and counted.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from data.batch import collate
from data.digits import eval_prompt
from data.transforms import BadSample, decode_caption


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes | None, name: str) -> np.ndarray:
    if data is None:
        raise BadSample("no_tensor", f"coupling has no {name}.npy")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as exn:
        raise BadSample("bad_tensor", f"{name}.npy: {exn}") from None
    if arr.dtype != np.float32 or arr.ndim != 3:
        raise BadSample("bad_tensor", f"{name}.npy is {arr.dtype} {arr.shape}; expected float32 [C, H, W]")
    return arr


def decode_coupling(sample: dict[str, Any]) -> dict[str, Any]:
    noise, x0 = load_npy(sample.get("noise.npy"), "noise"), load_npy(sample.get("x0.npy"), "x0")
    if noise.shape != x0.shape:
        raise BadSample("bad_tensor", f"noise {noise.shape} and x0 {x0.shape} differ in shape")
    return {"noise": torch.from_numpy(noise), "x0": torch.from_numpy(x0), "caption": decode_caption(sample.get("txt")),
            "key": f"{sample.get('__url__', '')}/{sample['__key__']}", "meta": {}}


def collate_couplings(samples: Sequence[dict[str, Any]], skipped: dict[str, int] | None = None,
                      tokenizer: Any = None) -> dict[str, Any]:
    batch = collate([{**s, "pixels": s["x0"]} for s in samples], skipped, tokenizer=tokenizer)
    batch["x0"] = batch.pop("pixels")
    batch["noise"] = torch.stack([s["noise"] for s in samples])
    return batch


def couplings_prompts(source: str, n: int) -> list[str]:
    """`digits` (the evaluator's prompt for each digit, cycled) or a text file with one prompt per line."""
    if source == "digits":

        return [eval_prompt(i % 10) for i in range(n)]
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"foundry-shards couplings: --prompts '{source}' is neither 'digits' nor a text file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"foundry-shards couplings: {path} has no prompts")
    return [lines[i % len(lines)] for i in range(n)]
