"""REPA: a frozen DINOv2 from a local folder (a tiny random one the tests save), the projector's alignment loss,
where its gradient goes, masking together with REPA, refusals, and a CLI run whose checkpoint samples without it."""
import json
import shutil
import subprocess

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from models.repa import load_encoder
from tests.conftest import cli, small
from train.build import build_module


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                             image_size=16, patch_size=4)).save_pretrained(folder)
    return folder


def dit_module(tiny_cfg, *overrides):
    module = build_module(tiny_cfg("experiment=dit", "model.preset=dit_tiny", *overrides))
    with torch.no_grad():  # PixArt zero-initialises its output layer: give the blocks' outputs something to carry
        for p in module.unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return module.train()


def batch(module, n=4):
    from models.components import tokenize

    return {"pixels": torch.rand(n, 3, 16, 16) * 2 - 1,
            "input_ids": tokenize(module.components.tokenizer, ["a handwritten digit one"] * n)}


def test_targets_are_the_encoders_patch_features_on_the_token_grid(tiny_cfg, dinov2):
    module = dit_module(tiny_cfg, f"repa.encoder={dinov2}")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    t = module.repa.targets(images, (8, 8))
    assert t.shape == (2, 64, 24)
    direct = load_encoder(str(dinov2))(pixel_values=torch.randn(1, 3, 16, 16)).last_hidden_state
    assert direct.shape == (1, 17, 24)  # CLS + 4x4 patches: the targets drop the CLS token
    same = module.repa.targets(images, (4, 4))  # the encoder's own grid: no resizing
    x = (images + 1) / 2
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(same, module.repa.encoder(pixel_values=x).last_hidden_state[:, 1:])


def test_alignment_loss_trains_the_projector_and_the_blocks_up_to_its_layer_only(tiny_cfg, dinov2):
    module = dit_module(tiny_cfg, f"repa.encoder={dinov2}", "repa.layer=1", "repa.weight=1.0")
    data = batch(module)
    module.noise_generator.manual_seed(0)
    out = module.method.loss(data, module)
    repa = out["repa_loss"]
    assert repa.shape == (4,) and torch.all((repa >= 0) & (repa <= 2))
    module.zero_grad()
    repa.sum().backward()
    blocks = module.unet.transformer_blocks
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.repa.projector.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[0].parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for b in blocks[2:] for p in b.parameters())
    assert all(p.grad is None for p in module.repa.encoder.parameters())
    # the total adds the alignment term to the denoising loss
    module.repa = None
    module.noise_generator.manual_seed(0)
    plain = module.method.loss(data, module)["loss"]
    torch.testing.assert_close(out["loss"] - repa, plain, rtol=1e-4, atol=1e-5)


def test_repa_with_patch_masking_aligns_the_kept_tokens(tiny_cfg, dinov2):
    module = dit_module(tiny_cfg, f"repa.encoder={dinov2}", "repa.layer=2", "masking.ratio=0.75",
                        "masking.mixer_layers=1")
    seen = []
    module.repa.projector.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    out = module.method.loss(batch(module), module)
    assert seen == [torch.Size([4, 16, 128])] and out["repa_loss"].shape == (4,)


def test_repa_refusals_are_one_line(tiny_cfg, dinov2, tmp_path):
    with pytest.raises(ValueError, match=r"repa.encoder: REPA aligns a DiT/PixArt transformer's patch tokens; a UNet2DConditionModel"):
        build_module(tiny_cfg(f"repa.encoder={dinov2}"))
    with pytest.raises(FileNotFoundError, match=r"repa.encoder=.*nowhere: no config.json there"):
        build_module(tiny_cfg("experiment=dit", "model.preset=dit_micro", f"repa.encoder={tmp_path / 'nowhere'}"))
    with pytest.raises(ValueError, match=r"repa.layer=3: the backbone has 1 blocks"):
        build_module(tiny_cfg("experiment=dit", "model.preset=dit_micro", f"repa.encoder={dinov2}", "repa.layer=3"))


@pytest.mark.integration
def test_repa_trains_through_the_cli_and_its_checkpoint_samples_without_the_encoder(tmp_path, dinov2):
    encoder = tmp_path / "encoder"
    shutil.copytree(dinov2, encoder)
    args = small(f"paths.output_dir={tmp_path}", "run_name=repa", "experiment=dit", "model.preset=dit_micro",
                 f"repa.encoder={encoder}", "repa.layer=0", "logger=csv")
    res = subprocess.run(cli(*args), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "repa"
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/repa_loss" in header
    assert json.loads((run / "summary.json").read_text())["global_step"] == 4
    shutil.rmtree(encoder)  # sampling and export need neither the encoder nor the projector
    from train.build import load_module

    module, _ = load_module(run / "checkpoints" / "last.ckpt")
    assert module.repa is None and not any(k.startswith("repa.") for k in module.state_dict())
