"""A small classifier trained on real 8x8 digits that judges generated digit images.

There are no pretrained FID/CLIP networks offline, so this judge stands in for both: its
hidden layer is the feature space for a Fréchet distance, and its class probabilities say
whether an image shows the prompted digit. Inference needs only the stored weight
matrices (safetensors), never sklearn, and `log_prob_of` is differentiable for rewards.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "digit_judge.safetensors"
_TRAIN_RESOLUTIONS = (16, 32)  # the digits world renders at these sizes


def default_cache_dir() -> Path:
    """$FOUNDRY_CACHE, else ~/.cache/diffusion-foundry (shared by every run on the machine)."""
    return Path(os.environ.get("FOUNDRY_CACHE") or Path.home() / ".cache" / "diffusion-foundry")


def upscale_digits(digits8: np.ndarray, resolution: int = 16) -> np.ndarray:
    """sklearn 8x8 digits (0..16) -> uint8 [N,res,res,3]: PIL BICUBIC, gray replicated."""
    gray = np.clip(np.rint(digits8.reshape(-1, 8, 8) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    up = [np.asarray(Image.fromarray(g).resize((resolution, resolution), Image.BICUBIC)) for g in gray]
    return np.repeat(np.stack(up)[..., None], 3, axis=-1)


def real_digit_images(resolution: int = 16) -> tuple[torch.Tensor, np.ndarray]:
    """All 1,797 real digits as the models see them: float [N,3,res,res] in [-1,1], plus labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rgb = torch.from_numpy(upscale_digits(digits.images, resolution)).permute(0, 3, 1, 2).float()
    return rgb / 127.5 - 1.0, digits.target.astype(np.int64)


