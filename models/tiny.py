"""Size presets built from config, with no hub: the digits-world model and test-sized models.

Every preset is a real diffusers UNet and a real transformers CLIP text encoder; only the sizes are
small. The tokenizer is a byte-level BPE trained offline on the caption corpus, so any text
tokenizes (unknown words fall back to bytes) and nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast,
                          Qwen3Config, T5Config, T5EncoderModel)

from models.backbones import TRANSFORMER_PRESETS, build_transformer
from models.digits_vocab import CAPTION_TEMPLATES, DIGIT_WORDS

BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "<|pad|>"


@dataclass(frozen=True)
class Preset:
    """Sizes of one preset; `resolution` is the pixel (or latent) side the UNet is built for."""
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int
    text_hidden: int
    text_layers: int
    text_heads: int
    max_length: int
    vocab_size: int
    norm_groups: int = 8
    vae_channels: tuple[int, ...] | None = None  # latent presets: a small AutoencoderKL (4 latent channels)


PRESETS: dict[str, Preset] = {
    # ~1 M parameters: learns the 16x16 digits on a 2-core CPU in minutes (see shared NOTES).
    "tiny_pixel": Preset((32, 64), ("DownBlock2D", "CrossAttnDownBlock2D"),
                         ("CrossAttnUpBlock2D", "UpBlock2D"), 1, 64, 2, 2, 16, 512),
    # Test-sized: a forward pass in milliseconds.
    "micro": Preset((8, 16), ("DownBlock2D", "CrossAttnDownBlock2D"),
                    ("CrossAttnUpBlock2D", "UpBlock2D"), 1, 16, 1, 2, 12, 300),
    # Latent space: tiny_pixel's UNet on 8x8x4 latents of a 2x-downsampling AutoencoderKL (16x16 images). The VAE
    # starts random; train it on the digits with `python -m models.tiny_vae` (or load a folder) for real samples.
    "tiny_latent": Preset((32, 64), ("DownBlock2D", "CrossAttnDownBlock2D"),
                          ("CrossAttnUpBlock2D", "UpBlock2D"), 1, 64, 2, 2, 16, 512, vae_channels=(32, 64)),
    "micro_latent": Preset((8, 16), ("DownBlock2D", "CrossAttnDownBlock2D"),
                           ("CrossAttnUpBlock2D", "UpBlock2D"), 1, 16, 1, 2, 12, 300, vae_channels=(8, 16)),
    # Stable Diffusion 1.5's UNet layout (860 M parameters, random weights) with a small 768-d text encoder: for
    # measuring strategies, memory and throughput on GPUs (model.resolution=64 is SD's latent size).
    "sd15": Preset((320, 640, 1280, 1280), ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, 2, 768, 2, 12, 77, 512, norm_groups=32),
}


def default_caption_corpus() -> list[str]:
    """The captions the tokenizer is trained on: the digits world's, plus common caption words."""
    corpus = [t.format(word=w) for t in CAPTION_TEMPLATES for w in DIGIT_WORDS]
    corpus += ["a photo of a dog", "a photo of sks dog", "a painting of a cat", "a picture of a person",
               "a sks digit", "an image of the number", "0 1 2 3 4 5 6 7 8 9"]
    return corpus


