"""One digest of network weights, to tell whether two bases are the same without storing them: per tensor its name,
shape, sum and sum of squares in float64. Checkpoints (frozen base, 7 significant digits) and latent caches (VAE and
text encoder, 10) keep the precision their files were written with."""
from __future__ import annotations

import hashlib
from typing import Iterable

import torch

CHECKPOINT_DIGITS = 6  # what every checkpoint's `frozen_fingerprint` was written with
CACHE_DIGITS = 9       # what every latent cache's `cache.json` was written with


def remember_source(param: torch.Tensor, source: torch.Tensor) -> None:
    """Make `param` fingerprint as `source` did: for weights stored in another form (quantized, or swapped out to
    the CPU between uses), so a run's frozen-base fingerprint does not depend on memory settings."""
    t = source.detach().double()
    param.fingerprint_source = (tuple(source.shape), float(t.sum()), float((t * t).sum()))


def _stats(t: torch.Tensor) -> tuple[tuple[int, ...], float, float]:
    source = getattr(t, "fingerprint_source", None)
    if source is not None:
        return source
    t = t.detach().double()
    return tuple(t.shape), float(t.sum()), float((t * t).sum())


def weights_fingerprint(named: Iterable[tuple[str, torch.Tensor]], digits: int = CACHE_DIGITS) -> str:
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda item: item[0]):
        shape, total, squares = _stats(t)
        h.update(f"{name}:{shape}:{total:.{digits}e}:{squares:.{digits}e}".encode())
    return h.hexdigest()[:16]
