"""REPA (Yu et al., "Representation Alignment for Generation"): align an intermediate transformer hidden state with a
frozen vision encoder's patch features of the clean image.

A small trainable MLP projects the hidden state after block `layer` of the denoiser to the encoder's width; the loss is
the negative cosine similarity per patch token, averaged, added to the denoising loss with `weight`. The encoder
(DINOv2 or any transformers vision model with patch tokens, from a local folder) stays frozen and outside the module
tree; its patch grid is resized to the denoiser's token grid. The projector is training-only: it is saved in
checkpoints (resume) but not in exports, which stay plain diffusers transformers.

With patch masking on, the hidden state holds only the kept tokens (when `layer` comes after the patch-mixer), and the
targets are gathered at the same positions.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from models.backbones import is_dit

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_encoder(path: str) -> torch.nn.Module:
    """A transformers vision model from a local folder (DINOv2: `Dinov2Model`), frozen, in eval mode."""
    from transformers import AutoConfig, AutoModel

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"repa.encoder={path}: no config.json there; point it at a local transformers vision "
                                "model folder (e.g. a DINOv2 checkpoint saved with save_pretrained)")
    config = AutoConfig.from_pretrained(folder)
    for key in ("image_size", "patch_size", "hidden_size"):
        if not hasattr(config, key):
            raise ValueError(f"repa.encoder={path}: a {config.model_type} model has no {key}; REPA needs a ViT-style "
                             "encoder with patch tokens (DINOv2, ViT)")
    return AutoModel.from_pretrained(folder).requires_grad_(False).eval()


class RepresentationAlignment(torch.nn.Module):
    """The trainable projector; the frozen encoder and the hook on the denoiser are held beside it."""
    def __init__(self, denoiser: torch.nn.Module, encoder: torch.nn.Module, layer: int = 1, weight: float = 0.5,
                 projector_dim: int = 256):
        super().__init__()

        if not is_dit(denoiser):
            raise ValueError(f"repa.encoder: REPA aligns a DiT/PixArt transformer's patch tokens; a "
                             f"{type(denoiser).__name__} is not one; use model=dit_tiny (or a DiT/PixArt folder) or set repa.encoder=null")
        n_blocks = len(denoiser.transformer_blocks)
        if not 0 <= layer < n_blocks:
            raise ValueError(f"repa.layer={layer}: the backbone has {n_blocks} blocks; pick 0 to {n_blocks - 1}")
        hidden = denoiser.transformer_blocks[layer].norm1.normalized_shape[0]
        enc = encoder.config
        self.projector = torch.nn.Sequential(torch.nn.Linear(hidden, projector_dim), torch.nn.SiLU(),
                                             torch.nn.Linear(projector_dim, projector_dim), torch.nn.SiLU(),
                                             torch.nn.Linear(projector_dim, enc.hidden_size))
        object.__setattr__(self, "encoder", encoder)  # frozen, not a child: not trained, not in checkpoints
        self.layer, self.weight, self.patch_size = layer, float(weight), denoiser.config.patch_size
        self.enc_grid = enc.image_size // enc.patch_size
        self._captured: torch.Tensor | None = None
        self._armed = False
        self._hook = denoiser.transformer_blocks[layer].register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        if self._armed:
            self._captured = output[0] if isinstance(output, tuple) else output

    @torch.no_grad()
    def targets(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Encoder patch features of `images` ([-1, 1]) on the denoiser's token grid, [B, h*w, D]."""
        size = self.encoder.config.image_size
        x = F.interpolate((images.float() + 1) / 2, size=(size, size), mode="bicubic", align_corners=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        encoder = self.encoder.to(x.device)
        tokens = encoder(pixel_values=((x - mean) / std).to(next(encoder.parameters()).dtype)).last_hidden_state
        g = self.enc_grid
        patches = tokens[:, -g * g:].float()  # drop CLS and register tokens
        patches = patches.transpose(1, 2).reshape(-1, patches.shape[-1], g, g)
        if (g, g) != grid:
            patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
        return patches.flatten(2).transpose(1, 2)

    @contextlib.contextmanager
    def capture(self) -> Iterator["RepresentationAlignment"]:
        """Record the aligned layer's hidden state during the denoiser call(s) inside the block."""
        self._armed, self._captured = True, None
        try:
            yield self
        finally:
            self._armed = False

    def loss(self, images: torch.Tensor, x_shape: torch.Size, keep: torch.Tensor | None = None) -> torch.Tensor:
        """weight x (1 - mean cosine similarity) per sample, [B], for the hidden state captured last, whose denoiser
        input had shape `x_shape`. `keep`: the token indices patch masking kept (the hidden state may hold only those)."""
        if self._captured is None:
            raise RuntimeError("repa: the denoiser was not called inside capture()")
        hidden, self._captured = self._captured, None
        target = self.targets(images, (x_shape[-2] // self.patch_size, x_shape[-1] // self.patch_size))
        if keep is not None and hidden.shape[1] != target.shape[1]:
            target = target.gather(1, keep.to(target.device).unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        sim = F.cosine_similarity(self.projector(hidden).float(), target, dim=-1)
        return self.weight * (1.0 - sim.mean(1))