def build_tokenizer(corpus: list[str], vocab_size: int = 512, max_length: int = 16) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` and wrap it so transformers and diffusers can save/load it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=max_length)


# Qwen3's chat template, reduced to what a one-turn user prompt uses (Z-Image, Flux.2 [klein] read their prompts so)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}")


def build_chat_tokenizer(vocab_size: int, max_length: int, corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """The offline BPE with Qwen's turn markers as special tokens and its chat template (a chat LLM text encoder)."""
    tok = build_tokenizer(corpus or default_caption_corpus(), vocab_size, max_length)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def build_qwen3(cls, tokenizer: PreTrainedTokenizerFast, hidden: int, layers: int, heads: int = 2):
    """A small Qwen3 (`Qwen3Model` or `Qwen3ForCausalLM`) on the local tokenizer: Z-Image's and Flux.2's encoder."""
    return cls(Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1, head_dim=16,
                           max_position_embeddings=tokenizer.model_max_length, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))


def build_text_encoder(p, tokenizer: PreTrainedTokenizerFast, projection_dim: int | None = None):
    """A CLIP text encoder whose special-token ids live inside the small vocabulary (NOTES: pooling); with a
    projection head of `projection_dim` (SDXL's and SD3's pooled vectors) when given."""
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=p.text_hidden, intermediate_size=2 * p.text_hidden,
                         num_hidden_layers=p.text_layers, num_attention_heads=p.text_heads,
                         max_position_embeddings=p.max_length, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         projection_dim=projection_dim or p.text_hidden)
    return CLIPTextModelWithProjection(cfg) if projection_dim else CLIPTextModel(cfg)


def build_t5_encoder(hidden: int, layers: int, heads: int, tokenizer: PreTrainedTokenizerFast):
    """A small T5 encoder on the local tokenizer (Flux's and SD3's context encoder); no dropout, as in inference."""
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=hidden, d_kv=hidden // heads, d_ff=2 * hidden,
                                   num_layers=layers, num_heads=heads, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                                   dropout_rate=0.0))


def build_unet(p: Preset, resolution: int, in_channels: int, cross_attention_dim: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=resolution, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=p.block_out_channels, down_block_types=p.down_block_types,
        up_block_types=p.up_block_types, layers_per_block=p.layers_per_block,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8,
        norm_num_groups=min(p.norm_groups, p.block_out_channels[0]))


def build_preset(name: str, resolution: int, in_channels: int = 3, seed: int = 0,
                 corpus: list[str] | None = None):
    """(backbone, text_encoder, tokenizer) for a named preset (a UNet, or a DiT for the `dit_*` presets),
    deterministic for a given seed."""
    if name not in PRESETS and name not in TRANSFORMER_PRESETS:
        raise ValueError(f"model.preset: unknown preset '{name}'; choose one of "
                         f"{sorted(PRESETS) + sorted(TRANSFORMER_PRESETS)} or set model.pretrained=/path/to/folder")
    if name in TRANSFORMER_PRESETS:
        t = TRANSFORMER_PRESETS[name]
        tokenizer = build_tokenizer(corpus or default_caption_corpus(), t.vocab_size, t.max_length)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text_encoder = build_text_encoder(t, tokenizer)
            backbone = build_transformer(t, resolution, in_channels, name)
        return backbone, text_encoder, tokenizer
    p = PRESETS[name]
    factor = 2 ** (len(p.block_out_channels) - 1) * vae_factor(p)
    if resolution % factor:
        raise ValueError(f"model.resolution={resolution} must be divisible by {factor} for preset '{name}'")
    tokenizer = build_tokenizer(corpus or default_caption_corpus(), p.vocab_size, p.max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = build_text_encoder(p, tokenizer)
        if p.vae_channels:
            unet = build_unet(p, resolution // vae_factor(p), LATENT_CHANNELS, p.text_hidden)
        else:
            unet = build_unet(p, resolution, in_channels, p.text_hidden)
    return unet, text_encoder, tokenizer


LATENT_CHANNELS = 4


def vae_factor(p: Preset) -> int:
    return 2 ** (len(p.vae_channels) - 1) if p.vae_channels else 1


def build_preset_vae(name: str, resolution: int, seed: int = 0):
    """The AutoencoderKL of a latent preset (None for pixel presets), deterministic for a seed."""
    p = PRESETS.get(name)
    if p is None or not p.vae_channels:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return build_small_vae(p.vae_channels, LATENT_CHANNELS, resolution)


def build_small_vae(channels: tuple[int, ...], latent_channels: int, resolution: int, cls=AutoencoderKL, **extra):
    """A small AutoencoderKL-style VAE (one block per level, `2 ** (levels - 1)` downsampling), unscaled: what the
    latent presets of every family start from (`python -m models.tiny_vae` trains one on the digits)."""
    if cls is AutoencoderKL:
        extra = {"scaling_factor": 1.0, "shift_factor": 0.0, **extra}
    return cls(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=tuple(channels),
               layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * len(channels),
               up_block_types=("UpDecoderBlock2D",) * len(channels), norm_num_groups=min(8, channels[0]),
               sample_size=resolution, **extra)
