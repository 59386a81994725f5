"""Dataset mixtures (`data.mixture`): weights hold within a stated tolerance, per-dataset caption templates and
dropout apply, repeats weigh by size, samples are counted per dataset through the real CLI, bad entries are refused."""
import subprocess

import pytest

from data.datamodule import ShardDataModule, build_mixture
from data.digits import write_digits_shards
from models.tiny import build_tokenizer, default_caption_corpus
from tests.conftest import cli, small


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    low = write_digits_shards(root / "low", resolution=16, maxcount=200, digits=[0, 1, 2, 3, 4])
    high = write_digits_shards(root / "high", resolution=16, maxcount=200, digits=[5, 6, 7, 8, 9])
    return root / "low", root / "high", len(low), len(high)


def _module(mixture, **kw):
    dm = ShardDataModule(mixture=mixture, batch_size=50, num_workers=0, steps_per_epoch=80, caption_dropout=0.0,
                         shuffle_buffer=50, **kw)
    dm.set_tokenizer(build_tokenizer(default_caption_corpus(), 300, 12))
    return dm


def test_mixture_weights_templates_and_dropout_hold(halves):
    low, high, _, _ = halves
    dm = _module([{"name": "low", "urls": str(low), "weight": 3},
                  {"name": "high", "urls": str(high), "weight": 1, "caption_template": "{caption}, in ink",
                   "caption_dropout": 0.5}])
    counts, dropped_high, n = {"low": 0, "high": 0}, 0, 0
    for batch in dm.train_dataloader():
        for src, meta, caption in zip(batch["sources"], batch["meta"], batch["captions"]):
            counts[src] += 1
            n += 1
            assert (meta["label"] < 5) == (src == "low")  # every sample comes from the dataset it is tagged with
            if src == "high":
                dropped_high += caption == ""
                assert caption == "" or caption.endswith(", in ink")
            else:
                assert caption and not caption.endswith(", in ink")  # the run's dropout (0) for the other
    assert n == 4000
    # 4,000 draws at p = 0.75: standard deviation 0.0068; stated tolerance 0.03 (4.4 sd)
    assert abs(counts["low"] / n - 0.75) < 0.03
    assert abs(dropped_high / counts["high"] - 0.5) < 0.08  # ~1,000 draws at p = 0.5: sd 0.016


def test_repeats_weigh_by_dataset_size_and_bad_entries_are_one_line(halves):
    from data.shards import count_samples
    from data.webdataset import expand_urls

    low, high, _, _ = halves
    n_low, n_high = count_samples(expand_urls(str(low))), count_samples(expand_urls(str(high)))
    a, b = build_mixture([{"name": "a", "urls": str(low), "repeats": 2}, {"name": "b", "urls": str(high)}])
    assert (a.weight, b.weight) == (2 * n_low, n_high)
    bad = [([{"urls": str(low), "colour": 1}], "unknown key"),
           ([{"name": "a", "urls": str(low)}, {"name": "a", "urls": str(high)}], "used twice"),
           ([{"urls": str(low), "weight": 0}], "weight must be > 0"),
           ([{"urls": str(low), "caption_template": "{subject} {caption}"}], "other than {caption}"),
           ([{"urls": str(low), "weight": 1, "repeats": 2}], "not both"),
           ([{"weight": 1}], "no urls")]
    for entries, message in bad:
        with pytest.raises(ValueError, match=message):
            build_mixture(entries)
    with pytest.raises(ValueError, match="data.mixture and data.urls are both set"):
        ShardDataModule(urls=str(low), mixture=[{"urls": str(high)}])
    dm = _module([{"urls": str(low)}], resampled=False)
    dm.setup("fit")
    with pytest.raises(ValueError, match="resampled=true"):
        dm.train_dataloader()


@pytest.mark.integration
def test_mixture_through_cli_counts_samples_per_dataset(halves, tmp_path):
    low, high, _, _ = halves
    mixture = f"data.mixture=[{{name:low,urls:'{low}',weight:3}},{{name:high,urls:'{high}',weight:1}}]"
    res = subprocess.run(cli(*small(f"paths.output_dir={tmp_path}", "run_name=mix", "logger=csv", mixture,
                                    "callbacks=none")), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    import csv

    rows = list(csv.DictReader(open(tmp_path / "mix" / "csv" / "metrics.csv")))
    last = {k: v for row in rows for k, v in row.items() if v not in ("", None)}
    assert float(last["data/samples/low"]) + float(last["data/samples/high"]) == 4 * 8  # 4 steps x batch 8
    assert float(last["data/samples/low"]) > float(last["data/samples/high"])
