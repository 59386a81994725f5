"""foundry-ui end to end in a real headless Chromium (Playwright): start `foundry-ui` on a temporary outputs folder,
upload ten digit images through the subject wizard, launch a short digits run from the new-run form, wait for sample
grids, open the compare view with both runs, and save a screenshot of each page.

Runs where Debian's Chromium is installed (`make test` installs it where it can: root and apt); skipped elsewhere.
FOUNDRY_UI_SCREENSHOTS=docs/ui keeps the screenshots (the README's come from here)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import cli, small
from tests.helpers import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.integration, pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (make test installs Debian's chromium)")]
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
# short runs: the micro model, a few steps, 2-step sampling, no digits evaluation
QUICK = ["model.preset=micro", "data.batch_size=4", "data.num_workers=0", "callbacks.sample_images.num_inference_steps=2",
         "callbacks.sample_images.seeds=[0,1]", "callbacks.digits_eval.enabled=false", "logger=csv",
         "trainer.log_every_n_steps=1"]
# FOUNDRY_UI_E2E_BASE=RUN: use a trained run (the demo's) as the base instead of a 4-step one, and
# FOUNDRY_UI_E2E_STEPS=N wizard steps, for screenshots that show digits rather than noise
E2E_BASE, E2E_STEPS = os.environ.get("FOUNDRY_UI_E2E_BASE"), os.environ.get("FOUNDRY_UI_E2E_STEPS", "4")
WIZARD_QUICK = [o for o in QUICK if not E2E_BASE or not o.startswith(("model.preset", "callbacks.sample_images.num"))]


def digit_pngs(folder: Path, n: int = 10) -> list[str]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    nines = d.images[d.target == 9][:n]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(nines):
        p = folder / f"nine_{i}.png"
        Image.fromarray((img * 255 / 16).astype("uint8")).resize((16, 16), Image.NEAREST).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture
def server(tmp_path):
    outputs = tmp_path / "outputs"
    if E2E_BASE:
        shutil.copytree(E2E_BASE, outputs / "digits-base", symlinks=True)
    else:
        base = subprocess.run(cli(*small(f"paths.output_dir={outputs}", "run_name=digits-base",
                                         "callbacks.digits_eval.enabled=false", "logger=csv")),
                              capture_output=True, text=True, timeout=400)
        assert base.returncode == 0, base.stderr[-2000:]
    port = free_port()
    log = open(tmp_path / "ui.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "ui.main", "--outputs", str(outputs), "--data",
                             str(tmp_path / "data"), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=Path(__file__).resolve().parents[2])
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("foundry-ui did not start: " + (tmp_path / "ui.log").read_text()[-2000:])
    yield url, tmp_path
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_wizard_run_compare_in_a_real_browser(server):
    from playwright.sync_api import expect, sync_playwright

    url, tmp = server
    shots = Path(os.environ.get("FOUNDRY_UI_SCREENSHOTS") or tmp / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    photos = digit_pngs(tmp / "photos")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(30_000)

        # the subject wizard: ten digit photos, identifier and class word, the base run from the list
        page.goto(url + "/wizard")
        page.set_input_files("input[name=photos]", photos)
        page.fill("input[name=class_word]", "digit")
        page.fill("input[name=steps]", E2E_STEPS)
        page.fill("textarea[name=extra]", "\n".join([*WIZARD_QUICK, "data.num_class_images=4",
                                                     *([] if E2E_BASE else ["data.class_generation.steps=2"])]))
        page.screenshot(path=str(shots / "wizard.png"), full_page=True)
        page.click("#train-subject")
        expect(page.locator("#wizard-result")).to_contain_text("10 photos saved", timeout=60_000)

        # a short digits run from the new-run form: checked (config + memory plan), then launched
        page.goto(url + "/new")
        page.fill("input[name=run_name]", "digits-short")
        page.fill("input[name=max_steps]", "4")
        page.fill("textarea[name=extra]", "\n".join([*QUICK, "callbacks.sample_images.every_n_steps=2"]))
        page.click("#check")
        expect(page.locator("#result")).to_contain_text("composes and validates")
        expect(page.locator("#result")).to_contain_text("fits")
        page.screenshot(path=str(shots / "new_run.png"), full_page=True)
        page.click("#launch")
        expect(page.locator("#result")).to_contain_text("queued digits-short")

        # the runs page refreshes itself: wait for both runs' sample grids
        page.goto(url + "/")
        for name in ("subject-sks-digit", "digits-short"):
            row = page.locator(f'tr.run-row[data-name^="{name}"]')
            expect(row.locator("img.thumb")).to_be_visible(timeout=300_000)
        expect(page.locator('tr.run-row[data-name="digits-short"] .state')).to_have_text("finished", timeout=120_000)
        page.screenshot(path=str(shots / "runs.png"), full_page=True)

        # the subject's run page: curves, grid slider, log, downloads
        page.click('tr.run-row[data-name^="subject-sks-digit"] a')
        expect(page.locator("#grid img")).to_be_visible()
        expect(page.locator("#log")).to_contain_text("foundry")
        expect(page.get_by_role("link", name="export/lora_kohya.safetensors")).to_be_visible()  # the wizard exported
        expect(page.get_by_role("link", name="export/pytorch_lora_weights.safetensors")).to_be_visible()
        page.screenshot(path=str(shots / "run.png"), full_page=True)

        # compare the base and the short run
        page.goto(url + "/")
        page.check('tr.run-row[data-name="digits-base"] input[type=checkbox]')
        page.check('tr.run-row[data-name="digits-short"] input[type=checkbox]')
        page.click("#compare-button")
        expect(page.locator("h1")).to_contain_text("Compare 2 runs")
        expect(page.locator(".side-by-side img")).to_have_count(2)
        expect(page.locator("#curves .main-svg").first).to_be_visible()
        page.screenshot(path=str(shots / "compare.png"), full_page=True)
        browser.close()
    assert {p.name for p in shots.glob("*.png")} >= {"wizard.png", "new_run.png", "runs.png", "run.png", "compare.png"}
