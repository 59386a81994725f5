"""DreamBooth data: bad instance folders and prompts fail in one line; batches pair instance and class images."""
import numpy as np
import pytest
import torch
from PIL import Image

from data.dreambooth import DreamBoothDataModule, check_prompts
from models.tiny import build_preset


def tokenizer():
    return build_preset("micro", 16)[2]


def write_images(folder, n, size=(20, 24), fmt="PNG", seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.{fmt.lower()}", format=fmt)


def datamodule(tmp_path, instance_dir, **kw):
    dm = DreamBoothDataModule(instance_dir=str(instance_dir), instance_prompt=kw.pop("instance_prompt", "a sks digit"),
                              class_prompt=kw.pop("class_prompt", "a digit"), shard_dir=str(tmp_path / "db"),
                              resolution=16, batch_size=2, num_workers=0, steps_per_epoch=kw.pop("steps_per_epoch", 3),
                              shuffle_buffer=4,
                              num_class_images=kw.pop("num_class_images", 3),
                              prior_caption_dropout=kw.pop("prior_caption_dropout", 0.0), **kw)
    dm.set_tokenizer(tokenizer())
    return dm


def test_missing_or_empty_instance_folder_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.instance_dir: .* is not a folder"):
        datamodule(tmp_path, tmp_path / "nope").setup("fit")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not an image")
    with pytest.raises(ValueError, match=r"data.instance_dir: .* has no images") as err:
        datamodule(tmp_path, tmp_path / "empty").setup("fit")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("instance, klass, ident, match", [
    ("a digit", "a digit", None, "no identifier beyond data.class_prompt"),
    ("a photo of a dog", "a photo of dog", "sks", "does not contain data.identifier 'sks'"),
    ("", None, None, "data.instance_prompt is empty"),
])
def test_prompt_without_identifier_is_rejected(instance, klass, ident, match):
    with pytest.raises(ValueError, match=match):
        check_prompts(instance, klass, ident)


def test_bad_files_are_skipped_and_counted_and_huge_images_resized(tmp_path, caplog):
    inst = tmp_path / "inst"
    write_images(inst, 3)
    (inst / "readme.txt.bak").write_text("x")  # not an image: ignored with a warning
    (inst / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")  # corrupt: skipped, counted
    Image.new("RGB", (3000, 2000), (200, 10, 10)).save(inst / "huge.jpg", quality=50)  # resized like any image
    dm = datamodule(tmp_path, inst, prior_preservation=False)
    dm.setup("fit")
    assert [p.name for p in dm.ignored_files] == ["readme.txt.bak"]
    dm.prepare_data()
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixels"].shape == (2, 3, 16, 16)
    assert set(batch["captions"]) == {"a sks digit"} and "is_prior" not in batch
    assert dm.instance_skipped == {"decode": 1} and "skipped unreadable instance image(s)" in caplog.text


def test_class_images_are_generated_once_and_batches_pair_instance_with_class(tmp_path):
    from models.components import build_components

    class FakeModule:
        components = build_components(preset="micro", resolution=16)

    inst = tmp_path / "inst"
    write_images(inst, 4)
    dm = datamodule(tmp_path, inst, class_generation={"steps": 2, "batch_size": 2})
    dm.attach_model(FakeModule())
    dm.setup("fit")
    dm.prepare_data()
    class_pngs = sorted((tmp_path / "db" / "class_images").glob("*.png"))
    assert len(class_pngs) == 3
    assert (tmp_path / "db" / "class_images" / "class-000000.txt").read_text() == "a digit"
    mtimes = [p.stat().st_mtime_ns for p in class_pngs]
    dm.prepare_data()  # cached: nothing regenerated
    assert [p.stat().st_mtime_ns for p in class_pngs] == mtimes
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    b = batches[0]
    assert b["pixels"].shape[0] == 4 and b["is_prior"].tolist() == [False, False, True, True]
    assert b["captions"] == ["a sks digit", "a sks digit", "a digit", "a digit"]


def test_dreambooth_loss_weights_the_prior_half(monkeypatch):
    import train.methods.denoise as denoise
    from train.methods.dreambooth import DreamBooth

    per_sample = torch.tensor([1.0, 3.0, 10.0, 20.0])
    monkeypatch.setattr(denoise.Denoise, "loss", lambda self, batch, module: {"loss": per_sample.clone()})
    out = DreamBooth(prior_loss_weight=0.5).loss({"is_prior": torch.tensor([False, False, True, True])}, None)
    # the loop's one reduction (mean) gives instance mean + weight * class mean: 2 + 0.5 * 15
    assert out["loss"].mean().item() == pytest.approx(2.0 + 0.5 * 15.0)
    assert out["instance_loss"].item() == pytest.approx(2.0) and out["prior_loss"].item() == pytest.approx(15.0)
    only_class = DreamBooth(prior_loss_weight=0.5).loss({"is_prior": torch.ones(4, dtype=torch.bool)}, None)
    assert only_class["loss"].mean().item() == pytest.approx(0.5 * 8.5)  # no division by zero instance rows


def test_several_class_prompts_caption_each_class_image_with_its_own(tmp_path):
    """Prior preservation over several prompts (e.g. every digit a user relies on): class images are generated
    round-robin over them and each keeps its own caption in the class batches."""
    from models.components import build_components

    class FakeModule:
        components = build_components(preset="micro", resolution=16)

    inst = tmp_path / "inst"
    write_images(inst, 3)
    prompts = ["a digit one", "a digit two"]
    dm = datamodule(tmp_path, inst, class_prompt=prompts, num_class_images=4,
                    class_generation={"steps": 2, "batch_size": 4})
    dm.attach_model(FakeModule())
    dm.setup("fit")
    dm.prepare_data()
    captions = [(tmp_path / "db" / "class_images" / f"class-{i:06d}.txt").read_text() for i in range(4)]
    assert captions == ["a digit one", "a digit two", "a digit one", "a digit two"]
    seen = {c for b in dm.train_dataloader() for c, prior in zip(b["captions"], b["is_prior"]) if prior}
    assert seen <= set(prompts) and seen
    with pytest.raises(ValueError, match="no identifier beyond data.class_prompt 'a sks digit'"):
        check_prompts("a sks digit", ["a digit", "a sks digit"], None)


def test_prior_caption_dropout_blanks_only_class_captions(tmp_path):
    """Class images train the empty prompt at `prior_caption_dropout`, so guidance's unconditional branch stays the
    base's; instance images always keep their prompt."""
    inst, klass = tmp_path / "inst", tmp_path / "class"
    write_images(inst, 4)
    write_images(klass, 6, seed=1)
    dm = datamodule(tmp_path, inst, class_dir=str(klass), num_class_images=6, prior_caption_dropout=0.5,
                    caption_dropout=0.0,
                    steps_per_epoch=40)
    dm.setup("fit")
    dm.prepare_data()
    pairs = [(c, p) for b in dm.train_dataloader() for c, p in zip(b["captions"], b["is_prior"].tolist())]
    instance = [c for c, p in pairs if not p]
    prior = [c for c, p in pairs if p]
    assert instance and all(c == "a sks digit" for c in instance)
    assert set(prior) == {"", "a digit"} and 0.3 < prior.count("") / len(prior) < 0.7
    with pytest.raises(ValueError, match="data.prior_caption_dropout=1.5"):
        datamodule(tmp_path, inst, prior_caption_dropout=1.5)
