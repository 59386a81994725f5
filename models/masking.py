"""Micro-budget deferred masking (Sehwag et al., "Stretching each dollar") for the transformer backbones.

The first `mixer_layers` transformer blocks are the patch-mixer: they see every patch token. After them a random
`ratio` of the tokens is dropped per sample, the remaining blocks and the output layer run on the kept tokens only
(the saving), and the loss counts only the kept patches. Late in training (`unmasked_from`) masking switches off,
so the final phase trains unmasked, which the paper needs to close the train/test gap.

The mixer is the front of the same diffusers block stack, not an extra module, so a masked-trained model is a plain
`PixArtTransformer2DModel` on disk: exports, sampling and every other method see an ordinary transformer. Masking is
applied with forward hooks and only inside `PatchMasking.apply`, so sampling, evaluation and the reference/teacher
calls of other methods always run unmasked.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from models.backbones import is_dit


class PatchMasking:
    def __init__(self, model: torch.nn.Module, ratio: float, mixer_layers: int = 1, unmasked_from: float = 0.8):
        if not is_dit(model):
            raise ValueError(f"masking.ratio={ratio}: patch masking needs a DiT/PixArt transformer backbone "
                             f"(model=dit_tiny or a PixArt folder), not a {type(model).__name__}; set masking.ratio=0")
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"masking.ratio={ratio}: expected a share of dropped patches in [0, 1), e.g. 0.5 or 0.75")
        n_blocks = len(model.transformer_blocks)
        if not 0 <= mixer_layers < n_blocks:
            raise ValueError(f"masking.mixer_layers={mixer_layers}: the backbone has {n_blocks} blocks; the patch-mixer"
                             f" takes 0 to {n_blocks - 1} of them so at least one block runs on the kept tokens")
        if not 0.0 <= unmasked_from <= 1.0:
            raise ValueError(f"masking.unmasked_from={unmasked_from}: expected a fraction of trainer.max_steps in [0, 1]")
        self.model, self.ratio, self.mixer_layers, self.unmasked_from = model, float(ratio), mixer_layers, unmasked_from
        self._keep: torch.Tensor | None = None  # [B, n_keep] token indices while a masked call is in flight
        self._n_tokens = 0
        gate = model.transformer_blocks[mixer_layers - 1] if mixer_layers else model.pos_embed
        self._hooks = [gate.register_forward_hook(self._drop), model.proj_out.register_forward_hook(self._restore)]

    def remove(self) -> None:
        """Detach from the model (it is a plain transformer again)."""
        for hook in self._hooks:
            hook.remove()

    @property
    def kept(self) -> torch.Tensor | None:
        """The kept token indices [B, n_keep] while a masked call is in flight, else None."""
        return self._keep

    def active(self, step: int, max_steps: int | None) -> bool:
        """Masked phase: ratio > 0 and before `unmasked_from` x max_steps (always, when max_steps is unknown)."""
        return self.ratio > 0 and not (max_steps and max_steps > 0 and step >= self.unmasked_from * max_steps)

    def n_keep(self, n_tokens: int) -> int:
        return max(1, round(n_tokens * (1.0 - self.ratio)))

    def draw(self, batch: int, n_tokens: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sorted indices of the kept tokens, [batch, n_keep], a fresh random subset per sample."""
        scores = torch.rand((batch, n_tokens), generator=generator, device=generator.device if generator else device)
        return scores.argsort(dim=1)[:, : self.n_keep(n_tokens)].sort(dim=1).values.to(device)

    @contextlib.contextmanager
    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Within the block, model calls on inputs shaped like `x` drop tokens; yields the pixel mask [B, 1, H, W]
        (1 where a patch was kept) that the loss multiplies in."""
        p = self.model.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        keep = self.draw(x.shape[0], h * w, x.device, generator)
        tokens = torch.zeros(x.shape[0], h * w, device=x.device, dtype=x.dtype)
        tokens.scatter_(1, keep, 1.0)
        mask = tokens.view(-1, 1, h, w).repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
        self._keep, self._n_tokens = keep, h * w
        try:
            yield mask
        finally:
            self._keep = None

    def _drop(self, module, args, output):
        if self._keep is None:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        idx = self._keep.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        kept = hidden.gather(1, idx)
        return (kept, *output[1:]) if isinstance(output, tuple) else kept

    def _restore(self, module, args, output):
        if self._keep is None:
            return output
        full = output.new_zeros(output.shape[0], self._n_tokens, output.shape[-1])
        return full.scatter(1, self._keep.to(output.device).unsqueeze(-1).expand(-1, -1, output.shape[-1]), output)