def to_judge_input(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] -> [B,64] gray 8x8 in sklearn's 0..16 scale (area average, differentiable)."""
    x = (images.clamp(-1.0, 1.0) + 1.0) * 8.0
    x = x.mean(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d(x, (8, 8)).flatten(1)


class DigitJudge:
    """One-hidden-layer ReLU MLP (64 -> hidden -> 10) on round-tripped 8x8 digits."""

    def __init__(self, weights: dict[str, torch.Tensor], test_accuracy: float = float("nan")) -> None:
        self.weights = {k: v.detach().float().cpu() for k, v in weights.items()}
        self.test_accuracy = float(test_accuracy)

    # ---------------------------------------------------------------- training / storage
    @classmethod
    def train(cls, hidden: int = 128, seed: int = 0) -> "DigitJudge":
        """Fit on real digits after the 8x8 -> res -> 8x8 round trip; accuracy from a held-out split."""
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier

        feats, labels = [], None
        for res in _TRAIN_RESOLUTIONS:  # every resolution the world renders at, same digits
            imgs, labels = real_digit_images(res)
            feats.append(to_judge_input(imgs).numpy() / 16.0)
        idx_tr, idx_te = train_test_split(np.arange(len(labels)), test_size=0.25, random_state=seed, stratify=labels)
        x_tr = np.concatenate([f[idx_tr] for f in feats])
        y_tr = np.concatenate([labels[idx_tr]] * len(feats))
        clf = MLPClassifier(hidden_layer_sizes=(hidden,), activation="relu", alpha=1e-3, max_iter=400, random_state=seed)
        clf.fit(x_tr, y_tr)
        acc = float(clf.score(feats[0][idx_te], labels[idx_te]))  # 16x16, the default resolution
        weights = {
            "w1": torch.from_numpy(clf.coefs_[0] / 16.0),  # fold the 0..16 -> 0..1 scaling into w1
            "b1": torch.from_numpy(clf.intercepts_[0]),
            "w2": torch.from_numpy(clf.coefs_[1]),
            "b2": torch.from_numpy(clf.intercepts_[1]),
        }
        return cls(weights, test_accuracy=acc)

    def save(self, path: str | os.PathLike) -> None:
        """Safetensors only (no pickle); accuracy travels in the metadata."""
        save_file({k: v.contiguous() for k, v in self.weights.items()}, str(path),
                  metadata={"test_accuracy": repr(self.test_accuracy)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DigitJudge":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return cls(load_file(str(path)), test_accuracy=float(meta.get("test_accuracy", "nan")))

    @classmethod
    def cached(cls, cache_dir: str | os.PathLike | None = None) -> "DigitJudge":
        """Load the cached judge, or train it once and publish it atomically (tmp + os.replace)."""
        directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = directory / WEIGHTS_NAME
        if path.exists():
            return cls.load(path)
        judge = cls.train()
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".digit_judge.", suffix=".tmp")
        os.close(fd)
        try:
            judge.save(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return judge

    # ---------------------------------------------------------------- forward (torch)
    def _w(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return self.weights[name].to(device=like.device, dtype=like.dtype)

    def _hidden(self, images: torch.Tensor) -> torch.Tensor:
        x = to_judge_input(_as_float(images))
        return torch.relu(x @ self._w("w1", x) + self._w("b1", x))

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        h = self._hidden(images)
        return h @ self._w("w2", h) + self._w("b2", h)

    def features(self, images: torch.Tensor) -> np.ndarray:
        """Hidden-layer activations [B, hidden]: the feature space for the Fréchet distance."""
        with torch.no_grad():
            return self._hidden(images).double().cpu().numpy()

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(self._logits(images).double(), dim=-1).cpu().numpy()

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.predict_proba(images).argmax(axis=1)

    def log_prob_of(self, images: torch.Tensor, labels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """log p(label | image) [B]; differentiable w.r.t. images (used as a reward)."""
        images = _as_float(images)
        logp = torch.log_softmax(self._logits(images), dim=-1)
        labels = torch.as_tensor(labels, dtype=torch.long, device=logp.device)
        return logp.gather(1, labels.view(-1, 1)).squeeze(1)


def _as_float(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    images = torch.as_tensor(images)
    return images if images.is_floating_point() else images.float()


class IndependentJudge:
    """A second judge that no training step uses: an RBF support-vector machine (another architecture) fit on the
    quarter of the real digits that `DigitJudge` held out (a disjoint split), on the same 8x8 round trip. RL and
    preference methods train against `DigitJudge` (the reward, the pair ranker); their gains are read here too, so a
    gain that only games the reward's network shows as a gap between the two. Fit in well under a second; sklearn at
    inference (it scores, it never gives gradients)."""

    def __init__(self, seed: int = 0) -> None:
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC

        feats, labels = [], None
        for res in _TRAIN_RESOLUTIONS:
            imgs, labels = real_digit_images(res)
            feats.append(to_judge_input(imgs).numpy() / 16.0)
        idx_judge, idx_own = train_test_split(np.arange(len(labels)), test_size=0.25, random_state=seed,
                                              stratify=labels)  # DigitJudge.train's split: this judge gets the rest
        self.svm = SVC(C=10.0, gamma="scale").fit(np.concatenate([f[idx_own] for f in feats]),
                                                  np.concatenate([labels[idx_own]] * len(feats)))
        self.test_accuracy = float(self.svm.score(feats[0][idx_judge], labels[idx_judge]))

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.svm.predict(to_judge_input(_as_float(images)).detach().cpu().numpy() / 16.0)


def prompt_accuracy(judge: DigitJudge, images: torch.Tensor, labels: torch.Tensor | np.ndarray) -> float:
    """Share of images the judge classifies as the digit they were prompted with."""
    labels = labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    return float((judge.predict(images) == labels.reshape(-1)).mean())


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fit to two feature sets (the FID formula)."""
    from scipy import linalg

    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    eye = np.eye(a.shape[1])
    sig_a = np.atleast_2d(np.cov(a, rowvar=False)) + eps * eye  # eps: ReLU features have dead units
    sig_b = np.atleast_2d(np.cov(b, rowvar=False)) + eps * eye
    covmean = linalg.sqrtm(sig_a @ sig_b)
    if not np.isfinite(covmean).all():
        covmean = linalg.sqrtm((sig_a + 1e3 * eps * eye) @ (sig_b + 1e3 * eps * eye))
    covmean = np.real(covmean)  # drop tiny imaginary parts from round-off
    diff = mu_a - mu_b
    fd = diff @ diff + np.trace(sig_a) + np.trace(sig_b) - 2.0 * np.trace(covmean)
    return float(max(fd, 0.0))


def real_digit_features(judge: DigitJudge, resolution: int = 16) -> np.ndarray:
    """Judge features of all real digits after the upscale/downscale round trip (FD reference)."""
    images, _ = real_digit_images(resolution)
    return judge.features(images)

