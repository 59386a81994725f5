"""Rewards for online RL (DDPO) and reward backpropagation: images + prompts in, `[B]` rewards out.

A reward has a `name` and says whether it is `differentiable` (reward backprop needs that). Images arrive in
[-1, 1], [B, 3, H, W]. Built in: JPEG (in)compressibility (no weights), the digits judge's log-probability of
the prompted digit, and scorers from local folders when the user has the weights: CLIP similarity (PickScore /
HPSv2-style CLIP models) and a CLIP aesthetic-predictor head. `WeightedSum` combines them. Nothing downloads:
a folder without the expected files fails before training with one line naming it.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data.webdataset import derive_seed
from models.digits_judge import DigitJudge

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class Reward:
    name = "reward"
    differentiable = False

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError


class JpegSize(Reward):
    """Kilobytes of the JPEG encoding (quality 95): `sign=-1` rewards compressibility, `+1` incompressibility."""
    def __init__(self, sign: int = -1, quality: int = 95):
        if sign not in (-1, 1):
            raise ValueError(f"reward.sign={sign}: -1 (compressibility) or 1 (incompressibility)")
        self.sign, self.quality = sign, quality
        self.name = "jpeg_compressibility" if sign < 0 else "jpeg_incompressibility"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for a in arr:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        return self.sign * torch.tensor(sizes, device=images.device)


WORD_TO_DIGIT = {w: i for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])}


def digit_in_prompt(prompt: str) -> int | None:
    """The digit a prompt asks for ("a handwritten digit seven" -> 7); None if it names none or several."""
    found = {WORD_TO_DIGIT[w] for w in re.findall(r"[a-z]+", prompt.lower()) if w in WORD_TO_DIGIT}
    found |= {int(c) for c in re.findall(r"\b\d\b", prompt)}
    return found.pop() if len(found) == 1 else None


class DigitsLogProb(Reward):
    """log p(prompted digit | image) under the digits judge; NaN for prompts that name no digit (dropped, counted)."""
    name = "digits_logprob"
    differentiable = True

    def __init__(self, judge=None):
        self.judge = judge or DigitJudge.cached()

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        labels = [digit_in_prompt(p) for p in prompts]
        known = torch.tensor([lab is not None for lab in labels], device=images.device)
        lp = self.judge.log_prob_of(images.float(), torch.tensor([lab or 0 for lab in labels], device=images.device))
        return torch.where(known, lp, torch.full_like(lp, float("nan")))


def _need(path: Path, *names: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"reward.path: '{path}' is not a folder; give a local model folder")
    missing = [n for n in names if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(f"reward.path: '{path}' lacks {', '.join(missing)}; expected a folder saved with "
                                "save_pretrained (config.json, weights, tokenizer files)")


def clip_pixels(images: torch.Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """[-1,1] images -> CLIP's input, differentiably (resize, center crop, normalize)."""
    x = (images.float() + 1) / 2
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                      align_corners=False, antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    m, s = torch.tensor(mean, device=x.device).view(1, 3, 1, 1), torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _preprocess_stats(path: Path) -> tuple[tuple, tuple]:
    cfg = path / "preprocessor_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        return tuple(data.get("image_mean", CLIP_MEAN)), tuple(data.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD


class CLIPScore(Reward):
    """PickScore / HPSv2-style: logit_scale x cosine(image, prompt) of a CLIP model from a local folder."""
    name = "clip_score"
    differentiable = True

    def __init__(self, path: str):
        from transformers import AutoTokenizer, CLIPModel

        self.path = Path(path).expanduser()
        _need(self.path, "config.json")
        self.model = CLIPModel.from_pretrained(self.path).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.mean, self.std = _preprocess_stats(self.path)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        model = self.model.to(images.device)
        size = model.config.vision_config.image_size
        img = model.get_image_features(pixel_values=clip_pixels(images, size, self.mean, self.std))
        ids = self.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
        txt = model.get_text_features(input_ids=ids.input_ids.to(images.device))
        img, txt = (getattr(o, "pooler_output", o) for o in (img, txt))
        return model.logit_scale.exp() * F.cosine_similarity(img, txt, dim=-1)


class AestheticScore(Reward):
    """A linear/MLP head on normalized CLIP image embeddings (the LAION aesthetic predictor layout): the folder
    holds `clip/` (a CLIPModel) and `head.safetensors` with `layers.N.weight/bias` Linear layers."""
    name = "aesthetic"
    differentiable = True

    def __init__(self, path: str):
        from safetensors.torch import load_file
        from transformers import CLIPModel

        self.path = Path(path).expanduser()
        _need(self.path, "clip/config.json", "head.safetensors")
        self.model = CLIPModel.from_pretrained(self.path / "clip").eval().requires_grad_(False)
        state = load_file(str(self.path / "head.safetensors"))
        idx = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
        if not idx:
            raise FileNotFoundError(f"reward.path: '{self.path / 'head.safetensors'}' has no layers.N.weight tensors")
        self.head = [(state[f"layers.{i}.weight"], state.get(f"layers.{i}.bias")) for i in idx]
        self.mean, self.std = _preprocess_stats(self.path / "clip")

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        model = self.model.to(images.device)
        emb = model.get_image_features(pixel_values=clip_pixels(images, model.config.vision_config.image_size,
                                                                self.mean, self.std))
        x = F.normalize(getattr(emb, "pooler_output", emb), dim=-1)
        for w, b in self.head:
            x = F.linear(x, w.to(x.device), None if b is None else b.to(x.device))
        return x.squeeze(-1)


