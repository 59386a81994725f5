"""One digest of network weights, to tell whether two bases are the same without storing them: per tensor its name,
shape, sum and sum of squares in float64. Checkpoints (frozen base, 7 significant digits) and latent caches (VAE and
text encoder, 10) keep the precision their files were written with."""
from __future__ import annotations

import hashlib
from typing import Iterable

import torch

CHECKPOINT_DIGITS = 6  # what every checkpoint's `frozen_fingerprint` was written with
CACHE_DIGITS = 9       # what every latent cache's `cache.json` was written with


def weights_fingerprint(named: Iterable[tuple[str, torch.Tensor]], digits: int = CACHE_DIGITS) -> str:
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda item: item[0]):
        t = t.detach().double()
        h.update(f"{name}:{tuple(t.shape)}:{float(t.sum()):.{digits}e}:{float((t * t).sum()):.{digits}e}".encode())
    return h.hexdigest()[:16]
