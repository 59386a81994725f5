"""Preference models as rewards: PickScore, HPSv2/2.1 and ImageReward, from local files (nothing downloads).

Each is differentiable (reward backprop can use it), batched, frozen, and kept outside the sharded engine (a plain
attribute of the method, moved to the images' device on use). Scores follow each model's own definition:
- PickScore: `logit_scale * cos(image, prompt)` of its CLIP-H (a transformers folder, as published);
- HPSv2: `cos(image, prompt)` of its open_clip ViT-H-14 (the published `.pt`, or a transformers folder);
- ImageReward: the MLP head on BLIP's cross-attended [CLS] feature, normalised by ImageReward's mean and std.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from models.reward_nets import (IMAGE_REWARD_MEAN, IMAGE_REWARD_STD, blip_reward_from_checkpoint, clip_from_open_clip,
                                file_in, read_weights)
from train.rewards import CLIPScore, Reward, _need, _preprocess_stats, clip_pixels

WEIGHT_FILES = ("*.pt", "*.pth", "*.bin", "*.safetensors")


class PickScore(CLIPScore):
    """PickScore_v1 (a CLIP-H fine-tuned on Pick-a-Pic): its folder as published (config, weights, tokenizer)."""
    name = "pickscore"


def _tokenizer(folder: Path, what: str = "reward.path"):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{what}: '{folder}' has no usable tokenizer files ({type(e).__name__}); save the "
                                "model's tokenizer there with save_pretrained") from None


class HPSv2(Reward):
    """Human Preference Score v2/v2.1: the folder holds the open_clip checkpoint (`HPS_v2*_compressed.pt`) and the
    CLIP tokenizer's files, or is a transformers CLIPModel folder. `arch` names the open_clip model (ViT-H-14)."""
    name = "hpsv2"
    differentiable = True

    def __init__(self, path: str, arch: str | dict = "ViT-H-14"):
        from transformers import CLIPModel

        self.path = Path(path).expanduser()
        if (self.path / "config.json").is_file():
            self.model, self.tokenizer = CLIPModel.from_pretrained(self.path).eval().requires_grad_(False), None
        else:
            state = read_weights(file_in(self.path, WEIGHT_FILES, "reward.path"), "reward.path")
            self.tokenizer = _tokenizer(self.path)
            self.model = clip_from_open_clip(state, arch, eos_token_id=self.tokenizer.eos_token_id)
        self.tokenizer = self.tokenizer or _tokenizer(self.path)
        self.mean, self.std = _preprocess_stats(self.path)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        model = self.model.to(images.device)
        img = model.get_image_features(pixel_values=clip_pixels(images, model.config.vision_config.image_size,
                                                                self.mean, self.std))
        ids = self.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
        txt = model.get_text_features(input_ids=ids.input_ids.to(images.device))
        img, txt = (getattr(o, "pooler_output", o) for o in (img, txt))
        return F.cosine_similarity(img, txt, dim=-1)


class ImageReward(Reward):
    """ImageReward v1.0: the folder holds `ImageReward.pt`, `med_config.json` (its BERT config) and the BLIP
    tokenizer's files; `vision_config.json` overrides the ViT-L/16 at 224 px when present."""
    name = "imagereward"
    differentiable = True
    max_length = 35  # ImageReward's prompt length

    def __init__(self, path: str):
        self.path = Path(path).expanduser()
        _need(self.path, "med_config.json")
        weights = file_in(self.path, WEIGHT_FILES, "reward.path")
        med = json.loads((self.path / "med_config.json").read_text())
        vision = self.path / "vision_config.json"
        self.vision, self.text, self.head = blip_reward_from_checkpoint(
            read_weights(weights, "reward.path"), med, json.loads(vision.read_text()) if vision.is_file() else None)
        self.tokenizer = _tokenizer(self.path)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        vision, text = self.vision.to(images.device), self.text.to(images.device)
        emb = vision(pixel_values=clip_pixels(images, vision.config.image_size)).last_hidden_state
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(images.device)
        out = text(input_ids=tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=emb,
                   encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long, device=emb.device))
        x = out.last_hidden_state[:, 0].float()
        for w, b in self.head:
            x = F.linear(x, w.to(x.device), b.to(x.device))
        return ((x - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD).squeeze(-1)