class WeightedSum(Reward):
    """sum_i w_i r_i; differentiable only if every term is."""
    def __init__(self, terms: list[dict]):
        self.terms = [(t["reward"], float(t.get("weight", 1.0))) for t in terms]
        if not self.terms:
            raise ValueError("reward.terms is empty; list rewards with weights")
        self.name = "+".join(f"{w:g}*{r.name}" for r, w in self.terms)
        self.differentiable = all(r.differentiable for r, _ in self.terms)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return sum(w * r(images, prompts) for r, w in self.terms)


class ShuffledPrompts(Reward):
    """A control: `reward` scored against the batch's prompts in a random order, so it no longer says whether an
    image matches its own prompt. RL on it must not raise prompt accuracy; if it does, the gain came from
    something other than the reward's prompt signal."""
    def __init__(self, reward: Reward, seed: int = 0):
        self.reward, self.name, self.differentiable = reward, f"shuffled_{reward.name}", reward.differentiable
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        order = torch.randperm(len(prompts), generator=self.generator).tolist()
        return self.reward(images, [prompts[i] for i in order])


class Augmented(Reward):
    """The mean of `reward` over `draws` random translations (up to `max_shift` pixels, edge pixels repeated) and
    optional Gaussian pixel noise: an expectation over transformations. Reward backprop follows the reward's
    gradient, and a small judge's raw gradient points at pixel patterns it alone reads (adversarial texture);
    the averaged reward only rises for what survives a shift, which is the shape. Same differentiability as
    `reward`."""
    def __init__(self, reward: Reward, max_shift: int = 1, noise_std: float = 0.0, draws: int = 4, seed: int = 0):
        if max_shift < 0 or noise_std < 0 or draws < 1:
            raise ValueError(f"reward.max_shift={max_shift}, noise_std={noise_std}, draws={draws}: expected "
                             "max_shift >= 0, noise_std >= 0, draws >= 1")
        self.reward, self.max_shift, self.noise_std, self.draws = reward, int(max_shift), float(noise_std), int(draws)
        self.name, self.differentiable = f"augmented_{reward.name}", reward.differentiable
        self.generator = torch.Generator().manual_seed(seed)
        self.last_offsets: list[tuple[int, int]] = []

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        m, (h, w) = self.max_shift, images.shape[-2:]
        padded = F.pad(images, (m, m, m, m), mode="replicate") if m else images
        total, self.last_offsets = 0.0, []
        for _ in range(self.draws):
            dy, dx = (int(v) for v in torch.randint(0, 2 * m + 1, (2,), generator=self.generator))
            self.last_offsets.append((dy, dx))
            view = padded[..., dy:dy + h, dx:dx + w]
            if self.noise_std:
                view = view + self.noise_std * torch.randn(view.shape, generator=self.generator).to(view)
            total = total + self.reward(view, prompts)
        return total / self.draws


def finite_rewards(rewards: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(mask of usable samples, how many were NaN/Inf): bad rewards drop their samples instead of the batch."""
    ok = torch.isfinite(rewards)
    return ok, int((~ok).sum())


def per_prompt_advantages(rewards: torch.Tensor, prompt_ids: torch.Tensor, gather=None, eps: float = 1e-6,
                          ok: torch.Tensor | None = None, min_group: int | None = None) -> torch.Tensor:
    """(r - mean_prompt) / std_prompt, the statistics over every rank's samples of the same prompt.

    `gather(t) -> [world, ...]` (e.g. LightningModule.all_gather). `ok` marks usable rewards (others are left out of
    every statistic and get 0). Without `min_group`, prompts seen once fall back to the global statistics (DDPO);
    with it, a prompt's group with fewer usable samples gets no advantage at all (GRPO). Returns this rank's
    advantages, in its own order.
    """
    ok = torch.isfinite(rewards) if ok is None else ok
    rewards = torch.where(ok, rewards, torch.zeros_like(rewards))
    all_r = gather(rewards).reshape(-1) if gather else rewards
    all_p = gather(prompt_ids).reshape(-1) if gather else prompt_ids
    all_ok = (gather(ok.float()).reshape(-1) > 0.5) if gather else ok
    adv = torch.zeros_like(rewards)
    usable = all_r[all_ok]
    g_mean, g_std = (usable.mean(), usable.std(unbiased=False)) if usable.numel() else (0.0, 1.0)
    for pid in prompt_ids.unique():
        mine, theirs = (prompt_ids == pid) & ok, (all_p == pid) & all_ok
        vals = all_r[theirs]
        if min_group is not None and vals.numel() < min_group:
            continue
        mean, std = (vals.mean(), vals.std(unbiased=False)) if vals.numel() > 1 else (g_mean, g_std)
        adv[mine] = (rewards[mine] - mean) / (std + eps)
    return adv


def prompt_id(prompt: str) -> int:
    return derive_seed("prompt", prompt) % (2**62)


def to_numpy_images(images: torch.Tensor) -> np.ndarray:
    return ((images.detach().float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
