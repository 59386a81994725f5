"""The SD3/SD3.5 family (models/families/sd3.py) against diffusers' StableDiffusion3Pipeline on a tiny random
SD3.5-style model (qk-norm, a dual-attention block, three text encoders): prompt encoding, the objective, the
export, LoRA files, the real-size preset on the meta device."""
import json

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from models.adapter_files import save_adapter
from models.adapters import AdapterSpec, apply_adapter
from models.components import build_components, load_pretrained, tokenize
from models.export import export_pipeline, make_pipeline
from models.families.sd3 import FoundrySD3, sd35_large_transformer
from train.diffusion import DiffusionCore

PROMPTS = ["a handwritten digit seven", "a photo of sks dog"]


@pytest.fixture(scope="module")
def sd3():
    return build_components(preset="sd35_micro")


@pytest.fixture(scope="module")
def sd3_dir(sd3, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3") / "tiny-sd35"
    sd3.save_pretrained(out)
    return out


def test_folder_encodes_like_stable_diffusion_3_pipeline(sd3_dir):
    index = json.loads((sd3_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    ref = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    comps = load_pretrained(sd3_dir)
    assert comps.family == "sd3" and isinstance(comps.unet, FoundrySD3)
    assert comps.unet.config.qk_norm == "rms_norm" and comps.unet.config.dual_attention_layers == [0]
    context = comps.text_encoder(tokenize(comps.tokenizer, PROMPTS))[0]
    embeds, _, pooled, _ = ref.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False,
                                             max_sequence_length=comps.tokenizer.lengths[2])
    assert torch.equal(context[:, :-1], embeds)
    assert torch.equal(context[:, -1, : pooled.shape[1]], pooled)


def test_training_loss_equals_hand_written_sd3_objective(sd3):
    torch.manual_seed(0)
    x0, noise, t = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8), torch.tensor([800.0, 90.0])
    context = sd3.text_encoder(tokenize(sd3.tokenizer, PROMPTS))[0]
    core = DiffusionCore(sd3.scheduler)
    d = core.noised(x0, t=t, noise=noise)
    ours = core.per_sample_loss(sd3.unet(d.x_t, d.t, encoder_hidden_states=context).sample, d.target, d.t)
    s = (t / 1000).view(-1, 1, 1, 1)
    pooled = context[:, -1, : sd3.unet.config.pooled_projection_dim]
    pred = SD3Transformer2DModel.forward(sd3.unet, hidden_states=(1 - s) * x0 + s * noise,
                                         encoder_hidden_states=context[:, :-1], pooled_projections=pooled,
                                         timestep=t, return_dict=False)[0]
    assert torch.allclose(ours, ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3)), atol=1e-6)


def test_export_samples_like_ours_and_lora_loads(sd3, sd3_dir, tmp_path):
    out = export_pipeline(sd3, tmp_path / "export", sampler="euler")
    kw = dict(num_inference_steps=3, guidance_scale=2.0, output_type="np")
    theirs = StableDiffusion3Pipeline.from_pretrained(out)
    a = theirs(PROMPTS[0], generator=torch.Generator().manual_seed(3), **sd3.spec.pipeline_kwargs(sd3), **kw).images
    b = make_pipeline(sd3, "euler")(PROMPTS[0], generator=torch.Generator().manual_seed(3), **kw).images
    assert a.shape == (1, 16, 16, 3) and abs(a - b).max() < 1e-5

    comps = load_pretrained(sd3_dir)
    spec = AdapterSpec(kind="lora", rank=2, target="attn")
    apply_adapter(comps, spec)
    for name, p in comps.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    save_adapter(comps, spec, tmp_path / "lora", base_model=str(sd3_dir))
    theirs.load_lora_weights(tmp_path / "lora")
    c = theirs(PROMPTS[0], generator=torch.Generator().manual_seed(3), **sd3.spec.pipeline_kwargs(sd3), **kw).images
    d = make_pipeline(comps, "euler")(PROMPTS[0], generator=torch.Generator().manual_seed(3), **kw).images
    assert abs(c - a).max() > 1e-2 and abs(c - d).max() < 1e-4


def test_real_size_preset_on_meta():
    n = sum(p.numel() for p in sd35_large_transformer().parameters())
    assert 8.0e9 < n < 8.3e9  # SD3.5-large: 8.1 B
