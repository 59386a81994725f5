"""Micro-budget deferred masking: the stated share of patches kept, the mixer sees every patch, the loss counts
kept patches only, a final unmasked phase, and one-line refusals."""
import json
import subprocess

import pytest
import torch

from models.components import build_components
from models.masking import PatchMasking
from tests.conftest import cli, small
from train.build import build_module


def randomised(preset: str):
    c = build_components(preset=preset, resolution=16, prediction_type="flow", seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # PixArt zero-initialises its output layer: give every weight a value
        for p in c.unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return c


@pytest.mark.parametrize("ratio,n_keep", [(0.5, 32), (0.75, 16)])
def test_masking_keeps_the_stated_share_of_patches_per_sample(ratio, n_keep):
    c = randomised("dit_micro")
    m = PatchMasking(c.unet, ratio, mixer_layers=0)
    x = torch.randn(8, 3, 16, 16)  # 8x8 = 64 patches of 2x2
    with m.apply(x, torch.Generator().manual_seed(1)) as mask:
        out = c.unet(x, torch.tensor(300), encoder_hidden_states=torch.randn(8, 12, 16)).sample
    assert mask.shape == (8, 1, 16, 16)
    assert torch.all(mask.flatten(1).sum(1) == n_keep * 4)  # exactly n_keep patches of 4 pixels each
    assert len({tuple(r) for r in mask.flatten(1).tolist()}) == 8  # a fresh subset per sample
    assert torch.all(out * (1 - mask) == 0) and torch.all((out != 0).float().sum((1, 2, 3)) > 0)
    # outside the context the model is whole again
    assert m._keep is None and torch.all(c.unet(x, torch.tensor(300), torch.randn(8, 12, 16)).sample != 0)


def test_the_patch_mixer_sees_the_dropped_patches_and_the_masked_blocks_do_not():
    c = randomised("dit_tiny")  # 4 blocks
    x = torch.randn(1, 3, 16, 16)
    h = torch.randn(1, 16, 64)

    def kept_outputs(mixer_layers: int):
        m = PatchMasking(c.unet, 0.75, mixer_layers=mixer_layers)
        outs = []
        for inp in (x, x + (1 - mask_of(m, x)) * 5.0):  # change only the patches that will be dropped
            with m.apply(inp, torch.Generator().manual_seed(0)) as mask:
                outs.append(c.unet(inp, torch.tensor(500), encoder_hidden_states=h).sample * mask)
        m.remove()
        return outs

    def mask_of(m, inp):
        with m.apply(inp, torch.Generator().manual_seed(0)) as mask:
            return mask

    a, b = kept_outputs(0)  # dropped right after patchify: the dropped pixels cannot reach the kept outputs
    torch.testing.assert_close(a, b)
    a, b = kept_outputs(1)  # one mixer block attends over every patch first
    assert (a - b).abs().max() > 1e-3


def test_final_phase_is_unmasked():
    m = PatchMasking(randomised("dit_micro").unet, 0.5, mixer_layers=0, unmasked_from=0.8)
    assert m.active(0, 100) and m.active(79, 100) and not m.active(80, 100)
    assert m.active(10**6, None)  # no max_steps: masked throughout


@pytest.mark.parametrize("overrides,match", [
    ([], r"masking.ratio=0.5: patch masking needs a DiT/PixArt transformer backbone .* not a UNet2DConditionModel"),
    (["model=mmdit_tiny", "model.preset=mmdit_micro"], r"masking.ratio=0.5: patch masking needs a DiT/PixArt .* FoundryMMDiT"),
    (["model=dit_tiny", "model.preset=dit_micro", "masking.ratio=1.0"], r"masking.ratio=1.0: expected a share"),
    (["model=dit_tiny", "model.preset=dit_micro", "masking.mixer_layers=1"],
     r"masking.mixer_layers=1: the backbone has 1 blocks"),
])
def test_bad_masking_settings_are_refused_in_one_line(tiny_cfg, overrides, match):
    with pytest.raises(ValueError, match=match):
        build_module(tiny_cfg("masking.ratio=0.5", *overrides))


@pytest.mark.integration
def test_masked_dit_trains_through_the_cli_then_unmasked(tmp_path):
    args = small(f"paths.output_dir={tmp_path}", "run_name=masked", "experiment=dit", "model.preset=dit_micro",
                 "masking.ratio=0.75", "masking.mixer_layers=0", "masking.unmasked_from=0.5")
    res = subprocess.run(cli(*args), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((tmp_path / "masked" / "summary.json").read_text())
    assert s["global_step"] == 4 and 0.0 <= s["val/prompt_accuracy"] <= 1.0
