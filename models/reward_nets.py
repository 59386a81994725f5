"""The networks behind the preference rewards people use, rebuilt from their published checkpoints on transformers.

- HPSv2 / HPSv2.1 ship as open_clip checkpoints (ViT-H-14, `HPS_v2*_compressed.pt`); `clip_from_open_clip` maps the
  open_clip layout onto transformers' `CLIPModel` (the same computation: pre-LN ViT and causal text transformer,
  q/k/v split from `in_proj`, projections transposed).
- ImageReward ships as a BLIP checkpoint (`ImageReward.pt`: BLIP ViT-L/16 + a BERT text encoder with cross-attention,
  and an MLP head); `blip_reward_from_checkpoint` maps it onto transformers' `BlipVisionModel` and `BlipTextModel`,
  which are ports of BLIP's own modules.

The packages that define these models (open_clip, hpsv2, image-reward) import torchvision at import time, and these
machines have no CPU build of it (shared NOTES), so the weights are loaded here instead. Files are read with
safetensors or `torch.load(weights_only=True)`; a checkpoint of another architecture fails with one line naming it.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

OPEN_CLIP_ARCHS = {  # what the state dict cannot tell: head counts and the activation (open_clip's model configs)
    "ViT-H-14": {"vision_head_width": 80, "text_heads": 16, "act": "gelu"},
    "ViT-L-14": {"vision_head_width": 64, "text_heads": 12, "act": "gelu"},
    "ViT-B-32": {"vision_head_width": 64, "text_heads": 8, "act": "gelu"},
}


def read_weights(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (tensors only); unwraps {'state_dict': ...} and 'module.'."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: '{path}' does not exist; give the local weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickles with code in them are refused, never executed
            raise ValueError(f"{what}: '{path}' is not a tensors-only checkpoint ({type(e).__name__}); "
                             "convert it to safetensors") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"{what}: '{path}' holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _one_line(fn):
    """A weight the mapping expects and the checkpoint lacks becomes one line naming it and `what`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyError as e:
            what = kwargs.get("what", "reward.path")
            raise ValueError(f"{what}: the checkpoint lacks '{e.args[0]}'; is it the right model?") from None
    return wrapper


