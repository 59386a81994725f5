"""SDXL-style folders (UNet with text_time micro-conditioning, two CLIP text encoders, a VAE): loaded from a local
folder the tests write with diffusers' own StableDiffusionXLPipeline, encoded and denoised exactly as that pipeline
does, trained through the real CLI (latent space) and exported back to a folder diffusers' SDXL pipeline loads."""
import copy
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from models.components import build_components, load_pretrained, tokenize
from models.export import export_pipeline, make_pipeline
from models.sdxl import DualCLIPTextEncoder, FoundrySDXLUNet
from models.tiny import build_tokenizer, default_caption_corpus
from tests.conftest import cli, small

PROMPTS = ["a handwritten digit seven", "a photo of sks dog"]


def _clip_config(tok, hidden: int, **kw) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **kw)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    """A tiny SDXL pipeline folder: 16x16 images, 8x8x4 latents, encoders of 16 and 24 features (context 40)."""
    torch.manual_seed(0)
    tok = build_tokenizer(default_caption_corpus(), 300, 12)
    tok_2 = copy.deepcopy(tok)
    tok_2.pad_token = "!"  # SDXL's second tokenizer pads with "!", the first with end-of-text
    assert tok_2.pad_token_id != tok.pad_token_id
    te = CLIPTextModel(_clip_config(tok, 16))
    te_2 = CLIPTextModelWithProjection(_clip_config(tok, 24, projection_dim=12))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=40, attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=12 + 6 * 4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te_2, tokenizer=tok, tokenizer_2=tok_2,
                                     unet=unet, scheduler=sched, add_watermarker=False)
    out = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def test_sdxl_folder_encodes_and_denoises_like_diffusers_pipeline(sdxl_dir):
    comps = load_pretrained(sdxl_dir)
    assert isinstance(comps.text_encoder, DualCLIPTextEncoder) and isinstance(comps.unet, FoundrySDXLUNet)
    assert comps.vae is not None and comps.resolution == 16 and comps.unet.vae_scale_factor == 2
    ref = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    ids = tokenize(comps.tokenizer, PROMPTS)
    assert (comps.text_encoder.ids_for_second(ids) == tokenize(comps.tokenizer_2, PROMPTS)).all()
    with torch.no_grad():
        packed = comps.text_encoder(ids)[0]
        embeds, _, pooled, _ = ref.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert packed.shape == (2, comps.tokenizer.model_max_length + 1, 40)
    torch.testing.assert_close(packed[:, :-1], embeds)
    torch.testing.assert_close(packed[:, -1, :12], pooled)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    time_ids = ref._get_add_time_ids((16, 16), (0, 0), (16, 16), embeds.dtype, text_encoder_projection_dim=12)
    with torch.no_grad():
        ours = comps.unet(x, t, packed).sample
        theirs = ref.unet(x, t, embeds, added_cond_kwargs={"text_embeds": pooled,
                                                            "time_ids": time_ids.repeat(2, 1)}).sample
    torch.testing.assert_close(ours, theirs)


def test_sdxl_folder_missing_second_encoder_is_one_line(sdxl_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sdxl_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"sdxl-family folder but lacks subfolder\(s\) text_encoder_2"):
        load_pretrained(broken)


@pytest.mark.integration
def test_sdxl_trains_through_cli_and_exports_to_diffusers(sdxl_dir, tmp_path):
    run_dir = tmp_path / "sdxl"
    res = subprocess.run(cli(*small(f"paths.output_dir={tmp_path}", "run_name=sdxl", "model=pretrained",
                                    f"model.pretrained={sdxl_dir}", "model.gradient_checkpointing=false")),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "latent space 16x16" in res.stdout + res.stderr
    assert (run_dir / "samples" / "step_000004.png").is_file()
    before = load_pretrained(sdxl_dir)
    after = build_components(pretrained=str(sdxl_dir))  # the checkpoint's weights moved away from the folder's
    from train.build import load_components

    trained = load_components(run_dir / "checkpoints" / "last.ckpt")
    assert isinstance(trained.unet, FoundrySDXLUNet)
    assert any(not torch.equal(a, b) for a, b in zip(trained.unet.parameters(), before.unet.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(after.unet.parameters(), before.unet.parameters()))

    out = tmp_path / "exported"
    res = subprocess.run([sys.executable, "-m", "train.ops.export", str(run_dir), str(out)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    pipe = StableDiffusionXLPipeline.from_pretrained(out)  # diffusers' own classes, no code from here
    assert type(pipe.unet) is UNet2DConditionModel
    kw = dict(num_inference_steps=3, guidance_scale=2.0, output_type="np")
    a = pipe(PROMPTS[:1], generator=torch.Generator().manual_seed(3), **kw).images
    b = make_pipeline(load_pretrained(out))(PROMPTS[:1], generator=torch.Generator().manual_seed(3), **kw).images
    assert a.shape == (1, 16, 16, 3)
    assert abs(a - b).max() < 1e-5
    again = export_pipeline(load_pretrained(out), tmp_path / "again")  # and round-trips through our loader
    assert (again / "text_encoder_2").is_dir() and (again / "tokenizer_2").is_dir()


def test_bucketed_batch_time_ids_reach_the_sdxl_unet_in_training(sdxl_dir, tiny_cfg):
    from train.build import build_module

    module = build_module(tiny_cfg("model=pretrained", f"model.pretrained={sdxl_dir}",
                                   "model.gradient_checkpointing=false"))
    ids = tokenize(module.components.tokenizer, PROMPTS)
    batch = {"pixels": torch.rand(2, 3, 16, 16) * 2 - 1, "input_ids": ids,
             "time_ids": torch.tensor([[40.0, 20, 8, 0, 16, 16], [16, 64, 0, 24, 16, 16]])}
    seen = []
    module.unet.register_forward_pre_hook(lambda m, args: seen.append(m.micro_conditioning))

    def loss(with_ids: bool):
        module.noise_generator.manual_seed(0)
        with module.micro_conditioning(batch["time_ids"] if with_ids else None):
            return module.method.loss(batch, module)["loss"]

    plain, bucketed = loss(False), loss(True)
    assert seen[0] is None and torch.equal(seen[1], batch["time_ids"])
    assert module.unet.micro_conditioning is None  # cleared after the step
    assert not torch.allclose(plain, bucketed)
