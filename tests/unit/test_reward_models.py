"""PickScore, HPSv2 and ImageReward from tiny random checkpoints in their published layouts (built here; nothing
downloads): each score equals an independent computation in the original layout, is deterministic, batched and
differentiable; a wrong or missing file is one line."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from models.tiny import build_tokenizer, default_caption_corpus
from train.reward_models import HPSv2, ImageReward, PickScore
from train.rewards import CLIP_MEAN, CLIP_STD

W, HEADS, PATCH, IMG, EMB = 16, 2, 8, 16, 8
PROMPTS = ["a handwritten digit one", "a photo of a dog"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(default_caption_corpus(), vocab_size=300, max_length=16)


def _rand(*shape):
    return torch.randn(*shape) * 0.2


def _resblocks(prefix: str, n: int) -> dict:
    sd = {}
    for i in range(n):
        p = f"{prefix}{i}."
        sd.update({p + "ln_1.weight": 1 + _rand(W), p + "ln_1.bias": _rand(W), p + "ln_2.weight": 1 + _rand(W),
                   p + "ln_2.bias": _rand(W), p + "attn.in_proj_weight": _rand(3 * W, W),
                   p + "attn.in_proj_bias": _rand(3 * W), p + "attn.out_proj.weight": _rand(W, W),
                   p + "attn.out_proj.bias": _rand(W), p + "mlp.c_fc.weight": _rand(2 * W, W),
                   p + "mlp.c_fc.bias": _rand(2 * W), p + "mlp.c_proj.weight": _rand(W, 2 * W),
                   p + "mlp.c_proj.bias": _rand(W)})
    return sd


def open_clip_state(vocab: int, ctx: int = 16) -> dict:
    """A tiny ViT CLIP in open_clip's parameter names (model.py / transformer.py)."""
    torch.manual_seed(0)
    grid = IMG // PATCH
    sd = {"visual.class_embedding": _rand(W), "visual.positional_embedding": _rand(grid * grid + 1, W),
          "visual.conv1.weight": _rand(W, 3, PATCH, PATCH), "visual.ln_pre.weight": 1 + _rand(W),
          "visual.ln_pre.bias": _rand(W), "visual.ln_post.weight": 1 + _rand(W), "visual.ln_post.bias": _rand(W),
          "visual.proj": _rand(W, EMB), "token_embedding.weight": _rand(vocab, W), "positional_embedding": _rand(ctx, W),
          "ln_final.weight": 1 + _rand(W), "ln_final.bias": _rand(W), "text_projection": _rand(W, EMB),
          "logit_scale": torch.tensor(2.0), "attn_mask": torch.full((ctx, ctx), float("-inf")).triu(1)}
    sd.update(_resblocks("visual.transformer.resblocks.", 2))
    sd.update(_resblocks("transformer.resblocks.", 2))
    return sd


