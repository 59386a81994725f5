"""Evaluation beyond the digits world: prompts -> images -> a table of metrics.

- prompts: a file (.txt one per line, `#` comments; .json list; .jsonl with "prompt" or "caption") or a named set;
- images: one fixed seed per (prompt, copy), independent of batching, at each guidance scale;
- metrics per guidance scale: the mean of any reward (train/rewards.py, train/reward_models.py: PickScore, HPSv2,
  ImageReward, CLIP score, aesthetic, ...), and FID/KID against real images (a folder or shards) through torchmetrics
  with a local feature network (`clip:FOLDER`, a CLIP image tower; or `inception:FILE`, torch-fidelity's InceptionV3
  with the FID weights, where torch-fidelity imports: it needs torchvision);
- a held-out denoising loss: the training loss on held-out shards at fixed timesteps and fixed noise (SimpleTuner's
  validation loss), so two checkpoints are compared on the same draws.
`foundry-eval MODEL --prompts ...` (train/ops/evaluate.py) and the `prompt_eval` callback call these functions.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch

from data.digits import eval_prompt
from data.transforms import ImageTransform
from data.webdataset import build_stream
from train.methods.denoise import denoising_loss
from train.rewards import Reward, clip_pixels

log = logging.getLogger(__name__)

NAMED_PROMPTS = {"digits": lambda: [eval_prompt(d) for d in range(10)]}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_prompts(spec: str) -> list[str]:
    if spec in NAMED_PROMPTS:
        return NAMED_PROMPTS[spec]()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--prompts: '{spec}' is neither a file nor a named set ({', '.join(NAMED_PROMPTS)})")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        prompts = [str(p) for p in json.loads(text)]
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        prompts = [str(r.get("prompt", r.get("caption", ""))) if isinstance(r, dict) else str(r) for r in rows]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not any(prompts):
        raise ValueError(f"--prompts: '{spec}' holds no prompts")
    return prompts


@torch.no_grad()
def generate_images(pipe, prompts: list[str], guidance_scale: float, steps: int, seed: int = 1234,
                    batch_size: int = 250) -> torch.Tensor:
    """Images in [-1, 1], image i drawn from seed + i, whatever the batch size."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        imgs = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens,
                    output_type="pt").images
        out.append(imgs.float().cpu() * 2 - 1)
    return torch.cat(out)


class ImageFeatures(torch.nn.Module):
    """A frozen feature network for FID/KID: images in [0, 1] -> [N, D] (torchmetrics' custom-feature contract)."""

    def __init__(self, spec: str):
        super().__init__()
        kind, _, path = spec.partition(":")
        if kind not in ("clip", "inception") or not path:
            raise ValueError(f"--features: '{spec}' should be clip:FOLDER (a CLIPModel) or inception:FILE "
                             "(torch-fidelity's pt_inception-2015-12-05 weights)")
        self.kind, self.path = kind, Path(path).expanduser()
        self.net = self._clip() if kind == "clip" else self._inception()
        self.net.eval().requires_grad_(False)
        self.num_features = self(torch.rand(1, 3, 64, 64)).shape[-1]

    def _clip(self):
        from transformers import CLIPModel
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"--features: '{self.path}' is not a CLIPModel folder (no config.json)")
        return CLIPModel.from_pretrained(self.path)

    def _inception(self):
        if not self.path.is_file():
            raise FileNotFoundError(f"--features: '{self.path}' does not exist; give the InceptionV3 weights file")
        torch.load(self.path, map_location="cpu", weights_only=True)  # refuse a pickle before torch-fidelity loads it
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            raise ImportError(f"--features inception: needs torch-fidelity (pip install torch-fidelity; it imports "
                              f"torchvision: {e}); or use clip:FOLDER") from None
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(self.path))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "inception":  # torch-fidelity takes uint8 images and resizes to 299 itself
            return self.net((images.clamp(0, 1) * 255).round().to(torch.uint8))[0]
        emb = self.net.get_image_features(pixel_values=clip_pixels(images * 2 - 1, self.net.config.vision_config.image_size))
        return getattr(emb, "pooler_output", emb)


