"""DiT/PixArt transformer backbones: built from presets, trained, sampled and exported like the UNet."""
import subprocess
import sys

import pytest
import torch
from diffusers import DiffusionPipeline, PixArtTransformer2DModel, SD3Transformer2DModel

from models.backbones import FoundryMMDiT, FoundryPixArt
from models.components import build_components, load_pretrained
from models.export import export_pipeline, make_pipeline
from tests.conftest import cli, small


KINDS = {"dit_micro": (FoundryPixArt, PixArtTransformer2DModel), "mmdit_micro": (FoundryMMDiT, SD3Transformer2DModel)}


@pytest.fixture(scope="module", params=list(KINDS))
def dit(request):
    return build_components(preset=request.param, resolution=16, prediction_type="flow")


@pytest.mark.parametrize("preset,cls", [("dit_tiny", FoundryPixArt), ("mmdit_tiny", FoundryMMDiT)])
def test_tiny_transformers_are_about_the_unets_size_and_deterministic(preset, cls):
    a = build_components(preset=preset, resolution=16, seed=1)
    b = build_components(preset=preset, resolution=16, seed=1)
    assert isinstance(a.unet, cls) and a.unet.config.patch_size == 2
    assert 0.8e6 < sum(p.numel() for p in a.unet.parameters()) < 1.6e6
    for pa, pb in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.equal(pa, pb)


def test_transformer_takes_the_unet_call_and_depends_on_text(dit):
    ids = dit.tokenizer(["a handwritten digit one", "a handwritten digit two"], padding="max_length",
                        max_length=dit.tokenizer.model_max_length, return_tensors="pt").input_ids
    h = dit.text_encoder(ids)[0]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for p in dit.unet.parameters():  # both zero-initialise their output layers: make the check meaningful
            p.add_(0.02 * torch.randn_like(p))
        out = dit.unet(x, torch.tensor(500), encoder_hidden_states=h).sample
        swapped = dit.unet(x, torch.tensor(500), encoder_hidden_states=h.flip(0)).sample
    assert out.shape == x.shape
    assert not torch.allclose(out, swapped)  # cross- or joint attention (and MMDiT's pooled vector) read the prompt


def test_patch_size_that_does_not_divide_the_input_is_one_line():
    with pytest.raises(ValueError, match=r"model.resolution=15: preset 'dit_tiny' cuts 2x2 patches") as e:
        build_components(preset="dit_tiny", resolution=15)
    assert "\n" not in str(e.value)


def test_guidance_embedding_on_a_transformer_is_refused():
    with pytest.raises(ValueError, match="model.guidance_embedding"):
        build_components(preset="dit_micro", resolution=16, guidance_embedding=8)


def test_export_is_a_plain_diffusers_transformer_and_samples_identically(dit, tmp_path):
    out = export_pipeline(dit, tmp_path / "export", sampler="flow")
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    plain = KINDS["mmdit_micro" if isinstance(dit.unet, FoundryMMDiT) else "dit_micro"][1]
    assert type(pipe.unet) is plain  # no foundry code needed to load the weights
    kw = dict(num_inference_steps=3, guidance_scale=2.0, output_type="np")
    a = pipe(["a handwritten digit four"], generator=torch.Generator().manual_seed(3), **kw).images
    b = make_pipeline(dit, sampler="flow")(["a handwritten digit four"], generator=torch.Generator().manual_seed(3),
                                          **kw).images
    assert a.shape == (1, 16, 16, 3) and abs(a - b).max() < 1e-5
    # and back: the export continues training as our transformer
    again = load_pretrained(out)
    assert isinstance(again.unet, type(dit.unet)) and again.scheduler.config.get("shift") is not None
    x, h = torch.randn(1, 3, 16, 16), torch.randn(1, dit.tokenizer.model_max_length, 16)
    torch.testing.assert_close(again.unet(x, torch.tensor(7), h).sample, dit.unet(x, torch.tensor(7), h).sample)


@pytest.mark.integration
@pytest.mark.parametrize("experiment,preset", [("dit", "dit_micro"), ("mmdit", "mmdit_micro")])
def test_transformer_trains_checkpoints_and_resumes_through_the_cli(tmp_path, experiment, preset):
    args = small(f"paths.output_dir={tmp_path}", "run_name=dit", f"experiment={experiment}", f"model.preset={preset}")
    res = subprocess.run(cli(*args), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "dit"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "samples" / "step_000004.png").is_file()
    import json

    s = json.loads((run_dir / "summary.json").read_text())
    assert s["global_step"] == 4 and 0.0 <= s["val/prompt_accuracy"] <= 1.0
    res = subprocess.run(cli(*args, "trainer.max_steps=6"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "at step 4" in res.stdout + res.stderr, res.stderr[-3000:]
