"""The Flux.1 family (models/families/flux.py) against diffusers' FluxPipeline on tiny random models the tests build:
prompt encoding, the training objective, the exported folder, LoRA files (diffusers and kohya/ComfyUI layouts), and
one-line refusals of bad folders."""
import json
import shutil

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file, save_file

from models.components import build_components, load_pretrained, tokenize
from models.export import export_pipeline, make_pipeline
from models.families import family_for_folder
from models.families.flux import FoundryFlux, flux1_dev_transformer

PROMPTS = ["a handwritten digit seven", "a photo of sks dog"]


@pytest.fixture(scope="module")
def flux():
    return build_components(preset="flux_micro", guidance=1.0)


@pytest.fixture(scope="module")
def flux_dir(flux, tmp_path_factory):
    out = tmp_path_factory.mktemp("flux") / "tiny-flux"
    flux.save_pretrained(out)
    return out


def test_saved_folder_is_plain_flux_and_encodes_like_its_pipeline(flux, flux_dir):
    index = json.loads((flux_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    ref = FluxPipeline.from_pretrained(flux_dir)  # diffusers alone, none of our classes
    comps = load_pretrained(flux_dir)
    assert comps.family == "flux" and isinstance(comps.unet, FoundryFlux)
    context = comps.text_encoder(tokenize(comps.tokenizer, PROMPTS))[0]
    embeds, pooled, text_ids = ref.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=comps.tokenizer.lengths[1])
    assert torch.equal(context[:, :-1], embeds)
    assert torch.equal(context[:, -1, : pooled.shape[1]], pooled) and not context[:, -1, pooled.shape[1]:].any()
    assert text_ids.shape == (embeds.shape[1], 3)


def test_training_loss_equals_hand_written_flux_objective(flux):
    """The core's flow loss through FoundryFlux equals Flux's objective written out with the pipeline's own helpers:
    pack 2x2, img_ids/txt_ids, sigma = t/1000, guidance 1.0, target noise - x0 on the unpacked latents."""
    from train.diffusion import DiffusionCore

    torch.manual_seed(0)
    x0, noise = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    t = torch.tensor([700.0, 150.0])
    context = flux.text_encoder(tokenize(flux.tokenizer, PROMPTS))[0]
    core = DiffusionCore(flux.scheduler)
    d = core.noised(x0, t=t, noise=noise)
    ours = core.per_sample_loss(flux.unet(d.x_t, d.t, encoder_hidden_states=context).sample, d.target, d.t)

    s = (t / 1000).view(-1, 1, 1, 1)
    x_t = FluxPipeline._pack_latents((1 - s) * x0 + s * noise, 2, 16, 8, 8)
    embeds, pooled = context[:, :-1], context[:, -1, : flux.unet.config.pooled_projection_dim]
    out = FluxTransformer2DModel.forward(  # diffusers' own forward, called the way FluxPipeline calls it
        flux.unet, hidden_states=x_t, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t / 1000,
        img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
        txt_ids=torch.zeros(embeds.shape[1], 3), guidance=torch.ones(2), return_dict=False)[0]
    pred = FluxPipeline._unpack_latents(out, 8, 8, 1)
    expected = ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(ours, expected, atol=1e-6)


def test_dynamic_shift_follows_token_count(flux):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = flux.scheduler.config
    for side in (8, 16):
        mu = calculate_shift((side // 2) ** 2, config.base_image_seq_len, config.max_image_seq_len,
                             config.base_shift, config.max_shift)
        shift = flux.spec.training_shift(flux, torch.Size([1, 16, side, side]))
        assert shift == pytest.approx(float(torch.tensor(mu).exp()))


def test_export_loads_in_flux_pipeline_and_samples_like_ours(flux, tmp_path):
    out = export_pipeline(flux, tmp_path / "export", sampler="euler")
    theirs = FluxPipeline.from_pretrained(out)
    kw = dict(num_inference_steps=3, output_type="np")
    a = theirs(PROMPTS[0], negative_prompt="", true_cfg_scale=2.5, generator=torch.Generator().manual_seed(3),
               height=16, width=16, **flux.spec.pipeline_kwargs(flux), **kw).images
    b = make_pipeline(flux, "euler")(PROMPTS[0], guidance_scale=2.5, generator=torch.Generator().manual_seed(3),
                                      **kw).images
    assert a.shape == (1, 16, 16, 3) and abs(a - b).max() < 1e-5


def test_real_size_preset_on_meta():
    model = flux1_dev_transformer()
    n = sum(p.numel() for p in model.parameters())
    assert next(model.parameters()).is_meta and 11.8e9 < n < 12.0e9  # Flux.1-dev: 11.9 B


def test_bad_flux_folders_are_one_line(flux_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(flux_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"flux-family folder but lacks subfolder\(s\) text_encoder_2"):
        load_pretrained(broken)
    other = tmp_path / "wan"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(ValueError, match=r"holds a WanPipeline pipeline; the families trained here load .*Flux"):
        family_for_folder(other)
    lora = tmp_path / "lora"
    lora.mkdir()
    save_file({"x": torch.zeros(1)}, str(lora / "pytorch_lora_weights.safetensors"),
              metadata={"foundry_adapter": json.dumps({"base_model": "/models/flux-dev"})})
    with pytest.raises(ValueError, match=r"holds a LoRA \(adapter files\), not a model; .*\(/models/flux-dev\)"):
        family_for_folder(lora)
    with pytest.raises(ValueError, match="resolution=18: the flux family packs 2x2 patches of a 2x VAE"):
        build_components(preset="flux_micro", resolution=18)
    with pytest.raises(ValueError, match="model.guidance=3.0: the sd family has no guidance-embedding input"):
        build_components(preset="micro", guidance=3.0)


def test_kohya_layout_reads_back_through_diffusers_converter(flux, tmp_path):
    """The ComfyUI/kohya file (BFL names, fused qkv) loads through diffusers' own converter and gives the same images
    as the diffusers-format file. Double-stream blocks only: the converter hard-codes Flux.1's full single-block
    widths, which a tiny model does not have."""
    from models.adapter_files import DIFFUSERS_WEIGHTS, KOHYA_WEIGHTS, save_adapter
    from models.adapters import AdapterSpec, apply_adapter
    from models.families import Components

    torch.manual_seed(1)
    config = {**flux.unet.config, "num_single_layers": 0}
    comps = Components(FoundryFlux.from_config(config), flux.text_encoder, flux.tokenizer, flux.scheduler,
                       vae=flux.vae, family="flux")
    base = tmp_path / "base"
    comps.save_pretrained(base)
    spec = AdapterSpec(kind="lora", rank=2, alpha=3.0, target="attn_mlp")  # Flux's own preset
    apply_adapter(comps, spec)
    for name, p in comps.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    written = save_adapter(comps, spec, tmp_path / "lora", base_model=str(base))
    keys = set(load_file(written["kohya"]))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    images = {}
    for name in (DIFFUSERS_WEIGHTS, KOHYA_WEIGHTS):
        pipe = FluxPipeline.from_pretrained(base)
        pipe.load_lora_weights(tmp_path / "lora", weight_name=name)
        images[name] = pipe("a handwritten digit two", height=16, width=16, num_inference_steps=2,
                            generator=torch.Generator().manual_seed(0), output_type="np",
                            **flux.spec.pipeline_kwargs(flux)).images
    plain = FluxPipeline.from_pretrained(base)("a handwritten digit two", height=16, width=16, num_inference_steps=2,
                                              generator=torch.Generator().manual_seed(0), output_type="np",
                                              **flux.spec.pipeline_kwargs(flux)).images
    assert abs(images[DIFFUSERS_WEIGHTS] - plain).max() > 1e-2
    assert abs(images[DIFFUSERS_WEIGHTS] - images[KOHYA_WEIGHTS]).max() < 1e-5


def test_checkpoint_from_another_family_is_refused_in_one_line(tiny_cfg):
    from train.build import build_module

    module = build_module(tiny_cfg())
    with pytest.raises(ValueError, match="written by a flux-family model, but this run builds a sd-family one"):
        module.on_load_checkpoint({"foundry": {"family": "flux"}, "state_dict": {}})
