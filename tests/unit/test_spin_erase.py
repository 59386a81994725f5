"""SPIN and concept erasure targets on hand-computed cases, through the real methods on the micro model."""
import math
from types import SimpleNamespace

import pytest
import torch

from train.build import build_module
from train.sampling import guided


class Stub(torch.nn.Module):
    """A 'UNet' whose output is the mean of its text context, broadcast: e(x, cond) = mean(cond)."""

    def forward(self, x, t, encoder_hidden_states):
        v = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=x * 0 + v)


def test_erasure_target_is_the_frozen_models_negatively_guided_prediction():
    x, t = torch.zeros(2, 3, 4, 4), torch.tensor([10, 10])
    uncond, concept = torch.full((2, 5, 8), 1.0), torch.full((2, 5, 8), 3.0)
    # e_0 = 1, e_c = 3: guidance -1 gives 1 + (-1)(3 - 1) = -1 (ESD pushes away from the concept)
    assert torch.allclose(guided(Stub(), x, t, concept, uncond, -1.0), torch.full_like(x, -1.0))
    assert torch.allclose(guided(Stub(), x, t, concept, uncond, 2.0), torch.full_like(x, 5.0))


def digits_batch(module, n=2):
    ids = module.components.tokenizer(["a handwritten digit seven"] * n, padding="max_length", max_length=12,
                                      return_tensors="pt").input_ids
    return {"pixels": torch.rand(n, 3, 16, 16) * 2 - 1, "input_ids": ids}


def test_erasure_loss_is_finite_and_trains_cross_attention_only(tiny_cfg):
    module = build_module(tiny_cfg("experiment=erase", "method.concept=a handwritten digit seven",
                                   "method.sample_steps=3"))
    trainable = [n for n, p in module.unet.named_parameters() if p.requires_grad]
    assert trainable and all(".attn2." in n for n in trainable)
    module.noise_generator.manual_seed(0)
    out = module.method.loss(digits_batch(module), module)
    assert out["loss"].shape == (2,) and torch.isfinite(out["loss"]).all() and out["loss"].requires_grad


def test_erasure_preserves_other_prompts_by_matching_the_frozen_model(tiny_cfg):
    """With `preserve`, part of each batch samples the other prompts; there the target is the frozen model's own
    conditional prediction, so an untrained student (equal to the frozen model) has zero preservation loss."""
    module = build_module(tiny_cfg("experiment=erase", "method.concept=a handwritten digit seven",
                                   "method.sample_steps=3", "method.preserve=[a handwritten digit one,"
                                   "a handwritten digit two]", "method.preserve_weight=2.0"))
    assert module.method.preserve == ["a handwritten digit one", "a handwritten digit two", ""]  # + unconditional
    module.noise_generator.manual_seed(0)
    out = module.method.loss(digits_batch(module, n=4), module)
    assert out["loss"].shape == (4,)
    assert float(out["preserve_loss"]) < 1e-10, "the student starts as the frozen model: nothing to preserve yet"
    assert float(out["erase_loss"]) > 1e-4, "the concept rows regress onto the negatively guided target"


def test_spin_starts_each_iteration_at_log2_and_refreshes_the_opponent(tiny_cfg):
    module = build_module(tiny_cfg("method=spin", "method.steps_per_iteration=1", "method.sample_steps=2",
                                   "method.sft_weight=0"))  # the preference part alone (the SFT term: test_preference)
    batch = digits_batch(module)

    def loss():
        module.noise_generator.manual_seed(0)
        return module.method.loss(batch, module)["loss"]

    assert torch.allclose(loss(), torch.full((2,), math.log(2.0)), atol=1e-6)  # policy == opponent
    with torch.no_grad():
        for p in module.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert not torch.allclose(loss(), torch.full((2,), math.log(2.0)), atol=1e-4)
    module.method.on_step_end(SimpleNamespace(global_step=1, refresh_reference=module.refresh_reference))
    assert module.method.iteration == 1
    assert torch.allclose(loss(), torch.full((2,), math.log(2.0)), atol=1e-6)  # the opponent caught up
    state = module.method.state_dict(module)
    assert state["iteration"] == 1 and "opponent" in state


@pytest.mark.parametrize("bad, match", [("method.guidance=1.0", "erasing needs a negative guidance"),
                                        ("method.params=everything", "method.params: 'everything'"),
                                        ("method.sample_steps=1", "method.sample_steps=1: erasure stops")])
def test_bad_erasure_settings_are_one_line(tiny_cfg, bad, match):
    with pytest.raises(Exception, match=match):
        build_module(tiny_cfg("experiment=erase", "method.concept=a seven", bad))
