"""The Qwen-Image family (models/families/qwen_image.py) against diffusers' QwenImagePipeline on a tiny random model
(Qwen2.5-VL text encoder behind the pipeline's template, 3-D VAE with per-channel latent statistics): prompt
encoding, latent normalization, the objective, the export (true CFG), LoRA files."""
import json

import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

from models.adapter_files import save_adapter
from models.adapters import AdapterSpec, apply_adapter
from models.components import build_components, load_pretrained, tokenize
from models.export import export_pipeline, make_pipeline
from models.families.packing import pack, unpack
from models.families.qwen_image import FoundryQwenImage, qwen_image_transformer, split_mask
from train.diffusion import DiffusionCore

PROMPTS = ["a handwritten digit seven", "a photo of sks dog"]
SIZE = dict(height=16, width=16)


@pytest.fixture(scope="module")
def qwen():
    comps = build_components(preset="qwen_image_micro")
    comps.vae.register_to_config(latents_mean=[0.1 * i for i in range(16)],  # statistics as a trained VAE has
                                 latents_std=[1.0 + 0.1 * i for i in range(16)])
    return comps


@pytest.fixture(scope="module")
def qwen_dir(qwen, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen") / "tiny-qwen-image"
    qwen.save_pretrained(out)
    return out


def test_folder_encodes_like_qwen_image_pipeline(qwen_dir):
    index = json.loads((qwen_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
    ref = QwenImagePipeline.from_pretrained(qwen_dir)
    comps = load_pretrained(qwen_dir)
    assert comps.family == "qwen_image" and isinstance(comps.unet, FoundryQwenImage)
    context, mask = split_mask(comps.text_encoder(tokenize(comps.tokenizer, PROMPTS))[0])
    embeds, ref_mask = ref.encode_prompt(PROMPTS, max_sequence_length=comps.tokenizer.caption_length)
    n = embeds.shape[1]
    assert ref_mask is not None and torch.equal(mask[:, :n], ref_mask.bool()) and not mask[:, n:].any()
    assert torch.equal(context[:, :n] * mask[:, :n, None], embeds * ref_mask[..., None])


def test_latent_normalization_is_the_pipelines(qwen):
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, _ = qwen.spec.encode_latents(qwen.vae, pixels)
    raw = qwen.vae.encode(pixels[:, :, None]).latent_dist.mean[:, :, 0]
    stats = torch.tensor(qwen.vae.config.latents_mean).view(1, 16, 1, 1), \
        torch.tensor(qwen.vae.config.latents_std).view(1, 16, 1, 1)
    assert torch.allclose(mean, (raw - stats[0]) / stats[1], atol=1e-6)
    # the pipeline's own decode path: latents / (1 / std) + mean
    ref = qwen.vae.decode((mean * stats[1] + stats[0])[:, :, None]).sample[:, :, 0]
    assert torch.allclose(qwen.spec.decode_latents(qwen.vae, mean), ref, atol=1e-6)


def test_training_loss_equals_hand_written_qwen_image_objective(qwen):
    torch.manual_seed(0)
    x0, noise, t = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8), torch.tensor([800.0, 90.0])
    full = qwen.text_encoder(tokenize(qwen.tokenizer, PROMPTS))[0]
    core = DiffusionCore(qwen.scheduler)
    d = core.noised(x0, t=t, noise=noise)
    ours = core.per_sample_loss(qwen.unet(d.x_t, d.t, encoder_hidden_states=full).sample, d.target, d.t)
    s = (t / 1000).view(-1, 1, 1, 1)
    context, mask = split_mask(full)
    out = QwenImageTransformer2DModel.forward(qwen.unet, pack((1 - s) * x0 + s * noise), context, mask.long(),
                                              timestep=t / 1000, img_shapes=[[(1, 4, 4)]] * 2, return_dict=False)[0]
    assert torch.allclose(ours, ((unpack(out, 8, 8) - (noise - x0)) ** 2).mean(dim=(1, 2, 3)), atol=1e-6)


def test_export_samples_like_ours_and_lora_loads(qwen, qwen_dir, tmp_path):
    out = export_pipeline(qwen, tmp_path / "export", sampler="euler")
    theirs = QwenImagePipeline.from_pretrained(out)
    kw = dict(num_inference_steps=3, output_type="np", **SIZE)
    a = theirs(PROMPTS[0], true_cfg_scale=2.5, negative_prompt="", generator=torch.Generator().manual_seed(3),
               **qwen.spec.pipeline_kwargs(qwen), **kw).images
    b = make_pipeline(qwen, "euler")(PROMPTS[0], guidance_scale=2.5, generator=torch.Generator().manual_seed(3),
                                      **kw).images
    assert a.shape == (1, 16, 16, 3) and abs(a - b).max() < 1e-4

    comps = load_pretrained(qwen_dir)
    spec = AdapterSpec(kind="lora", rank=2, target="attn")
    apply_adapter(comps, spec)
    for name, p in comps.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1.0)
    save_adapter(comps, spec, tmp_path / "lora", base_model=str(qwen_dir))
    theirs.load_lora_weights(tmp_path / "lora")
    c = theirs(PROMPTS[0], true_cfg_scale=2.5, negative_prompt="", generator=torch.Generator().manual_seed(3),
               **qwen.spec.pipeline_kwargs(qwen), **kw).images
    d = make_pipeline(comps, "euler")(PROMPTS[0], guidance_scale=2.5, generator=torch.Generator().manual_seed(3),
                                      **kw).images
    assert abs(c - a).max() > 1e-2 and abs(c - d).max() < 1e-4


def test_real_size_preset_on_meta():
    n = sum(p.numel() for p in qwen_image_transformer().parameters())
    assert 20.0e9 < n < 20.6e9  # Qwen-Image: 20 B
