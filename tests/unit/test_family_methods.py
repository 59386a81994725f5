"""Every family reaches the methods through the one loop: the flow-matching methods build and train on each family's
micro preset through the real config (a finite per-sample loss whose gradient reaches the trained weights only), and
a method that needs another objective is refused in one line naming it."""
from __future__ import annotations

import pytest
import torch

from models.tokens import tokenize
from train.build import build_module

FAMILIES = {"flux": "flux_micro", "sd3": "sd35_micro", "zimage": "zimage_micro", "qwen_image": "qwen_image_micro",
            "flux2": "flux2_klein_micro"}
CAPTIONS = ["a handwritten digit one", "a handwritten digit two", "a sks digit", "a digit"]
METHODS = {"denoise": ["method=denoise"], "dreambooth": ["experiment=dreambooth"],
           "dpo": ["experiment=dpo", "data.urls=unused"], "dreambooth_lora": ["experiment=dreambooth_lora"]}


def _batch(module, method: str) -> dict:
    size = module.components.resolution
    pixels = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {"pixels": pixels, "input_ids": tokenize(module.components.tokenizer, CAPTIONS), "captions": CAPTIONS}
    if method.startswith("dreambooth"):
        batch["is_prior"] = torch.tensor([False, False, True, True])
    if method == "dpo":
        batch = {k: v[:2] for k, v in batch.items()} | {"pixels_lose": pixels[2:]}
    return batch


CASES = [("flux", m) for m in sorted(METHODS)] + [(f, m) for f in sorted(FAMILIES) if f != "flux"
                                                  for m in ("denoise", "dreambooth_lora")]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_flow_methods_train_every_family(tiny_cfg, family, method):
    module = build_module(tiny_cfg("model=flux_tiny", f"model.preset={FAMILIES[family]}", "model.guidance=null",
                                   *METHODS[method]))
    assert module.components.family == family
    module.noise_generator.manual_seed(0)
    out = module.method.loss(_batch(module, method), module.view)
    loss = out["loss"]
    assert loss.ndim == 1 and torch.isfinite(loss).all()
    loss.mean().backward()
    grads = [p.grad for p in module.trainable_parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    frozen = [p for m in module.frozen_models().values() for p in m.parameters()]
    assert all(p.grad is None for p in frozen)


def test_a_method_needing_another_objective_is_refused(tiny_cfg):
    with pytest.raises(ValueError, match="works with model.prediction_type .*not flow"):
        build_module(tiny_cfg("model=flux_tiny", "model.preset=flux_micro", "experiment=spin"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_pipeline_reports_its_model_space(family):
    """The digits evaluation's straightness draws x_T in the model space the family's pipeline denoises."""
    from models.components import build_components
    from models.export import make_pipeline
    from train.digits_eval import model_space

    comps = build_components(preset=FAMILIES[family])
    assert model_space(make_pipeline(comps, "euler")) == (comps.in_channels, comps.sample_size)
