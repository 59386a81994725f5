"""Frozen text-encoder outputs kept for captions that repeat within a run.

A frozen text encoder in eval mode is a pure function of a caption's token ids, and real data repeats captions: class
prompts of DreamBooth, a few templates per class, the empty prompt of caption dropout and classifier-free guidance,
every caption again in each epoch of a small fine-tuning set. `TextCache.encode` runs the encoder only on the rows it
has not seen (once per distinct row of the batch) and assembles the batch from stored rows, least recently used
evicted beyond `max_mb`. Rows are encoded in batches as before, so the values are those of the uncached run (equal
bit for bit where the encoder's kernels do not depend on the batch size, as on CPU; to rounding otherwise).

Row keys are the ids' bytes. On a CPU the ids are read where they are; on an accelerator the keys must come from
the host (`batch["id_keys"]`, made by the loader's collate), since reading device ids back would stall the step.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch

from models.tokens import row_keys


def _autocast_state(device_type: str) -> bytes:
    if not torch.is_autocast_enabled(device_type):
        return b"fp|"
    return str(torch.get_autocast_dtype(device_type)).encode() + b"|"


class TextCache:
    def __init__(self, max_mb: float = 256.0):
        self.max_bytes = int(float(max_mb) * 2**20)
        self.rows: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self.rows.clear()
        self.bytes = 0

    def encode(self, encoder: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
               keys: Sequence[bytes] | None = None) -> torch.Tensor:
        """`encoder(input_ids)` ([B, ...] out), each distinct row encoded once and kept for later batches."""
        if self.max_bytes <= 0:
            return encoder(input_ids)
        if keys is None:
            if input_ids.device.type != "cpu":
                return encoder(input_ids)  # no host keys: reading the ids back would synchronise the device
            keys = row_keys(input_ids)
        if len(keys) != input_ids.shape[0]:
            raise ValueError(f"text cache: {len(keys)} keys for {input_ids.shape[0]} rows of token ids")
        context = _autocast_state(input_ids.device.type)  # the same ids give bf16 rows under autocast, fp32 outside
        keys = [context + key for key in keys]
        got: dict[bytes, torch.Tensor] = {}
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
            index = torch.tensor(list(new.values()), device=input_ids.device)
            out = encoder(input_ids.index_select(0, index)).detach()
            for key, row in zip(new, out):
                got[key] = row.clone()  # its own storage: a view would keep the whole batch alive
                self._store(key, got[key])
        return torch.stack([got[key] for key in keys])

    def _store(self, key: bytes, row: torch.Tensor) -> None:
        size = row.numel() * row.element_size()
        if size > self.max_bytes:
            return
        self.rows[key] = row
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.rows.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
