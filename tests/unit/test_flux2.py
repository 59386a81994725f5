"""The Flux.2 [klein] family (models/families/flux2.py) against diffusers' Flux2KleinPipeline on a tiny random model
(Qwen3 with a chat template, three hidden layers side by side; patchified, batch-normalized latents): prompt encoding,
latent normalization, the objective, the export, LoRA files."""
import json

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

from models.adapter_files import save_adapter
from models.adapters import AdapterSpec, apply_adapter
from models.components import build_components, load_pretrained, tokenize
from models.export import export_pipeline, make_pipeline
from models.families.flux2 import FoundryFlux2, flux2_klein_4b_transformer, out_layers
from train.diffusion import DiffusionCore

PROMPTS = ["a handwritten digit seven", "a photo of sks dog"]


@pytest.fixture(scope="module")
def flux2():
    comps = build_components(preset="flux2_klein_micro")
    comps.vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 32))  # statistics as a trained VAE has them
    comps.vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 32))
    return comps


@pytest.fixture(scope="module")
def flux2_dir(flux2, tmp_path_factory):
    out = tmp_path_factory.mktemp("flux2") / "tiny-flux2-klein"
    flux2.save_pretrained(out)
    return out


def test_folder_encodes_like_flux2_klein_pipeline(flux2_dir):
    index = json.loads((flux2_dir / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline"
    assert index["transformer"] == ["diffusers", "Flux2Transformer2DModel"]
    ref = Flux2KleinPipeline.from_pretrained(flux2_dir)
    comps = load_pretrained(flux2_dir)
    assert comps.family == "flux2" and isinstance(comps.unet, FoundryFlux2) and comps.resolution == 16
    ours = comps.text_encoder(tokenize(comps.tokenizer, PROMPTS))[0]
    theirs, _ = ref.encode_prompt(PROMPTS, max_sequence_length=comps.tokenizer.model_max_length,
                                  text_encoder_out_layers=out_layers(comps.text_encoder.text_encoder))
    assert torch.equal(ours, theirs)


def test_latent_normalization_is_the_pipelines(flux2):
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, _ = flux2.spec.encode_latents(flux2.vae, pixels)
    raw = flux2.vae.encode(pixels).latent_dist.mean
    bn_mean = flux2.vae.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(flux2.vae.bn.running_var.view(1, -1, 1, 1) + flux2.vae.config.batch_norm_eps)
    assert mean.shape == (2, 32, 4, 4)
    assert torch.allclose(mean, (Flux2KleinPipeline._patchify_latents(raw) - bn_mean) / bn_std, atol=1e-6)
    back = Flux2KleinPipeline._unpatchify_latents(mean * bn_std + bn_mean)  # the pipeline's decode path
    assert torch.allclose(flux2.spec.decode_latents(flux2.vae, mean), flux2.vae.decode(back).sample, atol=1e-6)


def test_training_loss_equals_hand_written_flux2_objective(flux2):
    torch.manual_seed(0)
    x0, noise, t = torch.randn(2, 32, 4, 4), torch.randn(2, 32, 4, 4), torch.tensor([800.0, 90.0])
    context = flux2.text_encoder(tokenize(flux2.tokenizer, PROMPTS))[0]
    core = DiffusionCore(flux2.scheduler)
    d = core.noised(x0, t=t, noise=noise)
    ours = core.per_sample_loss(flux2.unet(d.x_t, d.t, encoder_hidden_states=context).sample, d.target, d.t)
    s = (t / 1000).view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    ids = Flux2KleinPipeline._prepare_latent_ids(x_t)
    out = Flux2Transformer2DModel.forward(flux2.unet, Flux2KleinPipeline._pack_latents(x_t), context, timestep=t / 1000,
                                          img_ids=ids, txt_ids=Flux2KleinPipeline._prepare_text_ids(context),
                                          guidance=None, return_dict=False)[0]
    pred = Flux2KleinPipeline._unpack_latents_with_ids(out, ids, 4, 4)
    assert torch.allclose(ours, ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3)), atol=1e-6)


def test_export_samples_like_ours_and_lora_loads(flux2, flux2_dir, tmp_path):
    out = export_pipeline(flux2, tmp_path / "export", sampler="euler")
    theirs = Flux2KleinPipeline.from_pretrained(out)
    kw = dict(num_inference_steps=3, guidance_scale=2.5, output_type="np", height=16, width=16)
    seeded = {"generator": torch.Generator().manual_seed(3), **flux2.spec.pipeline_kwargs(flux2), **kw}
    a = theirs(prompt=PROMPTS[0], **seeded).images
    b = make_pipeline(flux2, "euler")(PROMPTS[0], generator=torch.Generator().manual_seed(3), **kw).images
    assert a.shape == (1, 16, 16, 3) and abs(a - b).max() < 1e-5

    comps = load_pretrained(flux2_dir)
    spec = AdapterSpec(kind="lora", rank=2, target="attn")
    apply_adapter(comps, spec)
    for name, p in comps.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1.0)
    save_adapter(comps, spec, tmp_path / "lora", base_model=str(flux2_dir))
    theirs.load_lora_weights(tmp_path / "lora")
    seeded["generator"] = torch.Generator().manual_seed(3)
    c = theirs(prompt=PROMPTS[0], **seeded).images
    d = make_pipeline(comps, "euler")(PROMPTS[0], generator=torch.Generator().manual_seed(3), **kw).images
    assert abs(c - a).max() > 2e-3 and abs(c - d).max() < 1e-4  # changed, and exactly as our merged model


def test_real_size_preset_on_meta():
    n = sum(p.numel() for p in flux2_klein_4b_transformer().parameters())
    assert 3.8e9 < n < 4.0e9  # Flux.2 [klein] 4B's transformer: 3.9 B
