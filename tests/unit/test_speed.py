"""Speed switches by config: torch.compile in place (same state-dict keys, same numbers with the eager backend),
channels-last weights, one-line refusal of an unknown backend, and none of it in a rebuilt checkpoint."""
import pytest
import torch

from models.components import tokenize
from train.build import build_module


def loss_of(module, seed=0):
    batch = {"pixels": torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1,
             "input_ids": tokenize(module.components.tokenizer, ["a handwritten digit two"] * 4)}
    module.train()
    module.noise_generator.manual_seed(seed)
    return module.method.loss(batch, module)["loss"].mean()


def test_compile_in_place_keeps_keys_and_numbers(tiny_cfg):
    plain = build_module(tiny_cfg())
    compiled = build_module(tiny_cfg("model.compile=eager"))  # dynamo tracing without a C++ toolchain
    assert compiled.unet._compiled_call_impl is not None and plain.unet._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(plain.state_dict())
    a, b = loss_of(plain), loss_of(compiled)
    torch.testing.assert_close(a, b)
    b.backward()
    assert all(p.grad is not None for p in compiled.unet.parameters() if p.requires_grad)


def test_channels_last_puts_the_convolutions_in_channels_last(tiny_cfg):
    module = build_module(tiny_cfg("model.channels_last=true"))
    convs = [m.weight for m in module.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert torch.isfinite(loss_of(module))


def test_unknown_compile_backend_is_one_line(tiny_cfg):
    with pytest.raises(ValueError, match=r"model.compile=warp: not a torch.compile backend"):
        build_module(tiny_cfg("model.compile=warp"))
