"""The Z-Image family (models/families/zimage.py) against diffusers' ZImagePipeline on a tiny random model (Qwen3 text
encoder with a chat template, single-stream DiT): prompt encoding, the objective (its t' = 1 - sigma and negated
output), the export with its guidance convention, LoRA files."""
import json

import pytest
import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel

from models.adapter_files import save_adapter
from models.adapters import AdapterSpec, apply_adapter
from models.components import build_components, load_pretrained, tokenize
from models.export import export_pipeline, make_pipeline
from models.families.zimage import FoundryZImage, captions, z_image_transformer
from train.diffusion import DiffusionCore

PROMPTS = ["a handwritten digit seven", "a photo of sks dog"]


@pytest.fixture(scope="module")
def zimg():
    return build_components(preset="zimage_micro")


@pytest.fixture(scope="module")
def zimg_dir(zimg, tmp_path_factory):
    out = tmp_path_factory.mktemp("zimage") / "tiny-zimage"
    zimg.save_pretrained(out)
    return out


def test_folder_encodes_like_z_image_pipeline(zimg_dir):
    index = json.loads((zimg_dir / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    assert index["transformer"] == ["diffusers", "ZImageTransformer2DModel"]
    ref = ZImagePipeline.from_pretrained(zimg_dir)
    comps = load_pretrained(zimg_dir)
    assert comps.family == "zimage" and isinstance(comps.unet, FoundryZImage)
    ours = captions(comps.text_encoder(tokenize(comps.tokenizer, PROMPTS))[0])
    theirs, _ = ref.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False,
                                  max_sequence_length=comps.tokenizer.model_max_length)
    assert [o.shape for o in ours] == [t.shape for t in theirs] and ours[0].shape[0] != ours[1].shape[0]
    assert all(torch.equal(o, t) for o, t in zip(ours, theirs))


def test_training_loss_equals_hand_written_z_image_objective(zimg):
    torch.manual_seed(0)
    x0, noise, t = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8), torch.tensor([800.0, 90.0])
    context = zimg.text_encoder(tokenize(zimg.tokenizer, PROMPTS))[0]
    core = DiffusionCore(zimg.scheduler)
    d = core.noised(x0, t=t, noise=noise)
    ours = core.per_sample_loss(zimg.unet(d.x_t, d.t, encoder_hidden_states=context).sample, d.target, d.t)
    s = (t / 1000).view(-1, 1, 1, 1)
    x_t = list(((1 - s) * x0 + s * noise).unsqueeze(2).unbind(0))
    out = ZImageTransformer2DModel.forward(zimg.unet, x_t, 1 - t / 1000, captions(context), return_dict=False)[0]
    velocity = -torch.stack(out).squeeze(2)  # ZImagePipeline: noise_pred = -model_out
    assert torch.allclose(ours, ((velocity - (noise - x0)) ** 2).mean(dim=(1, 2, 3)), atol=1e-6)


def test_export_samples_like_ours_and_lora_loads(zimg, zimg_dir, tmp_path):
    out = export_pipeline(zimg, tmp_path / "export", sampler="euler")
    theirs = ZImagePipeline.from_pretrained(out)
    g, kw = 2.5, dict(num_inference_steps=3, output_type="np", height=16, width=16)
    a = theirs(PROMPTS[0], guidance_scale=g - 1, generator=torch.Generator().manual_seed(3),
               **zimg.spec.pipeline_kwargs(zimg), **kw).images
    b = make_pipeline(zimg, "euler")(PROMPTS[0], guidance_scale=g, generator=torch.Generator().manual_seed(3),
                                      **kw).images
    assert a.shape == (1, 16, 16, 3) and abs(a - b).max() < 1e-5

    comps = load_pretrained(zimg_dir)
    spec = AdapterSpec(kind="lora", rank=2, target="attn")
    apply_adapter(comps, spec)
    for name, p in comps.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    save_adapter(comps, spec, tmp_path / "lora", base_model=str(zimg_dir))
    theirs.load_lora_weights(tmp_path / "lora")
    c = theirs(PROMPTS[0], guidance_scale=g - 1, generator=torch.Generator().manual_seed(3),
               **zimg.spec.pipeline_kwargs(zimg), **kw).images
    d = make_pipeline(comps, "euler")(PROMPTS[0], guidance_scale=g, generator=torch.Generator().manual_seed(3),
                                      **kw).images
    assert abs(c - a).max() > 1e-2 and abs(c - d).max() < 1e-4


def test_real_size_preset_on_meta():
    n = sum(p.numel() for p in z_image_transformer().parameters())
    assert 6.0e9 < n < 6.4e9  # Z-Image: 6.2 B
