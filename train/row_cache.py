"""Frozen encoders' outputs kept for inputs that repeat within a run: captions for the text encoder, images for the
VAE. Neither changes what is computed.

- Text (`module.text_cache_mb`): a frozen text encoder in eval mode is a pure function of a caption's token ids, and
  real data repeats captions: class prompts of DreamBooth, a few templates per class, the empty prompt of caption
  dropout and classifier-free guidance, every caption again in each epoch of a small fine-tuning set. Least recently
  used rows are evicted beyond the bound.
- Latents (`module.latent_cache_mb`): the VAE's latent distribution (mean, std) of an image is a pure function of its
  pixels after the loader's transforms; a run that sees its images again (every epoch after the first: DreamBooth's
  few photos are seen hundreds of times) encodes each once. Each step still draws its own latent sample from the
  stored distribution with the module's generator, exactly as from a fresh encoding. Rows are kept first come (no
  eviction: a data set larger than the bound would otherwise miss on every row), in host memory on accelerators (the
  planner's device budget is untouched) and staged through pinned memory.

`RowCache.encode` runs the encoder only on the rows it has not seen (once per distinct row of the batch) and assembles
the batch from stored rows. Rows are encoded in batches as before, so the values are those of the uncached run (equal
bit for bit where the kernels do not depend on the batch size, as measured on CPU; to rounding otherwise). Keys come
from the host: the loader's collate makes them (`batch["id_keys"]`, `batch["pixel_keys"]`); on a CPU, token ids are
also read in place. Reading device tensors back would stall the step, so without host keys nothing is cached.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch

from models.tokens import row_keys

Rows = tuple[torch.Tensor, ...]


def _autocast_state(device_type: str) -> bytes:
    if not torch.is_autocast_enabled(device_type):
        return b"fp|"
    return str(torch.get_autocast_dtype(device_type)).encode() + b"|"


class RowCache:
    """Per-row outputs of a frozen encoder by host key, up to `max_mb` (0: off)."""

    def __init__(self, max_mb: float = 64.0, evict: bool = True, host: bool = False):
        self.max_bytes = int(float(max_mb) * 2**20)
        self.evict, self.host = evict, host
        self.rows: OrderedDict[bytes, Rows] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self.rows.clear()
        self.bytes = 0

    def encode(self, encoder: Callable[[torch.Tensor], Rows], inputs: torch.Tensor,
               keys: Sequence[bytes] | None) -> Rows:
        """`encoder(inputs)` (a tuple of [B, ...] tensors), each distinct row encoded once and kept."""
        if self.max_bytes <= 0 or keys is None:
            return encoder(inputs)
        if len(keys) != inputs.shape[0]:
            raise ValueError(f"row cache: {len(keys)} keys for {inputs.shape[0]} input rows")
        context = _autocast_state(inputs.device.type)  # the same input gives bf16 rows under autocast, fp32 outside
        keys = [context + key for key in keys]
        got: dict[bytes, Rows] = {}
        new: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key in got or key in new:
                continue
            row = self.rows.get(key)
            if row is None:
                new[key] = i
            else:
                self.rows.move_to_end(key)
                got[key] = row
        self.misses += len(new)
        self.hits += len(keys) - len(new)
        if new:
            index = torch.tensor(list(new.values()), device=inputs.device)
            out = encoder(inputs.index_select(0, index))
            for j, key in enumerate(new):
                # its own storage: a view would keep the whole batch alive
                got[key] = tuple(t[j].detach().to("cpu" if self.host else t.device, copy=True) for t in out)
                self._store(key, got[key])
        width = len(got[keys[0]])
        return tuple(self._assemble([got[key][k] for key in keys], inputs.device) for k in range(width))

    @staticmethod
    def _assemble(rows: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        stacked = torch.stack(rows)
        if stacked.device == device:
            return stacked
        return stacked.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else stacked.to(device)

    def _store(self, key: bytes, row: Rows) -> None:
        size = sum(t.numel() * t.element_size() for t in row)
        if size > self.max_bytes or (not self.evict and self.bytes + size > self.max_bytes):
            return
        self.rows[key] = row
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.rows.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in old)


def text_keys(input_ids: torch.Tensor, keys: Sequence[bytes] | None) -> Sequence[bytes] | None:
    """The text cache's keys: the loader's, else the ids' own bytes when they are on the host."""
    if keys is not None:
        return keys
    return row_keys(input_ids) if input_ids.device.type == "cpu" else None
