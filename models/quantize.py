"""Quantized frozen bases for adapter training (QLoRA-style): `model.quantize=int8 | fp8 | nf4`.

Only the frozen linear layers of the denoiser (and, with `model.quantize_text_encoder`, of the frozen text encoders)
are quantized, after loading and before the adapter is attached: peft then wraps each quantized layer and the
adapter trains in full precision over it. Checkpoints hold only what trains (the adapter), so nothing quantized is
ever saved; sampling, evaluation and exports after training rebuild the base in full precision and apply the adapter
(`train/build.py: load_module`), which is how a QLoRA adapter is used.

Libraries, by what they support (checked with torchao 0.18.0 and bitsandbytes 0.50.2):
- int8 weight-only: torchao `Int8WeightOnlyConfig` (PyTorch's own quantization library; per-channel int8 weights as a
  tensor subclass that keeps `nn.Linear`, so peft's ordinary LoRA layer wraps it; runs on CPU and CUDA).
- fp8 weight-only: torchao `Float8WeightOnlyConfig` (float8_e4m3 weights; CUDA with compute capability >= 8.9).
- nf4: bitsandbytes `Linear4bit` (the QLoRA reference kernels, and peft's own bitsandbytes LoRA layer; 0.50 runs
  on CPU as well as CUDA). torchao dropped its NF4 tensor; optimum-quanto is in maintenance mode and adds nothing.
"""
from __future__ import annotations

import logging
import warnings
import torch

from models.fingerprint import remember_source

log = logging.getLogger(__name__)
# adapters over a quantized base are never merged into it (exports rebuild the base in full precision), which is all
# peft's note on torchao layers is about
warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")

KINDS = ("none", "int8", "fp8", "nf4")
BYTES_PER_WEIGHT = {"none": None, "int8": 1.0, "fp8": 1.0, "nf4": 0.5}  # + per-channel / per-block scales
MIN_FEATURES = 16  # smaller layers (the digits world's time embeddings) stay as they are: nothing to save there


def check_quantization(kind: str, device: str, adapter: bool, sharded: bool = False) -> None:
    """Refuse, in one line, the combinations that cannot work, before any weights are loaded."""
    if kind not in KINDS:
        raise ValueError(f"model.quantize={kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "none":
        return
    if not adapter:
        raise ValueError(f"model.quantize={kind}: a quantized base is frozen, so full fine-tuning cannot train it; "
                         "add adapter=lora (QLoRA) or set model.quantize=none")
    if sharded:
        raise ValueError(f"model.quantize={kind}: DeepSpeed and FSDP flatten or partition every parameter and cannot "
                         "hold quantized ones; use strategy=ddp or one device (the quantized base is frozen: "
                         "sharding it would save nothing)")
    if kind == "fp8" and device != "any":
        cuda = device.startswith("cuda") and torch.cuda.is_available()
        if not cuda or torch.cuda.get_device_capability() < (8, 9):
            raise ValueError("model.quantize=fp8: float8 weights need a CUDA GPU with compute capability >= 8.9 "
                             "(Ada, Hopper or newer); use model.quantize=int8 (or nf4) on this device")
    if kind == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ValueError("model.quantize=nf4: needs bitsandbytes; pip install 'bitsandbytes>=0.49' "
                             "(or use model.quantize=int8)") from err


def _eligible(module: torch.nn.Module) -> bool:
    return (type(module) is torch.nn.Linear and not module.weight.requires_grad
            and min(module.in_features, module.out_features) >= MIN_FEATURES)


def quantize_frozen(model: torch.nn.Module, kind: str) -> int:
    """Quantize `model`'s frozen linear layers in place; returns how many. Each new weight remembers its source's
    fingerprint statistics, so a run's frozen-base fingerprint is the same quantized or not."""
    if kind == "none":
        return 0
    names = [name for name, m in model.named_modules() if _eligible(m)]
    if not names:
        return 0
    sources = {name: model.get_submodule(name).weight.detach() for name in names}
    (_quantize_nf4 if kind == "nf4" else _quantize_torchao)(model, names, kind)
    for name in names:
        remember_source(model.get_submodule(name).weight, sources[name])
    log.info("quantized %d frozen linear layers of %s to %s", len(names), type(model).__name__, kind)
    return len(names)


def _quantize_torchao(model: torch.nn.Module, names: list[str], kind: str) -> None:
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
    chosen = set(names)
    quantize_(model, config, filter_fn=lambda _module, fqn: fqn in chosen)
    for name in names:
        model.get_submodule(name).__class__ = FrozenQuantizedLinear


class _DequantizedLinear(torch.autograd.Function):
    """`x W^T + b` for a frozen weight stored quantized. The graph keeps the quantized weight and dequantizes it
    again for the input's gradient, so no full-precision copy of it lives from forward to backward: torchao's own
    linear puts its dequantized weight in the graph, which measured as much training memory as the unquantized base
    (benchmarks/memory_plan.py). bitsandbytes' 4-bit matmul already works this way."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight, ctx.x_dtype, ctx.bias_grad = weight, x.dtype, bias is not None and bias.requires_grad
        with torch.no_grad():
            return torch.nn.functional.linear(x, weight.dequantize().to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad @ ctx.weight.dequantize().to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.bias_grad else None
        return (grad_x.to(ctx.x_dtype) if grad_x is not None else None), None, grad_b


class FrozenQuantizedLinear(torch.nn.Linear):
    """A linear layer whose frozen weight torchao stores quantized (int8 / fp8), trained through without keeping a
    dequantized copy (see `_DequantizedLinear`); state-dict keys and peft's LoRA wrapping are those of `nn.Linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # the matmul in autocast's dtype, as nn.Linear's would be
            x = x.to(torch.get_autocast_dtype(x.device.type))
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return _DequantizedLinear.apply(x, self.weight, bias)


def _quantize_nf4(model: torch.nn.Module, names: list[str], kind: str) -> None:
    import bitsandbytes as bnb

    for name in names:
        old = model.get_submodule(name)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=old.weight.dtype, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, quant_type="nf4", module=new)
        if old.bias is not None:
            new.bias = old.bias
        new = new.to(old.weight.device)  # bitsandbytes packs the weight when it is moved
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
