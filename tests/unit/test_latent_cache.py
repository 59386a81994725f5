"""Latent and text-embedding caches (`foundry-shards encode`): resumable encoding shared between processes, cached
samples equal to on-the-fly encoding, training from the cache through the real CLI, and refusals (another VAE, a
bad tensor) by stated rules."""
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from data.digits import ensure_digits_shards
from data.latent_cache import MANIFEST, MEMBER, check_cache, model_fingerprint, read_manifest
from data.webdataset import build_stream
from models.components import build_components, vae_moments
from tests.conftest import cli, small

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def latent_model(tmp_path_factory):
    """A micro latent model (16x16 images -> 8x8x4 latents) saved as a diffusers folder."""
    path = tmp_path_factory.mktemp("latent") / "micro-latent"
    build_components(preset="micro_latent", resolution=16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cache_dir(latent_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "digits-latents"
    res = subprocess.run([sys.executable, "-m", "train.ops.shards", "encode", ensure_digits_shards(16), "--out", str(out),
                          "--model", str(latent_model)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "wrote 8 shard(s) (1797 samples), 0 already present" in res.stdout, res.stdout
    return out


def _members(shard: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load

    with tarfile.open(shard) as tar:
        return {m.name.split(".")[0]: load(tar.extractfile(m).read()) for m in tar.getmembers()
                if m.name.endswith(MEMBER)}


def test_cache_manifest_and_samples_equal_on_the_fly_encoding(cache_dir, latent_model):
    manifest = read_manifest(cache_dir / MANIFEST)
    comps = build_components(pretrained=str(latent_model))
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["context_shape"] == [12, 16]
    assert manifest["vae_fingerprint"] == model_fingerprint(comps.vae) and manifest["dtype"] == "fp16"
    check_cache(manifest, comps, str(cache_dir))  # the model that made it passes
    # the same images through the VAE and the text encoder now give the cached tensors (fp16 storage)
    stream = build_stream(ensure_digits_shards(16), tokenizer=comps.tokenizer, resolution=16, batch_size=4,
                          caption_dropout=0.0, shuffle_buffer=0, resampled=False)
    batch = next(iter(stream))
    cached = {}
    for shard in sorted(cache_dir.glob("*.tar")):
        cached.update(_members(shard))
    with torch.no_grad():
        mean, std = vae_moments(comps.vae, batch["pixels"])
        context = comps.text_encoder(batch["input_ids"])[0]
    for i, key in enumerate(batch["keys"]):
        c = cached[key.rsplit("/", 1)[1]]
        torch.testing.assert_close(c["latent_mean"].float(), mean[i], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(c["latent_std"].float(), std[i], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(c["context"].float(), context[i], atol=2e-3, rtol=2e-3)


def test_interrupted_encode_resumes_without_redoing_finished_shards(cache_dir, latent_model, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(cache_dir, out)
    shards = sorted(out.glob("*.tar"))
    removed = [shards[2], shards[5]]
    reference = {p.name: _members(p) for p in removed}
    for p in removed:
        p.unlink()
    (out / f".{removed[0].name}.tmp").write_bytes(b"half-written by a killed run")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    res = subprocess.run([sys.executable, "-m", "train.ops.shards", "encode", ensure_digits_shards(16), "--out", str(out),
                          "--model", str(latent_model), "--procs", "2"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "wrote 2 shard(s)" in res.stdout and "6 already present (resumed)" in res.stdout, res.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in before} == before  # untouched
    for p in removed:  # redone, with the same content
        again = _members(p)
        assert again.keys() == reference[p.name].keys()
        for key, tensors in again.items():
            for name, t in tensors.items():
                torch.testing.assert_close(t.float(), reference[p.name][key][name].float(), atol=2e-3, rtol=0)
    assert not list(out.glob(".*.tmp.*")) and not (out / f".{removed[0].name}.tmp").exists()


def test_training_from_cache_through_cli_and_refusing_another_vae(cache_dir, tmp_path):
    res = subprocess.run(cli(*small(f"paths.output_dir={tmp_path}", "run_name=cached", "model.preset=micro_latent",
                                    f"data.urls={cache_dir}", "logger=csv")),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "cached" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "cached" / "samples" / "step_000004.png").is_file()
    # a model with another VAE (another init seed) is refused in one line naming both fingerprints
    res = subprocess.run(cli(*small(f"paths.output_dir={tmp_path}", "run_name=other", "model.preset=micro_latent",
                                    "model.seed=1", f"data.urls={cache_dir}")),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    manifest = json.loads((cache_dir / MANIFEST).read_text())
    line = [ln for ln in (res.stdout + res.stderr).splitlines() if "was encoded with the VAE" in ln]
    assert line and manifest["vae_fingerprint"] in line[0] and "this run's VAE is" in line[0], res.stdout[-2000:]
    assert not (tmp_path / "other" / "checkpoints").exists()


def test_bad_cached_samples_are_skipped_and_counted(cache_dir, latent_model, tmp_path):
    import webdataset as wds

    comps = build_components(pretrained=str(latent_model))
    good = _members(sorted(cache_dir.glob("*.tar"))[0])
    key, tensors = next(iter(good.items()))
    bad_shape = {**tensors, "latent_mean": torch.zeros(4, 4, 4, dtype=torch.float16)}
    bad_dtype = {k: v.float() for k, v in tensors.items()}
    nan = {**tensors, "latent_std": torch.full_like(tensors["latent_std"], float("nan"))}
    no_latent = {"context": tensors["context"]}
    out = tmp_path / "bad"
    out.mkdir()
    with wds.TarWriter(str(out / "bad-000000.tar")) as sink:
        for i, t in enumerate([tensors, bad_shape, bad_dtype, nan, no_latent]):
            sink.write({"__key__": f"s{i}", MEMBER: save(t), "txt": b"a handwritten digit zero"})
        sink.write({"__key__": "s5", MEMBER: b"not safetensors", "txt": b"a handwritten digit zero"})
    (out / MANIFEST).write_text((cache_dir / MANIFEST).read_text())
    from data.datamodule import ShardDataModule

    dm = ShardDataModule(urls=str(out), batch_size=1, num_workers=0, resampled=False, steps_per_epoch=None,
                         shuffle_buffer=0)
    dm.set_tokenizer(comps.tokenizer)
    dm.check_model(comps)
    batches = list(dm.train_dataloader())
    assert len(batches) == 1 and batches[0]["latent_mean"].shape == (1, 4, 8, 8)
    skipped = {}
    for b in batches:
        for reason, n in b["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped["bad_tensor"] == 4 and skipped["no_tensor"] == 1


def test_module_uses_cached_latents_and_context(tiny_cfg):
    from train.build import build_module

    module = build_module(tiny_cfg("model.preset=micro_latent"))
    comps = module.components
    ids = torch.stack([torch.as_tensor(comps.tokenizer("a digit", padding="max_length",
                                                       max_length=comps.tokenizer.model_max_length).input_ids)] * 3)
    with torch.no_grad():
        context = comps.text_encoder(ids)[0]
        empty = module.encode_text(module.empty_prompt_ids(1))
    mean, std = torch.randn(3, 4, 8, 8), torch.rand(3, 4, 8, 8)
    batch = {"latent_mean": mean, "latent_std": std, "context": context, "input_ids": ids,
             "context_dropped": torch.tensor([False, True, False])}
    module.noise_generator.manual_seed(5)
    x0 = module.batch_x0(batch)
    module.noise_generator.manual_seed(5)
    noise = torch.randn(mean.shape, generator=module.noise_generator)
    torch.testing.assert_close(x0, mean + std * noise)
    ctx = module.batch_context(batch)
    torch.testing.assert_close(ctx[0], context[0])
    torch.testing.assert_close(ctx[1], empty[0])
    loss = module.method.loss(batch, module)["loss"]
    assert loss.shape == (3,) and torch.isfinite(loss).all()


def test_encode_bad_input_is_one_line(latent_model, tmp_path):
    micro = tmp_path / "pixel"
    build_components(preset="micro", resolution=16).save_pretrained(micro)
    for args, message in [(["--model", str(micro)], "has no VAE"),
                          (["--model", str(latent_model), "--vae-dtype", "fp16"], "fp16 overflows"),
                          (["--model", str(latent_model), "--part", "3/2"], "--part 3/2")]:
        res = subprocess.run([sys.executable, "-m", "train.ops.shards", "encode", ensure_digits_shards(16), "--out",
                              str(tmp_path / "x"), *args], capture_output=True, text=True, timeout=300)
        assert res.returncode != 0 and message in res.stderr.strip().splitlines()[-1], res.stderr[-1500:]
