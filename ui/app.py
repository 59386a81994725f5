"""foundry-ui's web app: FastAPI routes over the files and commands the CLI uses (ui/runs.py reads runs, ui/jobs.py
queues the project's own CLIs, ui/forms.py checks what a browser sends). Pages are server-rendered Jinja2 with htmx
for the live parts (run list, log tail, grid slider, validation); charts are Plotly figures built here and drawn by
plotly.js served from the installed plotly package. Every action is also a JSON endpoint under /api.

Why these: FastAPI/Starlette give routing, multipart uploads, trusted-host checks and an in-process test client;
htmx keeps the pages server-rendered (no front-end build step on a training box); Plotly is a maintained chart
library whose JavaScript ships inside its Python wheel, so the app works with no network. Gradio was the other
candidate: its components fit a demo better than a run list with a job queue, and it pulls a much larger stack.
"""
from __future__ import annotations

import hmac
import json
import os
import secrets
import signal
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import plotly
from fastapi import FastAPI, Form, Request, UploadFile
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.middleware.trustedhost import TrustedHostMiddleware

from train.ops.listing import first_comment, model_presets
from train.ops.resolvers import CONF_DIR
from ui import forms, runs, views
from ui.jobs import Conflict, JobQueue

HERE = Path(__file__).resolve().parent
MAX_REQUEST_BYTES = 512 * 2**20
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
TOKEN_COOKIE = "foundry_token"


