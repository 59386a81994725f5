"""Flux's 2x2 latent packing, shared by the families that use it (Flux.1, Qwen-Image): `[B, C, h, w]` latents <->
`[B, h/2 * w/2, 4C]` tokens, with FluxPipeline's own helpers as the one definition, and a sampling callback that
shows the caller unpacked latents like every other pipeline here."""
from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import FluxPipeline


def pack(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return FluxPipeline._pack_latents(x, b, c, h, w)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Packed tokens -> `[B, C, h, w]` (h, w: the latent side)."""
    return FluxPipeline._unpack_latents(x, h, w, 1)


def unpacked_callback(callback: Callable, h: int, w: int) -> Callable:
    """A `callback_on_step_end` that sees (and may replace) unpacked latents while the pipeline keeps packed ones."""
    def call(pipe, i, t, tensors: dict[str, Any]) -> dict[str, Any]:
        out = callback(pipe, i, t, {**tensors, "latents": unpack(tensors["latents"], h, w)})
        return {**tensors, **out, "latents": pack(out["latents"])} if "latents" in out else tensors
    return call