def _blocks(state: dict, prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _split_in_proj(src: dict, dst: dict, a: str, b: str) -> None:
    for kind in ("weight", "bias"):
        for name, part in zip(("q_proj", "k_proj", "v_proj"), src.pop(f"{a}attn.in_proj_{kind}").chunk(3)):
            dst[f"{b}self_attn.{name}.{kind}"] = part


def _resblocks(src: dict, dst: dict, a: str, b: str, n: int) -> None:
    for i in range(n):
        pa, pb = f"{a}{i}.", f"{b}{i}."
        _split_in_proj(src, dst, pa, pb)
        for old, new in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            for kind in ("weight", "bias"):
                dst[f"{pb}{new}.{kind}"] = src.pop(f"{pa}{old}.{kind}")


@_one_line
def clip_from_open_clip(state: dict[str, torch.Tensor], arch: str | dict = "ViT-H-14", eos_token_id: int | None = None,
                        what: str = "reward.path"):
    """transformers `CLIPModel` with an open_clip ViT checkpoint's weights (HPSv2 is ViT-H-14). The text feature is
    read at the first `eos_token_id` (open_clip takes the argmax id, which is the end token of CLIP's BPE: the
    default, vocab size - 1)."""
    from transformers import CLIPConfig, CLIPModel

    spec = OPEN_CLIP_ARCHS.get(arch) if isinstance(arch, str) else dict(arch)
    if spec is None:
        raise ValueError(f"{what}: open_clip architecture '{arch}' is not one of {sorted(OPEN_CLIP_ARCHS)}; "
                         "give reward.arch as {vision_head_width, text_heads, act}")
    need = ("visual.conv1.weight", "visual.proj", "token_embedding.weight", "text_projection", "logit_scale")
    if missing := [k for k in need if k not in state]:
        raise ValueError(f"{what}: not an open_clip ViT checkpoint (no {', '.join(missing)})")
    src = dict(state)
    conv = src["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((src["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    t_width = src["token_embedding.weight"].shape[1]
    vision = dict(hidden_size=width, intermediate_size=src["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=_blocks(src, "visual.transformer.resblocks."), patch_size=patch,
                  num_attention_heads=width // spec["vision_head_width"], image_size=grid * patch,
                  hidden_act=spec["act"], layer_norm_eps=1e-5)
    text = dict(vocab_size=src["token_embedding.weight"].shape[0], hidden_size=t_width,
                intermediate_size=src["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=_blocks(src, "transformer.resblocks."), num_attention_heads=spec["text_heads"],
                max_position_embeddings=src["positional_embedding"].shape[0], hidden_act=spec["act"],
                layer_norm_eps=1e-5,
                eos_token_id=src["token_embedding.weight"].shape[0] - 1 if eos_token_id is None else eos_token_id)
    cfg = CLIPConfig(vision_config=vision, text_config=text, projection_dim=src["visual.proj"].shape[1])
    dst = {
        "vision_model.embeddings.class_embedding": src.pop("visual.class_embedding"),
        "vision_model.embeddings.position_embedding.weight": src.pop("visual.positional_embedding"),
        "vision_model.embeddings.patch_embedding.weight": src.pop("visual.conv1.weight"),
        "visual_projection.weight": src.pop("visual.proj").t().contiguous(),
        "text_model.embeddings.token_embedding.weight": src.pop("token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight": src.pop("positional_embedding"),
        "text_projection.weight": src.pop("text_projection").t().contiguous(),
        "logit_scale": src.pop("logit_scale"),
    }
    for kind in ("weight", "bias"):
        dst[f"vision_model.pre_layrnorm.{kind}"] = src.pop(f"visual.ln_pre.{kind}")
        dst[f"vision_model.post_layernorm.{kind}"] = src.pop(f"visual.ln_post.{kind}")
        dst[f"text_model.final_layer_norm.{kind}"] = src.pop(f"ln_final.{kind}")
    _resblocks(src, dst, "visual.transformer.resblocks.", "vision_model.encoder.layers.", vision["num_hidden_layers"])
    _resblocks(src, dst, "transformer.resblocks.", "text_model.encoder.layers.", text["num_hidden_layers"])
    src.pop("attn_mask", None)
    return _strict(CLIPModel(cfg), dst, src, what)


def _strict(model: torch.nn.Module, dst: dict, left: dict, what: str) -> torch.nn.Module:
    if left:
        raise ValueError(f"{what}: the checkpoint has {len(left)} weights this architecture does not use "
                         f"(e.g. '{next(iter(left))}'); is it the right model?")
    dst = {k: v for k, v in dst.items() if not k.endswith("position_ids")}  # a buffer, rebuilt by the model
    try:
        missing, unexpected = model.load_state_dict(dst, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{what}: weights do not fit the architecture ({str(e).splitlines()[1].strip()})") from None
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise ValueError(f"{what}: the checkpoint does not match the architecture ({len(missing)} weights missing, "
                         f"e.g. {missing[:1]}; {len(unexpected)} unknown, e.g. {unexpected[:1]})")
    return model.eval().requires_grad_(False)


BLIP_VIT_L = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
              "patch_size": 16, "image_size": 224, "layer_norm_eps": 1e-6}
IMAGE_REWARD_MEAN, IMAGE_REWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's normalisation
MLP_LAYERS = (0, 2, 4, 6, 7)  # the Linear layers of ImageReward's head (dropouts between)


@_one_line
def blip_reward_from_checkpoint(state: dict[str, torch.Tensor], med_config: dict, vision: dict | None = None,
                                what: str = "reward.path"):
    """(BlipVisionModel, BlipTextModel, [(W, b), ...] head) with an ImageReward checkpoint's weights. A missing
    weight raises KeyError inside; it is reported as one line naming the checkpoint."""
    from transformers import BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    if "blip.visual_encoder.cls_token" not in state or "mlp.layers.0.weight" not in state:
        raise ValueError(f"{what}: not an ImageReward checkpoint (no blip.visual_encoder.cls_token / mlp.layers.0)")
    vcfg = BlipVisionConfig(**{**BLIP_VIT_L, **(vision or {})})
    src = {k: v for k, v in state.items() if not k.startswith(("blip.text_decoder.", "blip.vision_proj",
                                                                "blip.text_proj", "blip.itm_head"))}
    v, d = "blip.visual_encoder.", {}
    d["embeddings.class_embedding"], d["embeddings.position_embedding"] = src.pop(v + "cls_token"), src.pop(v + "pos_embed")
    for kind in ("weight", "bias"):
        d[f"embeddings.patch_embedding.{kind}"] = src.pop(f"{v}patch_embed.proj.{kind}")
        d[f"post_layernorm.{kind}"] = src.pop(f"{v}norm.{kind}")
        for i in range(vcfg.num_hidden_layers):
            for old, new in (("norm1", "layer_norm1"), ("attn.qkv", "self_attn.qkv"), ("attn.proj", "self_attn.projection"),
                             ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                d[f"encoder.layers.{i}.{new}.{kind}"] = src.pop(f"{v}blocks.{i}.{old}.{kind}")
    vision_model = _strict(BlipVisionModel(vcfg), d, {}, what)
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "layer_norm_eps", "hidden_act")
    tcfg = BlipTextConfig(**{k: med_config[k] for k in keys if k in med_config}, encoder_hidden_size=vcfg.hidden_size)
    t = "blip.text_encoder."
    text_state = {k[len(t):]: src.pop(k) for k in list(src) if k.startswith(t)}
    text_model = _strict(BlipTextModel(tcfg, add_pooling_layer=False), text_state, {}, what)
    head = [(src.pop(f"mlp.layers.{i}.weight"), src.pop(f"mlp.layers.{i}.bias")) for i in MLP_LAYERS]
    _strict(torch.nn.Module(), {}, src, what)  # nothing may be left over
    return vision_model, text_model, head


def file_in(folder: Path, patterns: tuple[str, ...], what: str) -> Path:
    """The one weights file in `folder` matching `patterns` (a file path is returned as it is)."""
    if folder.is_file():
        return folder
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: '{folder}' is not a folder or file; give the local model folder")
    found = sorted({p for pat in patterns for p in folder.glob(pat)})
    if len(found) != 1:
        raise FileNotFoundError(f"{what}: '{folder}' has {len(found)} files matching {' or '.join(patterns)}; "
                                "expected exactly one weights file")
    return found[0]