def _oc_blocks(x, sd, prefix, n, mask=None):
    """open_clip's ResidualAttentionBlock, written against torch.nn.MultiheadAttention as open_clip uses it."""
    for i in range(n):
        p = f"{prefix}{i}."
        mha = torch.nn.MultiheadAttention(W, HEADS, batch_first=True)
        mha.load_state_dict({"in_proj_weight": sd[p + "attn.in_proj_weight"], "in_proj_bias": sd[p + "attn.in_proj_bias"],
                             "out_proj.weight": sd[p + "attn.out_proj.weight"], "out_proj.bias": sd[p + "attn.out_proj.bias"]})
        h = F.layer_norm(x, (W,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        x = x + mha(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (W,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                     sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        x = x + h
    return x


def open_clip_reference(sd, pixels, ids, eot_id):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, W), x], 1) + sd["visual.positional_embedding"]
    x = _oc_blocks(F.layer_norm(x, (W,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"]), sd,
                   "visual.transformer.resblocks.", 2)
    img = F.layer_norm(x[:, 0], (W,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    t = _oc_blocks(t, sd, "transformer.resblocks.", 2, mask=sd["attn_mask"][: ids.shape[1], : ids.shape[1]])
    t = F.layer_norm(t, (W,), sd["ln_final.weight"], sd["ln_final.bias"])
    eot = (ids == eot_id).int().argmax(-1)
    txt = t[torch.arange(len(ids)), eot] @ sd["text_projection"]
    return F.cosine_similarity(img, txt, dim=-1)  # HPSv2: diag(normalized image @ normalized text.T)


def _images(n=2, size=IMG):
    g = torch.Generator().manual_seed(1)
    return ((torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255) * 2 - 1)


def test_hpsv2_from_an_open_clip_checkpoint_equals_open_clip_computation(tmp_path, tok):
    sd = open_clip_state(len(tok))
    torch.save(sd, tmp_path / "HPS_v2.1_compressed.pt")
    tok.save_pretrained(tmp_path)
    reward = HPSv2(str(tmp_path), arch={"vision_head_width": W // HEADS, "text_heads": HEADS, "act": "gelu"})
    images = _images().requires_grad_(True)
    r = reward(images, PROMPTS)
    pixels = ((images.detach() + 1) / 2 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    ids = tok(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert torch.allclose(r, open_clip_reference(sd, pixels, ids, tok.eos_token_id), atol=1e-5)
    assert torch.equal(r.detach(), reward(images.detach(), PROMPTS))  # deterministic
    assert torch.allclose(reward(images[1:].detach(), PROMPTS[1:]), r[1:].detach(), atol=1e-6)  # batched = alone
    r.sum().backward()
    assert images.grad.abs().sum() > 0


def tiny_blip(vocab: int):
    from transformers import BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    torch.manual_seed(0)
    vision_cfg = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                      patch_size=PATCH, image_size=IMG, layer_norm_eps=1e-6)
    med = dict(vocab_size=vocab, hidden_size=W, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=40, layer_norm_eps=1e-12, hidden_act="gelu")
    vision = BlipVisionModel(BlipVisionConfig(**vision_cfg)).eval()
    text = BlipTextModel(BlipTextConfig(**med, encoder_hidden_size=24), add_pooling_layer=False).eval()
    head = [torch.nn.Linear(i, o) for i, o in ((W, 12), (12, 8), (8, 6), (6, 4), (4, 1))]
    return vision_cfg, med, vision, text, head


def image_reward_state(vision, text, head) -> dict:
    """The ImageReward.pt layout: BLIP's timm-style ViT (vit.py), its BERT (med.py) and the MLP head."""
    v, sd = vision.state_dict(), {}
    sd["blip.visual_encoder.cls_token"], sd["blip.visual_encoder.pos_embed"] = (v["embeddings.class_embedding"],
                                                                                 v["embeddings.position_embedding"])
    for kind in ("weight", "bias"):
        sd[f"blip.visual_encoder.patch_embed.proj.{kind}"] = v[f"embeddings.patch_embedding.{kind}"]
        sd[f"blip.visual_encoder.norm.{kind}"] = v[f"post_layernorm.{kind}"]
        for i in range(2):
            for orig, hf in (("norm1", "layer_norm1"), ("attn.qkv", "self_attn.qkv"), ("attn.proj", "self_attn.projection"),
                             ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                sd[f"blip.visual_encoder.blocks.{i}.{orig}.{kind}"] = v[f"encoder.layers.{i}.{hf}.{kind}"]
    sd.update({f"blip.text_encoder.{k}": t for k, t in text.state_dict().items()})
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(40).expand(1, -1)
    for i, lin in zip((0, 2, 4, 6, 7), head):
        sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"] = lin.weight.detach(), lin.bias.detach()
    for k in ("blip.vision_proj.weight", "blip.text_proj.weight"):  # BLIP_Pretrain's projections, unused by the score
        sd[k] = torch.zeros(EMB, W)
    return sd


def test_image_reward_from_its_checkpoint_equals_the_blip_computation(tmp_path, tok):
    vision_cfg, med, vision, text, head = tiny_blip(len(tok))
    torch.save(image_reward_state(vision, text, head), tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    (tmp_path / "vision_config.json").write_text(json.dumps(vision_cfg))
    tok.save_pretrained(tmp_path)
    reward = ImageReward(str(tmp_path))
    images = _images().requires_grad_(True)
    r = reward(images, PROMPTS)
    with torch.no_grad():  # ImageReward.score: text_encoder(ids, mask, image_embeds)[:, 0] -> mlp -> (r - mean) / std
        pixels = ((images + 1) / 2 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        emb = vision(pixel_values=pixels).last_hidden_state
        t = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        x = text(input_ids=t.input_ids, attention_mask=t.attention_mask, encoder_hidden_states=emb).last_hidden_state[:, 0]
        for lin in head:
            x = lin(x)
        expected = ((x - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)
    assert r.shape == (2,) and torch.allclose(r, expected, atol=1e-5)
    r.sum().backward()
    assert images.grad.abs().sum() > 0


def test_pickscore_equals_clip_models_own_logits(tmp_path, tok):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=IMG, patch_size=PATCH), projection_dim=8)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    images = _images()
    pixels = ((images + 1) / 2 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    ids = tok(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        own = model(input_ids=ids, pixel_values=pixels).logits_per_image.diagonal()  # PickScore's published recipe
    assert torch.allclose(PickScore(str(tmp_path))(images, PROMPTS), own, atol=1e-5)


def test_wrong_or_missing_reward_weights_are_one_line(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="reward.path: '.*nowhere' is not a folder or file"):
        HPSv2(str(tmp_path / "nowhere"))
    vision_cfg, med, vision, text, head = tiny_blip(len(tok))
    (tmp_path / "ir").mkdir()
    torch.save(image_reward_state(vision, text, head), tmp_path / "ir" / "ImageReward.pt")
    tok.save_pretrained(tmp_path / "ir")
    with pytest.raises(ValueError, match="not an open_clip ViT checkpoint") as err:  # ImageReward weights given to HPSv2
        HPSv2(str(tmp_path / "ir"))
    assert "\n" not in str(err.value)
    (tmp_path / "ir" / "med_config.json").write_text(json.dumps(med))  # no vision_config: ViT-L expected, 24 layers
    with pytest.raises(ValueError, match="lacks 'blip.visual_encoder.blocks.2.norm1.weight'|do not fit"):
        ImageReward(str(tmp_path / "ir"))
    (tmp_path / "oc").mkdir()
    torch.save(open_clip_state(len(tok)), tmp_path / "oc" / "model.pt")
    with pytest.raises(ValueError, match="not an ImageReward checkpoint"):
        (tmp_path / "oc" / "med_config.json").write_text(json.dumps(med))
        ImageReward(str(tmp_path / "oc"))
    (tmp_path / "pickle").mkdir()
    torch.save({"state_dict": {"x": torch.zeros(1)}, "fn": print}, tmp_path / "pickle" / "model.pt")
    with pytest.raises(ValueError, match="not a tensors-only checkpoint"):
        HPSv2(str(tmp_path / "pickle"))