def fid_kid(real: torch.Tensor, fake: torch.Tensor, features: ImageFeatures) -> dict[str, float]:
    """FID and KID (torchmetrics) between image sets in [-1, 1], on `features`."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(real), len(fake))
    if n < 2:
        raise ValueError(f"FID/KID: need at least 2 real and 2 generated images, got {len(real)} and {len(fake)}")
    fid = FrechetInceptionDistance(feature=features, normalize=True)
    with warnings.catch_warnings():  # "KID keeps every feature in memory": the point of a bounded --max-real
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=features, normalize=True, subset_size=min(n, 50), subsets=20)
    for metric in (fid, kid):
        metric.update((real + 1) / 2, real=True)
        metric.update((fake + 1) / 2, real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def real_images(spec: str, resolution: int, limit: int, tokenizer=None) -> torch.Tensor:
    """Up to `limit` real images in [-1, 1] at `resolution`: from a folder of image files, or from shards."""
    from PIL import Image  # lazy: PIL only for image folders

    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        if not files:
            raise FileNotFoundError(f"--real: '{spec}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
        fit = ImageTransform(resolution)
        return torch.stack([fit(Image.open(f).convert("RGB")) for f in files])
    out, n = [], 0
    for batch in shard_batches(spec, tokenizer, resolution, batch_size=min(limit, 64)):
        out.append(batch["pixels"][: limit - n])
        n += len(out[-1])
        if n >= limit:
            break
    if not out:
        raise FileNotFoundError(f"--real: '{spec}' is not a folder and gave no images as shards")
    return torch.cat(out)


def shard_batches(urls: str, tokenizer, resolution: int, batch_size: int):
    """Held-out shards in their stored order, once, no caption dropout, no flips: the same batches every call."""
    return build_stream(urls, tokenizer=tokenizer, resolution=resolution, batch_size=batch_size, caption_dropout=0.0,
                        shuffle_buffer=0, resampled=False, seed=0, rank=0, world_size=1)


@torch.no_grad()
def heldout_loss(module, urls: str, resolution: int, timesteps: list[int], batches: int = 4, batch_size: int = 32,
                 seed: int = 0) -> dict[str, float]:
    """The module's own training loss (`denoising_loss`) on held-out shards at each of `timesteps`, the VAE draw and
    the noise seeded from `seed` and the batch index: `heldout_loss_t{t}` and their mean `heldout_loss`."""
    sums, count = {t: 0.0 for t in timesteps}, 0
    for i, batch in enumerate(shard_batches(urls, module.components.tokenizer, resolution, batch_size)):
        if i >= batches:
            break
        module.noise_generator.manual_seed(seed * 1_000_003 + i)
        x0 = module.batch_x0(batch)
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i * 1009 + t))
            tt = torch.full((len(x0),), t, dtype=torch.float32 if module.core.flow else torch.long, device=x0.device)
            loss = denoising_loss(module, x0, batch["input_ids"], noise=noise.to(x0), t=tt)["loss"]
            sums[t] += float(loss.sum())
        count += len(x0)
    if not count:
        raise ValueError(f"--heldout: '{urls}' gave no samples")
    out = {f"heldout_loss_t{t}": s / count for t, s in sums.items()}
    out["heldout_loss"] = sum(out.values()) / len(timesteps)
    return out


def evaluate_prompts(pipe, prompts: list[str], guidance_scales=(1.0, 3.0), steps: int = 25, per_prompt: int = 1,
                     seed: int = 1234, rewards: dict[str, Reward] | None = None, real=None,
                     features: ImageFeatures | None = None, batch_size: int = 64, save_dir: Path | None = None
                     ) -> dict[str, float]:
    """`eval/<metric>_g<scale>` for every reward and FID/KID at every guidance scale. `real`: images in [-1, 1], or
    a function of the generated images' size that loads them."""
    rewards, metrics = rewards or {}, {}
    allp = [p for p in prompts for _ in range(per_prompt)]
    for g in guidance_scales:
        images = generate_images(pipe, allp, g, steps, seed, batch_size)
        for name, reward in rewards.items():
            with torch.no_grad():
                scores = torch.cat([reward(images[i:i + batch_size], allp[i:i + batch_size]).float().cpu()
                                    for i in range(0, len(allp), batch_size)])
            ok = torch.isfinite(scores)
            metrics[f"eval/{name}_g{g:g}"] = float(scores[ok].mean()) if ok.any() else float("nan")
        if real is not None and features is not None:
            real = real(images.shape[-1]) if callable(real) else real
            for k, v in fid_kid(real, images, features).items():
                metrics[f"eval/{k}_g{g:g}"] = v
        if save_dir is not None:
            save_images(images, Path(save_dir) / f"g{g:g}")
    return metrics


def save_images(images: torch.Tensor, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(folder / f"{i:05d}.png")
