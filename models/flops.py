"""FLOPs of a backbone call, counted from its layers' shapes, and model FLOPs utilisation (MFU).

What is counted (one forward call, multiply-add = 2 FLOPs):
- every `nn.Linear` and `nn.Conv2d`: 2 x output elements x (input features per output, kernel included);
- attention's two matmuls, Q·Kᵀ and softmax·V: 2 x 2 x batch x query tokens x key tokens x inner width, for self- and
  cross-attention (keys are the text tokens there); MMDiT's joint attention runs over image + text tokens together;
- not counted: norms, activations, softmax, residual adds (about 1-2% on these models).
A training step costs 3 x the forward (the backward computes gradients for inputs and for weights, each about one
forward), the usual convention behind "6 N FLOPs per token". MFU = achieved training FLOP/s / the device's dense peak.
The count is checked against `torch.utils.flop_counter` in tests/unit/test_flops.py.
"""
from __future__ import annotations

import torch
from torch import nn

# Dense bf16 peak TFLOP/s (no sparsity) of common training GPUs, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0}


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak, or `override`; None where unknown (CPUs): then MFU is not logged."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def forward_flops(model: nn.Module, *args, **kwargs) -> int:
    """FLOPs of `model(*args, **kwargs)`, counted by hooks on its layers (see the module docstring)."""
    from diffusers.models.attention_processor import Attention

    total = 0

    def linear(mod, inp, out):
        nonlocal total
        total += 2 * out.numel() * mod.in_features

    def conv(mod, inp, out):
        nonlocal total
        k = mod.kernel_size[0] * mod.kernel_size[1]
        total += 2 * out.numel() * (mod.in_channels // mod.groups) * k

    def attention(mod, args, kwargs):
        nonlocal total
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if hidden.ndim == 4:  # (B, C, H, W) inputs are flattened to tokens inside the processor
            hidden = hidden.flatten(2).transpose(1, 2)
        if context is not None and getattr(mod, "added_kv_proj_dim", None) is not None:
            # joint attention (MMDiT): image and text tokens attend together over their concatenation
            tokens = hidden.shape[1] + context.shape[1]
            total += 2 * 2 * hidden.shape[0] * tokens * tokens * mod.inner_dim
            return
        keys = (context if context is not None else hidden).shape[1]
        total += 2 * 2 * hidden.shape[0] * hidden.shape[1] * keys * mod.inner_dim

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv))
        elif isinstance(m, Attention):
            handles.append(m.register_forward_pre_hook(attention, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return total


def backbone_inputs(components, batch: int = 1) -> tuple[tuple, dict]:
    """Dummy inputs of the run's shapes for one backbone call: noisy sample, timestep, text hidden states."""
    unet = components.unet
    # the text encoder's width: a DiT's caption_channels or an MMDiT's joint_attention_dim (they project the text
    # themselves), a UNet's cross-attention width
    width = (getattr(unet.config, "caption_channels", None) or getattr(unet.config, "joint_attention_dim", None)
             or unet.config.cross_attention_dim)
    p = next(unet.parameters())
    sample = torch.zeros(batch, components.in_channels, components.sample_size, components.sample_size,
                         device=p.device, dtype=p.dtype)
    text = torch.zeros(batch, components.tokenizer.model_max_length, width, device=p.device, dtype=p.dtype)
    return (sample, torch.full((batch,), 500, device=p.device)), {"encoder_hidden_states": text}


def train_flops_per_sample(components) -> int:
    """3 x the forward FLOPs of one sample through the backbone (see the module docstring)."""
    args, kwargs = backbone_inputs(components)
    return 3 * forward_flops(components.unet, *args, **kwargs)
