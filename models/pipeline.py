"""A diffusers pipeline for pixel-space, CLIP-conditioned text-to-image UNets or DiT/MMDiT transformers (no VAE).

diffusers ships no stock pipeline for this (DeepFloyd IF expects T5), so this file is copied next to
`model_index.json` on export and loads with `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`.
It is also the platform's own sampler (sample grids, digits eval), so training-time samples and exported
samples come from the same code. Self-contained on purpose: it imports only torch and diffusers.
"""
from __future__ import annotations

import textwrap
from typing import Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils.torch_utils import randn_tensor


def combine_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance, the one formula (the sampler in train/sampling.py uses it too); `scale` may be per
    sample ([B])."""
    s = scale if not torch.is_tensor(scale) or scale.ndim == 0 else scale.view(-1, *([1] * (cond.ndim - 1)))
    return uncond + s * (cond - uncond)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance weight w = guidance_scale - 1 (LCM, guidance distillation), [B, dim]."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(np.log(10000.0) / (half - 1)))
    args = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def pooled_text(hidden: torch.Tensor) -> torch.Tensor:
    """The pooled text vector an MMDiT (SD3Transformer2DModel) is conditioned on: the mean of the text encoder's
    hidden states, [B, D] (models/backbones.py explains why)."""
    return hidden.mean(dim=1)


class FoundryPixelPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Same call signature as StableDiffusionPipeline, so tools written for SD pipelines work on it; LoRA files
    load with `load_lora_weights` exactly as on Stable Diffusion."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device))[0]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 3.0,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 eta: float = 0.0, generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 callback_on_step_end: Callable | None = None):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        n = len(prompts)
        size = self.unet.config.sample_size
        height, width = height or size, width or size
        device = self._execution_device
        cond = self.encode_prompt(prompts, device)
        w_dim = getattr(self.unet.config, "time_cond_proj_dim", None)
        timestep_cond = None
        if w_dim:  # a guidance-distilled / LCM student: the scale is an input, one forward per step
            w = torch.full((n,), float(guidance_scale) - 1.0, device=device)
            timestep_cond = guidance_embedding(w, w_dim).to(device, self.unet.dtype)
        do_cfg = guidance_scale > 1.0 and not w_dim
        if do_cfg:
            neg = negative_prompt or ""
            negs = [neg] * n if isinstance(neg, str) else [x for x in neg for _ in range(num_images_per_prompt)]
            cond = torch.cat([self.encode_prompt(negs, device), cond])
        shape = (n, self.unet.config.in_channels, height, width)
        dtype = self.unet.dtype
        x = latents.to(device, dtype) if latents is not None else randn_tensor(shape, generator=generator,
                                                                                 device=device, dtype=dtype)
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers start at unit noise
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        params = _step_params(self.scheduler)
        extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            inp = torch.cat([x, x]) if do_cfg else x
            if hasattr(self.scheduler, "scale_model_input"):
                inp = self.scheduler.scale_model_input(inp, t)
            out = _denoise(self.unet, inp, t, cond.to(dtype), timestep_cond)
            if do_cfg:
                out = combine_guidance(*out.chunk(2), guidance_scale)
            x = self.scheduler.step(out, t, x, **extra).prev_sample
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {"latents": x})
        images = x.clamp(-1, 1)
        if output_type == "latent":
            out_images = images
        elif output_type == "pt":
            out_images = (images + 1) / 2
        else:
            arr = ((images + 1) / 2).permute(0, 2, 3, 1).float().cpu().numpy()
            out_images = arr if output_type == "np" else self.numpy_to_pil(arr)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (out_images,)
        return ImagePipelineOutput(images=out_images)


def _denoise(model, x: torch.Tensor, t, cond: torch.Tensor, timestep_cond: torch.Tensor | None) -> torch.Tensor:
    """A UNet (or a backbone that takes the UNet's call), or a plain PixArt/DiT or SD3 transformer as diffusers loads
    it."""
    if not hasattr(model.config, "patch_size") or getattr(model, "unet_call", False):
        return model(x, t, encoder_hidden_states=cond, timestep_cond=timestep_cond).sample
    t = torch.as_tensor(t, device=x.device)
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    if hasattr(model.config, "joint_attention_dim"):  # SD3Transformer2DModel (MMDiT)
        return model(x, encoder_hidden_states=cond, pooled_projections=pooled_text(cond), timestep=t).sample
    return model(x, encoder_hidden_states=cond, timestep=t,
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def _step_params(scheduler) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


def to_uint8_grid(images: np.ndarray, nrow: int) -> np.ndarray:
    """[N,H,W,C] floats in [0,1] -> one uint8 grid image (rows of `nrow`), for logs and PNGs."""
    n, h, w, c = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.zeros((rows * h, nrow * w, c), dtype=np.float32)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    return (grid.clip(0, 1) * 255).round().astype(np.uint8)


def labelled_grid(images: np.ndarray, row_labels: list[str], col_labels: list[str], min_cell: int = 64,
                  label_width: int = 220):
    """A grid a person can read: [N,H,W,C] floats in [0,1], one row per `row_labels` entry (its prompt on the left)
    and one column per `col_labels` entry (e.g. the seed, on top); tiny cells upscaled (nearest neighbour) to at
    least `min_cell` pixels. Returns a PIL image."""
    from PIL import Image, ImageDraw  # lazy: PIL only for grids

    ncol = len(col_labels)
    scale = max(1, -(-min_cell // images.shape[1]))
    grid = Image.fromarray(to_uint8_grid(images, nrow=ncol))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    cell_h, cell_w, top = images.shape[1] * scale, images.shape[2] * scale, 16
    canvas = Image.new("RGB", (label_width + grid.width, top + grid.height), "white")
    canvas.paste(grid, (label_width, top))
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(col_labels):
        draw.text((label_width + j * cell_w + 3, 2), str(text), fill="black")
    for i, text in enumerate(row_labels):
        lines = textwrap.wrap(str(text), width=max(8, label_width // 7))[: max(1, cell_h // 12)]
        for k, line in enumerate(lines):
            draw.text((4, top + i * cell_h + 4 + 12 * k), line, fill="black")
    return canvas
