"""foundry-ui's API through an in-process client: every action, bad input included (a config the composer rejects,
an upload that is not an image, a path outside the outputs, a stop for a finished run), the token and host guards,
and the job queue running a real foundry-train through its worker and surviving a restart."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import cli, small
from ui.app import create_app
from ui.jobs import JobQueue
from ui.main import main as ui_main
from ui.runs import queued_row, summary_row

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real 4-step run of the micro model: status.json, checkpoints, sample grids, metrics CSV."""
    out = tmp_path_factory.mktemp("ui-runs")
    res = subprocess.run(cli(*small(f"paths.output_dir={out}", "run_name=first", "callbacks.digits_eval.enabled=false",
                                    "logger=csv")), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    return out / "first"


@pytest.fixture
def ui(tmp_path, finished_run):
    outputs = tmp_path / "outputs"
    shutil.copytree(finished_run, outputs / "first", symlinks=True)
    app = create_app([outputs], tmp_path / "data", start_worker=False)
    with TestClient(app) as client:
        client.outputs, client.data, client.queue = outputs, tmp_path / "data", app.state.queue
        yield client


def png(value: int = 128, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, format="PNG")
    return buf.getvalue()


def test_runs_list_detail_log_grid_and_files(ui):
    rows = ui.get("/api/runs").json()
    assert [r["id"] for r in rows] == ["0/first"]
    row = rows[0]
    assert row["state"] == "finished" and row["step"] == 4 and row["progress"] == 1.0 and row["last_grid"]
    detail = ui.get("/api/run", params={"id": "0/first"}).json()
    assert "train/loss" in detail["curves"] and detail["grids"] and detail["config"]["run_name"] == "first"
    assert "checkpoints/last.ckpt" in detail["downloads"]
    assert "run summary" in ui.get("/api/run/log", params={"id": "0/first"}).text
    grid = ui.get("/files", params={"id": "0/first", "path": f"samples/{row['last_grid']}"})
    assert grid.status_code == 200 and grid.content[:4] == b"\x89PNG"
    for page in ("/", "/run?id=0/first", "/compare", "/new", "/wizard", "/partials/runs",
                 "/partials/grid?id=0/first&i=0"):
        assert ui.get(page).status_code == 200, page
    assert ui.get("/plotly.min.js").status_code == 200


@pytest.mark.parametrize("params", [{"id": "0/first", "path": "../../../etc/passwd"},
                                    {"id": "0/first", "path": "/etc/passwd"},
                                    {"id": "0/../../..", "path": "etc/passwd"},
                                    {"id": "7/first", "path": "main.log"},
                                    {"id": "0/first", "path": "no/such/file"}])
def test_file_serving_cannot_leave_the_run_folders(ui, params):
    res = ui.get("/files", params=params)
    assert res.status_code == 404 and "error" in res.json()


def test_a_symlinked_run_folder_is_not_listed_and_breaks_nothing(ui, tmp_path):
    shutil.copytree(ui.outputs / "first", tmp_path / "elsewhere", symlinks=True)
    os.symlink(tmp_path / "elsewhere", ui.outputs / "linked")
    assert [r["id"] for r in ui.get("/api/runs").json()] == ["0/first"]
    assert ui.get("/").status_code == 200


def test_a_symlink_out_of_a_run_is_not_followed(ui, tmp_path):
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", ui.outputs / "first" / "leak.txt")
    res = ui.get("/files", params={"id": "0/first", "path": "leak.txt"})
    assert res.status_code == 404 and "secret" not in res.text


def test_stop_a_finished_run_is_refused_and_a_running_one_gets_sigterm(ui):
    res = ui.post("/api/run/stop", params={"id": "0/first"})
    assert res.status_code == 409 and "finished" in res.json()["error"]
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        status = ui.outputs / "first" / "status.json"
        status.write_text(json.dumps({**json.loads(status.read_text()), "state": "running", "pid": proc.pid}))
        assert ui.get("/api/runs").json()[0]["state"] == "running"
        assert ui.post("/api/run/stop", params={"id": "0/first"}).status_code == 200
        assert proc.wait(timeout=10) == -signal.SIGTERM
        assert ui.get("/api/runs").json()[0]["state"] == "interrupted"  # its pid is gone: resumable
    finally:
        proc.kill()


def test_a_run_on_another_host_or_with_a_bad_pid_is_not_signalled(ui):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        status = ui.outputs / "first" / "status.json"
        for bad in ({"host": "other-node", "pid": proc.pid}, {"pid": "abc"}, {"pid": -1}, {"pid": 1}):
            status.write_text(json.dumps({"state": "running", "host": __import__("socket").gethostname(), **bad}))
            assert ui.post("/api/run/stop", params={"id": "0/first"}).status_code == 409, bad
        assert proc.poll() is None  # nothing was signalled
    finally:
        proc.kill()


def test_resume_and_export_queue_the_projects_own_commands(ui):
    assert ui.post("/api/run/resume", params={"id": "0/first"}).status_code == 409  # finished runs don't resume
    status = ui.outputs / "first" / "status.json"
    status.write_text(json.dumps({**json.loads(status.read_text()), "state": "preempted"}))
    job = ui.post("/api/run/resume", params={"id": "0/first"}).json()["job"]
    argv = job["steps"][0]
    assert argv[0] == "foundry-train" and f"paths.output_dir={ui.outputs}" in argv and "run_name=first" in argv
    assert "model.preset=micro" in argv  # the run's own overrides, from .hydra/overrides.yaml
    export = ui.post("/api/run/export", params={"id": "0/first"}).json()["job"]
    assert export["steps"][0][:2] == ["foundry-export", str(ui.outputs / "first")]


def test_check_rejects_what_the_composer_rejects_and_plans_what_it_accepts(ui):
    bad = ui.post("/api/check", data={"extra": "trainer.max_steps=abc"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("foundry-train: trainer.max_steps")
    unknown = ui.post("/api/check", data={"extra": "no_such_group.key=1"})
    assert unknown.status_code == 400 and "\n" not in unknown.json()["error"]
    for line in ("paths.output_dir=/", "hydra.run.dir=/tmp", "not an override", "launcher.python=/bin/sh",
                 "+callbacks.p._target_=shutil.copyfile", "callbacks.ema._target_=builtins.print",
                 "logger.save_dir=/tmp/elsewhere", "data.class_dir=/tmp/x", "ckpt_path=/tmp/evil.ckpt",
                 "data.urls=pipe:curl evil.example", "optimizer.lr=${oc.env:HOME}", "~callbacks.ema"):
        res = ui.post("/api/check", data={"extra": line})
        assert res.status_code == 400, line
    assert ui.post("/api/check", data={"data_urls": "pipe:sh -c id"}).status_code == 400  # form fields too
    needs = ui.post("/api/check", data={"experiment": "lcm"})  # a teacher is required: the CLI's making hint
    assert needs.status_code == 400 and "method.teacher" in needs.json()["error"]
    ok = ui.post("/api/check", data={"extra": "model.preset=micro", "max_steps": "10"}).json()
    assert ok["ok"] and ok["plan"]["fits"] is True and any("warming up over 1 step" in n for n in ok["notes"])
    fragment = ui.post("/api/check", data={"extra": "trainer.max_steps=abc"}, headers={"HX-Request": "true"})
    assert fragment.status_code == 400 and 'class="error"' in fragment.text


def test_launch_queues_a_run_and_refuses_a_taken_name(ui):
    res = ui.post("/api/launch", data={"run_name": "second", "extra": "model.preset=micro", "max_steps": "4"})
    job = res.json()["job"]
    assert job["state"] == "queued" and job["steps"][0][-1] == "run_name=second"
    assert any(r["name"] == "second" and r["state"] == "queued" for r in ui.get("/api/runs").json())
    assert ui.get("/").status_code == 200 and ui.get("/partials/runs").status_code == 200  # a queued row renders
    assert ui.post("/api/launch", data={"run_name": "first"}).status_code == 409
    assert ui.post("/api/launch", data={"run_name": "second"}).status_code == 409  # already queued
    assert ui.post("/api/launch", data={"experiment": "../../etc"}).status_code == 400
    assert ui.post("/api/launch", data={"output": "/tmp"}).status_code == 400  # only the served output folders


def test_uploads_check_every_file_before_writing(ui):
    files = [("files", ("a.png", png(), "image/png")), ("files", ("a.txt", b"a handwritten digit one", "text/plain")),
             ("files", ("evil.png", b"#!/bin/sh\nrm -rf /", "image/png"))]
    res = ui.post("/api/upload", data={"name": "mine"}, files=files)
    assert res.status_code == 400 and "evil.png" in res.json()["error"]
    assert not (ui.data / "uploads" / "mine").exists()  # nothing written
    res = ui.post("/api/upload", data={"name": "../../escape"}, files=files[:2])
    assert res.status_code == 200
    written = sorted(p.name for p in (ui.data / "uploads").rglob("*") if p.is_file())
    assert written == ["a.png", "a.txt"] and (ui.data / "uploads" / "escape").is_dir()
    assert res.json()["job"]["steps"][0][:2] == ["foundry-shards", "folder"]
    assert ui.post("/api/upload", data={"name": "escape"}, files=files[:2]).status_code == 409
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # 48 KB that decodes to 400 M pixels
    res = ui.post("/api/upload", data={"name": "bomb"}, files=[("files", ("b.png", bomb.getvalue(), "image/png"))])
    assert res.status_code == 400 and "b.png" in res.json()["error"]


def test_wizard_validates_photos_words_and_base(ui):
    photos = [("photos", (f"{i}.png", png(40 * i), "image/png")) for i in range(1, 4)]
    form = {"identifier": "sks", "class_word": "digit", "base": "0/first", "steps": "8"}
    assert ui.post("/api/wizard", data=form, files=photos[:2]).status_code == 400  # 3 photos at least
    not_image = [*photos, ("photos", ("cv.pdf", b"%PDF-1.4", "application/pdf"))]
    assert "cv.pdf" in ui.post("/api/wizard", data=form, files=not_image).json()["error"]
    assert ui.post("/api/wizard", data={**form, "identifier": "a b;rm"}, files=photos).status_code == 400
    assert ui.post("/api/wizard", data={**form, "base": "/etc"}, files=photos).status_code == 400
    assert ui.post("/api/wizard", data={**form, "base": "0/../x"}, files=photos).status_code == 404
    res = ui.post("/api/wizard", data=form, files=photos)
    assert res.status_code == 200, res.text
    argv = res.json()["job"]["steps"][0]
    assert "experiment=dreambooth_lora" in argv and "data.instance_prompt='a photo of sks digit'" in argv
    assert len(list((ui.data / "subjects").rglob("*.png"))) == 3
    export = res.json()["job"]["steps"][1]  # then the LoRA (diffusers and kohya files) to download
    assert export[0] == "foundry-export" and export[2].endswith("/export")


def test_jobs_cancel_and_conflicts(ui):
    job = ui.post("/api/launch", data={"run_name": "third"}).json()["job"]
    assert ui.post(f"/api/jobs/{job['id']}/cancel").json()["job"]["state"] == "cancelled"
    assert ui.post(f"/api/jobs/{job['id']}/cancel").status_code == 409
    assert ui.post("/api/jobs/999/cancel").status_code == 404
    assert [j["id"] for j in ui.get("/api/jobs").json()] == [job["id"]]


def test_compare_needs_two_runs_and_shows_differences(ui):
    shutil.copytree(ui.outputs / "first", ui.outputs / "sweep" / "other", symlinks=True)
    cfg = ui.outputs / "sweep" / "other" / "config.resolved.yaml"
    cfg.write_text(cfg.read_text().replace("max_steps: 4", "max_steps: 5"))
    assert ui.get("/api/compare", params={"id": "0/first"}).status_code == 400
    data = ui.get("/api/compare", params=[("id", "0/first"), ("id", "0/sweep/other")]).json()
    assert [d["key"] for d in data["diff"]] == ["trainer.max_steps"] and data["common_steps"]
    assert data["curves"]["0/first"]
    two = [("id", "0/first"), ("id", "0/sweep/other")]
    assert ui.get("/compare", params=[*two, ("step", str(data["common_steps"][0]))]).status_code == 200
    assert ui.get("/compare", params=[*two, ("step", "12345")]).status_code == 400  # no grid there in both
    assert ui.get("/compare", params=[("id", "0/first"), ("id", "0/sweep/other")]).status_code == 200


def test_token_host_and_origin_guards(tmp_path, finished_run):
    app = create_app([tmp_path / "o"], tmp_path / "d", token="s3cret", start_worker=False)
    with TestClient(app) as c:
        assert c.get("/api/runs").status_code == 401
        assert c.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        first = c.get("/?token=s3cret", follow_redirects=False)
        assert first.status_code == 303 and "foundry_token" in first.headers["set-cookie"]
        assert c.get("/api/runs").status_code == 200  # the cookie now carries it
        assert c.get("/api/runs", headers={"host": "evil.example"}).status_code == 400  # DNS rebinding
        assert c.post("/api/launch", headers={"origin": "http://evil.example"}).status_code == 403
        assert c.post("/api/launch", headers={"sec-fetch-site": "cross-site"}).status_code == 403
    with pytest.raises(SystemExit, match="set a token"):
        ui_main(["--host", "0.0.0.0", "--outputs", str(tmp_path / "o")])


def test_the_queue_runs_a_real_run_and_survives_a_restart(tmp_path):
    db, out = tmp_path / "q.sqlite", tmp_path / "out"
    q = JobQueue(db, tmp_path / "logs")
    with pytest.raises(ValueError, match="not a command foundry-ui runs"):
        q.submit("x", "x", [["bash", "-c", "echo hi"]])
    argv = ["foundry-train", *small(f"paths.output_dir={out}", "run_name=queued", "callbacks=none", "logger=none")]
    job = q.submit("train", "queued", [argv], out / "queued")
    waiting = q.submit("train", "second", [["foundry-train", "trainer.max_steps=abc"]])
    q.tick()
    assert q.get(job["id"])["state"] == "running" and q.get(waiting["id"])["state"] == "queued"  # one slot
    deadline = time.time() + 300
    while q.get(job["id"])["state"] == "running" and time.time() < deadline:
        time.sleep(0.5)
        q.tick()
    assert q.get(job["id"])["state"] == "done", (out / "queued" / "launch.log").read_text()[-2000:]
    assert json.loads((out / "queued" / "status.json").read_text())["state"] == "finished"
    q.tick()
    assert q.get(waiting["id"])["state"] == "running"
    pid = q.get(waiting["id"])["pid"]
    q.close()  # the app stops while a job runs; its process is then killed
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it had already failed on its bad override
    time.sleep(0.5)
    again = JobQueue(db, tmp_path / "logs")
    again.recover()
    assert again.get(waiting["id"])["state"] == "interrupted" and again.get(job["id"])["state"] == "done"
    again.close()


def test_a_queued_row_has_every_key_of_a_run_row(ui):
    row = summary_row(ui.app.state.roots, ui.outputs / "first")
    assert set(queued_row(ui.outputs / "x", {"state": "queued", "id": 1, "created": 0.0})) == set(row) | {"job"}


def test_slurm_jobs_render_the_launchers_script_then_sbatch_it(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho submitted \"$1\" > {tmp_path}/sbatch.txt\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    outputs = tmp_path / "o"
    with TestClient(create_app([outputs], tmp_path / "d", start_worker=False)) as plain:
        assert plain.post("/api/launch", data={"run_name": "s", "launcher": "slurm"}).status_code == 400
    app = create_app([outputs], tmp_path / "d2", slurm=True, start_worker=False)
    with TestClient(app) as c:
        job = c.post("/api/launch", data={"run_name": "s", "launcher": "slurm", "extra": "model.preset=micro"}).json()
        steps = job["job"]["steps"]
        assert "launcher.dry_run=true" in steps[0] and steps[1] == ["sbatch", str(outputs.resolve() / "s" /
                                                                                   "launch.sbatch")]
        q = app.state.queue
        deadline = time.time() + 200
        while q.get(job["job"]["id"])["state"] in ("queued", "running") and time.time() < deadline:
            q.tick()
            time.sleep(0.5)
        assert q.get(job["job"]["id"])["state"] == "done", Path(q.get(job["job"]["id"])["log"]).read_text()[-2000:]
        assert (tmp_path / "sbatch.txt").read_text().startswith("submitted ")
        assert (outputs / "s" / "launch.sbatch").is_file()
