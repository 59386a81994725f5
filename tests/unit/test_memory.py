"""Memory settings (issue 23): quantized frozen bases (models/quantize.py) and block swap (models/block_swap.py)."""
import copy

import pytest
import torch

from models.adapters import AdapterSpec, apply_adapter
from models.block_swap import BlockSwap, transformer_blocks
from models.components import build_components, tokenize
from models.fingerprint import weights_fingerprint
from models.quantize import check_quantization, quantize_frozen


@pytest.fixture(scope="module")
def flux():
    return build_components(preset="flux_micro", guidance=1.0)


def _inputs(comps, n: int = 2):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, comps.in_channels, comps.sample_size, comps.sample_size, generator=gen)
    ctx = comps.text_encoder(tokenize(comps.tokenizer, ["a handwritten digit seven", "a digit two"][:n]))[0]
    return x, torch.tensor([300.0, 700.0][:n]), ctx.detach()


def _loss_and_grads(comps):
    model = comps.unet
    x, t, ctx = _inputs(comps)
    out = model(x, t, encoder_hidden_states=ctx).sample
    loss = (out - x).pow(2).mean()
    loss.backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return loss.detach(), {n: p.grad.clone() for n, p in trained}


@pytest.mark.parametrize("lora,checkpointing,quantize", [(False, False, None), (True, False, None),
                                                         (True, True, None), (True, True, "int8")])
def test_block_swap_gives_identical_loss_and_gradients(flux, lora, checkpointing, quantize):
    base = copy.deepcopy(flux)
    if quantize:  # the swapped weights are quantized tensors: their inner tensors move
        quantize_frozen(base.unet.requires_grad_(False), quantize)
    if lora:
        apply_adapter(base, AdapterSpec(kind="lora", rank=2, target="attn", extra={"init_weights": False}))
    else:  # full training of what is outside the swapped blocks; the swapped blocks' frozen weights still move
        for block in transformer_blocks(base.unet)[-2:]:
            block.requires_grad_(False)
    if checkpointing:
        base.unet.enable_gradient_checkpointing()
    swapped = copy.deepcopy(base)
    loss, grads = _loss_and_grads(base)
    swap = BlockSwap(swapped.unet, 2)
    assert swap.nbytes > 0 and swap.resident_bytes() == 0  # not resident before the first use
    loss_s, grads_s = _loss_and_grads(swapped)
    assert swap.resident_bytes() == 0  # nor between uses: each block let its weights go after its backward
    assert torch.equal(loss, loss_s) and grads.keys() == grads_s.keys() and len(grads) > 0
    for name in grads:
        assert torch.equal(grads[name], grads_s[name]), name
    with torch.no_grad():  # sampling: forward only, weights still let go after each block
        x, t, ctx = _inputs(swapped, 1)
        swapped.unet(x, t, encoder_hidden_states=ctx)
    assert swap.resident_bytes() == 0


def test_block_swap_keeps_the_fingerprint_and_refuses_bad_counts(flux):
    model = copy.deepcopy(flux.unet).requires_grad_(False)
    before = weights_fingerprint(model.named_parameters())
    BlockSwap(model, 1)
    assert weights_fingerprint(model.named_parameters()) == before
    n = len(transformer_blocks(model))
    with pytest.raises(ValueError, match=f"model.block_swap={n + 1}: .* has {n} blocks"):
        BlockSwap(copy.deepcopy(flux.unet), n + 1)
    with pytest.raises(ValueError, match="no transformer block list"):
        BlockSwap(torch.nn.Sequential(torch.nn.Linear(4, 4)), 1)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_base_trains_an_adapter_close_to_full_precision(kind):
    torch.manual_seed(0)
    full = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).requires_grad_(False)
    quant = copy.deepcopy(full)
    fingerprint = weights_fingerprint(full.named_parameters())
    assert quantize_frozen(quant, kind) == 2
    assert type(quant[0].weight) is not torch.nn.Parameter  # really stored quantized
    assert weights_fingerprint(quant.named_parameters()) == fingerprint  # the source's fingerprint survives
    x = torch.randn(16, 64)
    err = (quant(x) - full(x)).abs().mean() / full(x).abs().mean()
    assert 0 < err < (0.02 if kind == "int8" else 0.15)
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False), quant)
    trained = [p for p in quant.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    quant(x).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_quantized_base_keeps_no_dequantized_weights_between_forward_and_backward(kind):
    from peft import LoraConfig, inject_adapter_in_model

    from train.plan import LiveBytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(16)]).requires_grad_(False)
    quantize_frozen(model, kind)
    inject_adapter_in_model(LoraConfig(r=4, target_modules=[str(i) for i in range(16)]), model)
    x = torch.randn(8, 256, requires_grad=True)
    tracker = LiveBytes([*model.parameters(), x])
    with tracker:
        model(x).pow(2).mean().backward()
    one_layer = 256 * 256 * 4
    assert tracker.peak < 8 * one_layer  # a few layers' worth at a time, not all 16 (torchao's own linear: 17+)


def test_quantization_refusals():
    check_quantization("none", "cpu", adapter=False)
    check_quantization("int8", "cpu", adapter=True)
    with pytest.raises(ValueError, match="model.quantize=int8: .*full fine-tuning.*adapter=lora"):
        check_quantization("int8", "cpu", adapter=False)
    with pytest.raises(ValueError, match="DeepSpeed and FSDP"):
        check_quantization("nf4", "cuda", adapter=True, sharded=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="model.quantize=fp8: .*compute capability"):
            check_quantization("fp8", "cpu", adapter=True)
