"""The digits judge: accurate on real digits, honest Fréchet distance, safe storage, differentiable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.digits_judge import (
    WEIGHTS_NAME,
    DigitJudge,
    frechet_distance,
    prompt_accuracy,
    real_digit_features,
    real_digit_images,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("foundry_cache")


@pytest.fixture(scope="module")
def judge(cache_dir) -> DigitJudge:
    return DigitJudge.cached(cache_dir)


@pytest.fixture(scope="module")
def real16() -> tuple[torch.Tensor, np.ndarray]:
    return real_digit_images(16)


def test_held_out_accuracy(judge: DigitJudge) -> None:
    assert judge.test_accuracy >= 0.95


def test_real_images_are_in_model_range(real16) -> None:
    images, labels = real16
    assert images.shape == (1797, 3, 16, 16) and labels.shape == (1797,)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images[:, 0].eq(images[:, 1]).all()  # gray replicated
    assert images.mean() < -0.3  # white digit on black background


@pytest.mark.parametrize("resolution", [16, 32])
def test_prompt_accuracy_true_vs_shuffled_labels(judge: DigitJudge, resolution: int) -> None:
    images, labels = real_digit_images(resolution)
    assert prompt_accuracy(judge, images, labels) >= 0.95
    shuffled = np.random.default_rng(0).permutation(labels)
    assert prompt_accuracy(judge, images, torch.from_numpy(shuffled)) < 0.3


def test_predict_shapes(judge: DigitJudge, real16) -> None:
    images = real16[0][:7]
    proba = judge.predict_proba(images)
    assert proba.shape == (7, 10) and np.allclose(proba.sum(1), 1.0)
    assert judge.predict(images).shape == (7,)
    assert judge.features(images).shape[0] == 7


def test_frechet_distance(judge: DigitJudge, real16) -> None:
    feats = real_digit_features(judge, 16)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    perm = np.random.default_rng(0).permutation(len(feats))
    split = frechet_distance(feats[perm[:900]], feats[perm[900:]])
    noise = torch.rand(900, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vs_noise = frechet_distance(feats, judge.features(noise))
    assert vs_noise > 20 * split
    # a blank (all-black) image set sits far away too, even with a singular covariance
    blank = judge.features(-torch.ones(64, 3, 16, 16))
    assert np.isfinite(frechet_distance(feats, blank)) and frechet_distance(feats, blank) > 20 * split


def test_save_load_round_trip(judge: DigitJudge, real16, cache_dir, tmp_path) -> None:
    path = tmp_path / "judge.safetensors"
    judge.save(path)
    loaded = DigitJudge.load(path)
    images = real16[0][:200]
    np.testing.assert_array_equal(loaded.predict_proba(images), judge.predict_proba(images))
    assert loaded.test_accuracy == judge.test_accuracy
    # the cache was published atomically and is reused without retraining
    assert (cache_dir / WEIGHTS_NAME).exists()
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]
    again = DigitJudge.cached(cache_dir)
    np.testing.assert_array_equal(again.predict(images), judge.predict(images))


def test_cached_respects_env(monkeypatch, tmp_path, judge: DigitJudge) -> None:
    judge.save(tmp_path / WEIGHTS_NAME)  # pre-seeded: must load, not retrain
    monkeypatch.setenv("FOUNDRY_CACHE", str(tmp_path))
    assert DigitJudge.cached().test_accuracy == judge.test_accuracy


def test_log_prob_is_differentiable_and_matches_proba(judge: DigitJudge, real16) -> None:
    images, labels = real16[0][:16], real16[1][:16]
    x = (images * 0.9).clone().requires_grad_(True)  # inside (-1,1) so the clamp passes gradients
    logp = judge.log_prob_of(x, torch.from_numpy(labels))
    assert logp.shape == (16,)
    logp.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    proba = judge.predict_proba(x.detach())
    expected = np.log(proba[np.arange(16), labels])
    np.testing.assert_allclose(logp.detach().double().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_independent_judge_is_another_model_on_the_held_out_quarter():
    from models.digits_judge import IndependentJudge, real_digit_images

    judge = IndependentJudge()
    assert type(judge.svm).__name__ == "SVC" and judge.test_accuracy > 0.95  # scored on the MLP judge's 75%
    images, labels = real_digit_images(16)
    assert (judge.predict(images[:200]) == labels[:200]).mean() > 0.95
