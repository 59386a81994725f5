"""foundry-report's readers and figure on files written by the real writers (Lightning's CSVLogger, PIL grids).

The end-to-end report over real training runs (W&B offline logs included) is in
tests/integration/test_cli_sweep.py, on the sweep's trials.
"""
import json

import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from models.pipeline import to_uint8_grid
from train.ops.report import ReportError, by_guidance, expand, final_loss, load_run, main, read_csv_curves, render, table


def make_run(root, name, losses, acc):
    """A run folder as foundry-train leaves it with logger=csv: metrics.csv, eval json, summary, a grid."""
    run = root / name
    logger = CSVLogger(save_dir=str(run), name="csv", version="")
    for step, loss in enumerate(losses):
        logger.log_metrics({"train/loss": loss}, step=step)
    logger.log_metrics({"val/prompt_accuracy": acc}, step=len(losses) - 1)
    logger.save()
    metrics = {"val/prompt_accuracy_g1": acc / 2, "val/prompt_accuracy_g3": acc, "val/frechet_g1": 9.0,
               "val/frechet_g3": 7.0, "val/prompt_accuracy": acc, "val/best_guidance": 3.0, "val/frechet": 7.0}
    (run / "eval").mkdir()
    (run / "eval" / f"digits_step_{len(losses):06d}.json").write_text(json.dumps(metrics))
    (run / "summary.json").write_text(json.dumps({**metrics, "global_step": len(losses)}))
    (run / "samples").mkdir()
    images = np.random.default_rng(len(name)).random((20, 16, 16, 3))
    Image.fromarray(to_uint8_grid(images, nrow=2)).save(run / "samples" / f"step_{len(losses):06d}.png")
    return run


def test_csv_curves_are_what_lightning_logged(tmp_path):
    run = make_run(tmp_path, "a", [1.0, 0.8, 0.6, 0.5], 0.4)
    curves = read_csv_curves(run / "csv" / "metrics.csv")
    assert curves["train/loss"] == [(0, 1.0), (1, 0.8), (2, 0.6), (3, 0.5)]
    assert curves["val/prompt_accuracy"] == [(3, 0.4)]


def test_report_png_and_table_from_run_folders(tmp_path, capsys):
    make_run(tmp_path / "sweep", "lr-a", list(np.linspace(1, 0.3, 40)), 0.6)
    make_run(tmp_path / "sweep", "lr-b", list(np.linspace(1, 0.5, 40)), 0.2)
    (tmp_path / "sweep" / "sweep_summary.json").write_text("{}")
    runs = [load_run(p) for p in expand([str(tmp_path / "sweep")])]
    assert [r.name for r in runs] == ["lr-a", "lr-b"] and all(r.source == "csv" for r in runs)
    assert by_guidance(runs[0].evals[-1], "val/prompt_accuracy") == [(1.0, 0.3), (3.0, 0.6)]
    assert final_loss(runs[0]) == pytest.approx(np.mean(np.linspace(1, 0.3, 40)[-4:]))
    text = table(runs, "train/loss")
    assert "| 0 | lr-a | 40 |" in text and "| 0.6 | 3 | 7 | csv |" in text
    out = tmp_path / "report.png"
    assert main([str(tmp_path / "sweep"), "--out", str(out)]) == 0
    png = Image.open(out)
    assert png.size[0] >= 1200 and png.size[1] >= 800  # curves on top, two grids below
    assert np.asarray(png.convert("L")).std() > 10  # not a blank canvas
    assert f"report: {out}" in capsys.readouterr().out


def test_runs_without_grids_still_render(tmp_path):
    run = make_run(tmp_path, "a", [1.0, 0.5], 0.3)
    for p in (run / "samples").iterdir():
        p.unlink()
    out = render([load_run(run)], tmp_path / "r.png")
    assert Image.open(out).size[1] < 800  # one row: no grid panel


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "missing", "is not a folder"),
    (lambda p: p, "holds no run files"),
])
def test_bad_paths_are_one_line(tmp_path, capsys, setup, message):
    with pytest.raises(ReportError, match=message):
        expand([str(setup(tmp_path))])
    assert main([str(setup(tmp_path)), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("foundry-report: ") and message in err and len(err.splitlines()) == 1
