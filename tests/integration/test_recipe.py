"""`foundry-recipe`: every README results row names a recipe that exists, and the cheapest chain runs end to end
from the digits world (its prerequisite made first), printing the proof script's JSON."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from train.ops.recipe import BENCH, PREREQS, RECIPES, last_json

ROOT = Path(__file__).resolve().parents[2]


def recipe_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.ops.recipe", *args], cwd=ROOT, capture_output=True,
                          text=True, **kw)


def results_rows() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| method",
                                                                                                   "| student"))]


def test_every_results_row_names_an_existing_recipe():
    rows = results_rows()
    assert len(rows) > 30
    for row in rows:
        names = re.findall(r"`foundry-recipe (\w+)", row)
        assert names, f"README results row without a recipe command: {row[:80]}"
        assert set(names) <= set(RECIPES), f"unknown recipe in {row[:80]}"


def test_every_recipe_points_at_a_proof_script():
    for name, recipe in RECIPES.items():
        assert (BENCH / recipe.script).is_file(), name
        assert recipe.needs is None or recipe.needs in PREREQS, name
        assert ("{base}" in " ".join(recipe.args)) == bool(recipe.needs), name


def test_last_json_takes_the_final_result():
    assert last_json('{\n  "a": 1\n}\nnoise\n{\n  "b": 2\n}\n') == {"b": 2}


def test_list_and_bad_names_are_one_line():
    listed = recipe_cli("list")
    assert listed.returncode == 0 and all(f"  {n} " in listed.stdout for n in RECIPES)
    bad = recipe_cli("no_such_recipe")
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "foundry-recipe list" in bad.stderr
    missing = recipe_cli("lcm", "--base", "/nonexistent/run")
    assert missing.returncode != 0 and "--base /nonexistent/run" in missing.stderr


@pytest.mark.integration
def test_the_cheapest_chain_runs_from_the_digits_world(tmp_path):
    """guidance_distill --smoke: the base made first under prereq/, then the distillation and its scores."""
    out = tmp_path / "gd"
    res = recipe_cli("guidance_distill", "--smoke", "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert (out / "prereq" / "base" / "base" / "checkpoints" / "last.ckpt").is_file()
    record = json.loads((out / "recipe.json").read_text())
    assert record["recipe"] == "guidance_distill" and record["smoke"] is True
    result = record["result"]
    assert result["benchmark"] == "distill_digits"
    assert {"prompt_accuracy", "frechet", "best_guidance"} <= set(result["teacher_ddim25"])
    assert {"train_seconds", "command", "ddim_25_steps_one_forward", "ddim_12_steps_one_forward"} <= set(
        result["guidance_distill"])
    assert result == last_json(res.stdout)  # what it printed is what it wrote