def create_app(outputs: list[Path], data_dir: Path, *, token: str | None = None, db: Path | None = None,
               slots: list[str] | None = None, slurm: bool = False, allowed_hosts: list[str] | None = None,
               start_worker: bool = True) -> FastAPI:
    roots = runs.Roots.of(outputs)
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    queue = JobQueue(db or data_dir / "foundry-ui.sqlite", data_dir / "job-logs", slots, slurm=slurm)
    app = FastAPI(title="foundry-ui", docs_url="/api/docs", redoc_url=None)
    app.state.roots, app.state.queue, app.state.data_dir = roots, queue, data_dir
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(age=runs.age, clock=views.clock)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    if start_worker:
        @app.on_event("startup")
        def _start() -> None:
            queue.start()

        @app.on_event("shutdown")
        def _stop() -> None:
            queue.close()

    # -- guards ------------------------------------------------------------------------------------------------------
    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length") or "0"
        if not length.isdigit():
            return JSONResponse({"error": "Content-Length must be a number of bytes"}, 400)
        if int(length) > MAX_REQUEST_BYTES:
            return JSONResponse({"error": f"request larger than {MAX_REQUEST_BYTES // 2**20} MiB"}, 413)
        if request.method not in ("GET", "HEAD", "OPTIONS"):  # a page on another site cannot post here
            origin = request.headers.get("origin")
            if (origin and urlsplit(origin).netloc != request.headers.get("host")) or \
                    request.headers.get("sec-fetch-site") == "cross-site":
                return JSONResponse({"error": f"cross-origin request from {origin or 'another site'} refused"}, 403)
        if token:
            given = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or \
                request.headers.get("authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"error": "token required: open the address foundry-ui printed (…/?token=…) "
                                              "or send Authorization: Bearer <token>"}, 401)
            if request.query_params.get("token"):
                response = RedirectResponse(str(request.url.remove_query_params("token")), 303)
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
                return response
        return await call_next(request)

    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["127.0.0.1", "localhost", "testserver"])

    @app.exception_handler(forms.BadInput)
    async def _bad(request: Request, err: forms.BadInput):
        return _error(request, str(err), 400)

    @app.exception_handler(runs.NotFound)
    async def _missing(request: Request, err: runs.NotFound):
        return _error(request, str(err), 404)

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, err: Conflict):
        return _error(request, str(err), 409)

    def _error(request: Request, message: str, status: int):
        if request.headers.get("hx-request"):
            return HTMLResponse(f'<div class="error" role="alert">{views.esc(message)}</div>', status)
        return JSONResponse({"error": message}, status)

    def page(request: Request, name: str, **ctx) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"token_on": bool(token), **ctx})

    def reply(request: Request, data: dict, fragment: str | None = None, status: int = 200):
        if fragment and request.headers.get("hx-request"):
            return templates.TemplateResponse(request, fragment, data, status_code=status)
        return JSONResponse(json.loads(json.dumps(data, default=str)), status)

    def run_rows() -> list[dict]:
        rows = [runs.summary_row(roots, r) for r in runs.discover(roots)]
        active = queue.active_run_dirs()
        known = {r["path"] for r in rows}
        for run_dir, job in active.items():  # queued runs have no folder of run files yet
            if run_dir not in known:
                rows.insert(0, runs.queued_row(Path(run_dir), job))
        return rows

    async def read_uploads(files: list[UploadFile] | None) -> list[forms.Upload]:
        """Each file read to at most its limit + 1 byte (save_uploads names the one over it); the total bounded too."""
        out, total = [], 0
        for f in files or []:
            data = await f.read(forms.MAX_FILE_BYTES + 1)
            total += len(data)
            if total > forms.MAX_REQUEST_FILE_BYTES:
                raise forms.BadInput(f"uploads larger than {forms.MAX_REQUEST_FILE_BYTES // 2**20} MiB in one request; "
                                     "upload in parts")
            out.append(forms.Upload(f.filename or "", data))
        return out

    # -- runs ----------------------------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def index(request: Request):
        return page(request, "runs.html", rows=run_rows(), jobs=queue.jobs(20))

    @app.get("/partials/runs", response_class=HTMLResponse)
    def runs_partial(request: Request):
        return templates.TemplateResponse(request, "_runs_table.html", {"rows": run_rows()})

    @app.get("/partials/jobs", response_class=HTMLResponse)
    def jobs_partial(request: Request):
        return templates.TemplateResponse(request, "_jobs_table.html", {"jobs": queue.jobs(20)})

    @app.get("/api/runs")
    def api_runs():
        return run_rows()

    @app.get("/api/run")
    def api_run(id: str):
        return json.loads(json.dumps(runs.detail(roots, runs.resolve_run(roots, id)), default=str))

    @app.get("/run", response_class=HTMLResponse)
    def run_page(request: Request, id: str):
        d = runs.detail(roots, runs.resolve_run(roots, id))
        return page(request, "run.html", run=d, figure=views.curves_figure([d]), metric_names=sorted(d["curves"]))

    @app.get("/api/run/log", response_class=HTMLResponse)
    def run_log(id: str, lines: int = 200):
        return HTMLResponse(views.esc(runs.log_tail(runs.resolve_run(roots, id), max(1, min(lines, 5000)))))

    @app.get("/partials/grid", response_class=HTMLResponse)
    def grid_partial(request: Request, id: str, i: int = -1):
        g = runs.grids(runs.resolve_run(roots, id))
        if not g:
            return HTMLResponse('<p class="muted">no sample grid yet</p>')
        step, name = g[max(-len(g), min(i, len(g) - 1))]
        return templates.TemplateResponse(request, "_grid.html", {"id": id, "step": step, "name": name})

    @app.get("/files")
    def files(id: str, path: str):
        run = runs.resolve_run(roots, id)
        target = runs.inside(run, path)
        if not target.is_file():
            raise runs.NotFound(f"no file '{path}' in run '{id}'")
        return FileResponse(target, filename=target.name if target.suffix != ".png" else None)

    @app.post("/api/run/stop")
    def stop(request: Request, id: str):
        run = runs.resolve_run(roots, id)
        status = runs.read_status(run)
        state = runs.run_state(run, status)
        if state != "running":
            raise Conflict(f"run '{id}' is {state}, not running; only a running run can be stopped")
        pid, host = status.get("pid"), status.get("host")
        if host != socket.gethostname() or not isinstance(pid, int) or pid <= 1:
            raise Conflict(f"run '{id}' runs on {host or 'an unknown host'} (pid {pid}); stop it there")
        os.kill(pid, signal.SIGTERM)  # foundry-train saves a checkpoint, then exits (preempted)
        return reply(request, {"message": f"stopping {run.name}: it saves a checkpoint, then exits; resume "
                                          "continues from it", "pid": status["pid"]}, "_message.html")

    @app.post("/api/run/resume")
    def resume(request: Request, id: str):
        run = runs.resolve_run(roots, id)
        state = runs.run_state(run)
        if state in ("running", "finishing"):
            raise Conflict(f"run '{id}' is {state}; stop it first")
        if state == "finished":
            raise Conflict(f"run '{id}' finished; nothing to resume (train longer with a new run, or from the command "
                           "line with a larger trainer.max_steps)")
        if not runs.resumable(run):
            raise Conflict(f"run '{id}' has no checkpoint to resume from (checkpoints/last.ckpt)")
        overrides = views.run_overrides(run)
        job = queue.submit("resume", f"resume {run.name}", [["foundry-train", *overrides]], run)
        return reply(request, {"message": f"queued: resume {run.name} (job {job['id']})", "job": job},
                     "_message.html")

    @app.post("/api/run/export")
    def export(request: Request, id: str, merge: bool = False):
        run = runs.resolve_run(roots, id)
        if not runs.resumable(run):
            raise Conflict(f"run '{id}' has no checkpoint to export (checkpoints/last.ckpt)")
        step = ["foundry-export", str(run), str(run / ("export-merged" if merge else "export")),
                *(["--merge"] if merge else [])]
        job = queue.submit("export", f"export {run.name}", [step])
        return reply(request, {"message": f"queued: export of {run.name} into {step[2]} (job {job['id']})",
                               "job": job}, "_message.html")

    # -- compare -------------------------------------------------------------------------------------------------------
    def compare_data(ids: list[str], metric: str, step: int | None = None) -> dict:
        if len(ids) < 2:
            raise forms.BadInput("compare needs two or more runs: /compare?id=RUN_A&id=RUN_B")
        paths = [runs.resolve_run(roots, i) for i in ids]
        details = [runs.detail(roots, p) for p in paths]
        steps = sorted(set.intersection(*[{s for s, _ in d["grids"]} for d in details]))
        if step is not None and step not in steps:
            raise forms.BadInput(f"step {step} has no sample grid in every run; the steps they share: {steps}")
        at = step if step is not None else (steps[-1] if steps else None)
        return {"runs": details, "metric": metric, "common_steps": steps, "step": at,
                "diff": runs.config_diff(paths), "figure": views.curves_figure(details, metric)}

    @app.get("/api/compare")
    def api_compare(request: Request):
        data = compare_data(request.query_params.getlist("id"), request.query_params.get("metric", "train/loss"))
        return {"runs": [d["id"] for d in data["runs"]], "metric": data["metric"],
                "common_steps": data["common_steps"], "diff": data["diff"],
                "curves": {d["id"]: d["curves"].get(data["metric"], []) for d in data["runs"]}}

    @app.get("/compare", response_class=HTMLResponse)
    def compare_page(request: Request):
        ids = request.query_params.getlist("id")
        if len(ids) < 2:
            return page(request, "compare_pick.html", rows=[r for r in run_rows() if r["id"]])
        step = request.query_params.get("step")
        data = compare_data(ids, request.query_params.get("metric", "train/loss"),
                            int(step) if step and step.isdigit() else None)
        names = sorted(set().union(*[d["curves"] for d in data["runs"]]))
        return page(request, "compare.html", **data, metric_names=names, ids=ids)

    # -- new runs ------------------------------------------------------------------------------------------------------
    def experiments() -> list[tuple[str, str]]:
        return [(p.stem, first_comment(p)) for p in sorted((Path(CONF_DIR) / "experiment").glob("*.yaml"))]

    @app.get("/new", response_class=HTMLResponse)
    def new_page(request: Request):
        return page(request, "new.html", experiments=experiments(), outputs=[str(p) for p in roots.paths],
                    slurm=slurm, presets=model_presets())

    def form_overrides(experiment: str, pretrained: str, preset: str, data_urls: str, max_steps: str,
                       batch_size: str, lr: str, extra: str) -> list[str]:
        out = []
        if experiment and experiment != "default":
            if experiment not in dict(experiments()):
                raise forms.BadInput(f"experiment '{experiment}' is not in conf/experiment/; pick one from the list")
            out.append(f"experiment={experiment}")
        for key, value in (("model.pretrained", pretrained), ("model.preset", preset), ("data.urls", data_urls),
                           ("trainer.max_steps", max_steps), ("data.batch_size", batch_size),
                           ("optimizer.lr", lr)):
            if value and value.strip():
                out.append(forms.check_override(f"{key}={value.strip()}"))
        return out + forms.parse_overrides(extra)

    async def checked_form(request: Request) -> tuple[forms.Checked, dict]:
        f = await request.form()
        fields = {k: str(f.get(k, "")) for k in ("experiment", "pretrained", "preset", "data_urls", "max_steps",
                                                 "batch_size", "lr", "extra", "run_name", "output", "launcher")}
        overrides = form_overrides(*(fields[k] for k in ("experiment", "pretrained", "preset", "data_urls",
                                                         "max_steps", "batch_size", "lr", "extra")))
        return forms.check_config(overrides), fields

    @app.post("/api/check")
    async def check(request: Request):
        checked, _ = await checked_form(request)
        verdict = forms.plan_verdict(checked.cfg)
        return reply(request, {"ok": True, "overrides": checked.overrides, "notes": checked.notes, "plan": verdict},
                     "_check.html")

    @app.post("/api/launch")
    async def launch(request: Request):
        checked, fields = await checked_form(request)
        output = views.output_root(roots, fields["output"])
        name = forms.safe_name(fields["run_name"] or f"ui-{time.strftime('%Y%m%d-%H%M%S')}", "run name")
        run_dir = output / name
        if (run_dir / "status.json").exists() or (run_dir / "summary.json").exists() or \
                str(run_dir) in queue.active_run_dirs():
            raise Conflict(f"a run named '{name}' already exists in {output}; pick another name (or resume it)")
        argv = ["foundry-train", *checked.overrides, f"paths.output_dir={output}", f"run_name={name}"]
        steps = [argv]
        if fields["launcher"] == "slurm":  # the launcher renders the sbatch script, then the queue submits it
            if not slurm:
                raise forms.BadInput("launcher=slurm: start foundry-ui with --slurm to submit to SLURM")
            steps = [[*argv[:-2], "launcher=slurm", "launcher.dry_run=true", *argv[-2:]],
                     ["sbatch", str(run_dir / "launch.sbatch")]]
        job = queue.submit("slurm" if len(steps) > 1 else "train", name, steps, run_dir)
        return reply(request, {"message": f"queued {name} (job {job['id']})", "job": job, "notes": checked.notes},
                     "_message.html")

    @app.post("/api/upload")
    async def upload(request: Request, name: str = Form(...), files: list[UploadFile] | None = None):
        folder = forms.safe_name(name, "data set name")
        images = data_dir / "uploads" / folder
        if images.exists():
            raise Conflict(f"a data set named '{folder}' exists in {data_dir / 'uploads'}; pick another name")
        ups = await read_uploads(files)
        forms.save_uploads(ups, images, captions=True)
        shards = data_dir / "shards" / folder
        job = queue.submit("shards", f"shards {folder}", [["foundry-shards", "folder", str(images), "--out",
                                                           str(shards)]])
        return reply(request, {"message": f"{len(ups)} files saved; writing shards to {shards} (job {job['id']}); "
                                          f"then train with data.urls={shards}", "job": job, "shards": str(shards)},
                     "_message.html")

    # -- subject wizard -----------------------------------------------------------------------------------------------
    @app.get("/wizard", response_class=HTMLResponse)
    def wizard_page(request: Request):
        return page(request, "wizard.html", rows=[r for r in run_rows() if r["id"] and r["state"] == "finished"])

    @app.post("/api/wizard")
    async def wizard(request: Request, identifier: str = Form("sks"), class_word: str = Form(...),
                     base: str = Form(...), steps: int = Form(400), extra: str = Form(""),
                     photos: list[UploadFile] | None = None):
        base_path = views.base_model(roots, base)
        if not 1 <= steps <= 100_000:
            raise forms.BadInput(f"steps={steps}: give 1 to 100000 training steps")
        name = forms.safe_name(f"subject-{identifier}-{class_word}-{time.strftime('%Y%m%d-%H%M%S')}-"
                               f"{secrets.token_hex(2)}", "run name")
        ups = await read_uploads(photos)
        instance = data_dir / "subjects" / name
        overrides = forms.wizard_command(base=str(base_path), instance_dir=instance, identifier=identifier,
                                         class_word=class_word, run_name=name, steps=steps,
                                         extra=forms.parse_overrides(extra))
        forms.check_config(overrides[:-1])  # the composer's verdict before any photo is written
        forms.save_uploads(ups, instance, captions=False, min_images=3, max_images=30)
        output = roots.paths[0]
        run_dir = output / name
        job = queue.submit("wizard", name, [["foundry-train", *overrides, f"paths.output_dir={output}"],
                                            ["foundry-export", str(run_dir), str(run_dir / "export")]], run_dir)
        return reply(request, {"message": f"{len(ups)} photos saved; training {name} (job {job['id']})",
                               "job": job, "run_id": roots.run_id(output / name)}, "_message.html")

    # -- jobs ----------------------------------------------------------------------------------------------------------
    @app.get("/api/jobs")
    def api_jobs():
        return queue.jobs()

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(request: Request, job_id: int):
        try:
            job = queue.cancel(job_id)
        except LookupError as err:
            raise runs.NotFound(str(err)) from None
        return reply(request, {"message": f"job {job_id}: {job['state']}", "job": job}, "_message.html")

    @app.get("/plotly.min.js")
    def plotly_js():
        return FileResponse(PLOTLY_JS, media_type="text/javascript")

    @app.get("/healthz")
    def healthz():
        return {"ok": True, "outputs": [str(p) for p in roots.paths]}

    return app
