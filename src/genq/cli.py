"""The ``genq`` command: ``up`` (embedded), the cluster roles (``api``, ``worker``,
``operator``) and REST clients (``keys create``, ``submit``, ``status``, ``jobs``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import httpx
import typer

from genq import eventloop
from genq.settings import Settings
from genq.tools import Registry, load_registry

app = typer.Typer(add_completion=False, no_args_is_help=True, help="genq: GPU generation tools as queued jobs.")
keys_app = typer.Typer(no_args_is_help=True, help="Manage API keys (admin).")
app.add_typer(keys_app, name="keys")
models_app = typer.Typer(no_args_is_help=True, help="Model folders.")
app.add_typer(models_app, name="models")


def _settings(**overrides) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _config_path(settings: Settings) -> Path | None:
    if settings.config is not None:
        return settings.config
    default = Path("genq.yaml")
    return default if default.exists() else None


def _registry(settings: Settings) -> Registry:
    return load_registry(_config_path(settings))


def _cluster_runtime(settings: Settings, nats_url: str):
    """The API's and operator's runtime: with the Kubernetes store and no genq.yaml, the
    tools are the namespace's ToolPools."""
    from genq.runtime import build_runtime
    from genq.tools import Registry

    if settings.store == "kubernetes" and _config_path(settings) is None:
        return build_runtime(settings, Registry([]), nats_url, tools_from_cluster=True)
    return build_runtime(settings, _registry(settings), nats_url)


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def up(
    host: Optional[str] = typer.Option(None, help="Address to bind (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default 8000)."),
    data_dir: Optional[Path] = typer.Option(None, help="Data folder (default ./genq-data)."),
    config: Optional[Path] = typer.Option(None, help="genq.yaml with the tools."),
    demo: bool = typer.Option(False, help="Run the demo tools (tiny models)."),
) -> None:
    """Run genq on this machine: API, workers, housekeeping and an embedded NATS."""
    from genq import embedded

    s = _settings(host=host, port=port, data_dir=data_dir, config=config)
    _logging(s.log_level)
    if config is not None and not config.exists():
        typer.echo(f"error: {config} does not exist", err=True)
        raise typer.Exit(2)
    if demo:
        from genq.tools import registry_from_dict

        models = s.resolved_data_dir() / "demo-models"
        typer.echo(f"demo: tiny random models for image-edit, text-to-image and upscale in {models}")
        registry = registry_from_dict(_write_demo_models(models))
    else:
        registry = _registry(s)
    eventloop.run(embedded.serve(s, registry), s.event_loop)


def _write_demo_models(models: Path) -> dict:
    """The demo's tools config, its tiny models written (once) in a child process.

    Building the pipelines pulls diffusers, transformers and triton into the process
    that does it, and triton's nanobind bindings then print dozens of "nanobind: leaked
    ..." lines when that process exits. ``genq up`` itself never builds one (its tools
    load written models, the diffusers ones in their own processes), so it stops with
    only its own lines; the child skips the interpreter's teardown, as the tool
    processes do (``genq.worker.tools.child``)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    writer = ctx.Process(target=_demo_models_child, args=(str(models), send), name="genq-demo-models")
    writer.start()
    send.close()
    try:
        config = receive.recv()
    except EOFError:
        config = None
    writer.join()
    if config is None:
        typer.echo("error: writing the demo models failed (see above)", err=True)
        raise typer.Exit(1)
    return config


def _demo_models_child(models: str, send) -> None:  # runs in the child process
    from genq.worker.tools.tiny_models import write_demo_models

    send.send(write_demo_models(models))
    send.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command()
def api(
    host: Optional[str] = typer.Option(None), port: Optional[int] = typer.Option(None),
) -> None:
    """The API role (cluster): needs GENQ_NATS_URL and the store/object-storage settings."""
    import uvicorn

    from genq.api import create_app

    s = _settings(host=host, port=port)
    _logging(s.log_level)
    if not s.nats_url:
        typer.echo("error: set GENQ_NATS_URL", err=True)
        raise typer.Exit(2)
    rt = _cluster_runtime(s, s.nats_url)
    uvicorn.run(create_app(rt, manage_runtime=True), host=s.host, port=s.port, log_level="warning",
                loop=eventloop.resolve(s.event_loop))


@app.command()
def worker(
    tool: str = typer.Option(..., help="The tool this worker runs."),
    data_dir: Optional[Path] = typer.Option(None),
    config: Optional[Path] = typer.Option(None, help="genq.yaml with the tools (default: GENQ_CONFIG or ./genq.yaml)."),
    nats_url: Optional[str] = typer.Option(None, help="Default: GENQ_NATS_URL, or the embedded server of --data-dir."),
    slots: Optional[int] = typer.Option(None, help="Jobs at once (default concurrencyPerWorker)."),
    health_port: Optional[int] = typer.Option(None, envvar="GENQ_WORKER_HEALTH_PORT",
                                              help="Serve /healthz and /readyz (the pod's probes) on this port."),
) -> None:
    """The worker role: pull one tool's jobs and run them until SIGTERM."""
    from genq.runtime import build_runtime
    from genq.worker.tools import build_tool
    from genq.worker.worker import Worker

    s = _settings(data_dir=data_dir, nats_url=nats_url, config=config)
    _logging(s.log_level)
    if config is not None and not config.exists():
        typer.echo(f"error: {config} does not exist", err=True)
        raise typer.Exit(2)
    url = s.nats_url
    if not url:
        f = s.resolved_data_dir() / "nats.url"
        if not f.exists():
            typer.echo("error: set GENQ_NATS_URL (or --data-dir of a running genq up)", err=True)
            raise typer.Exit(2)
        url = f.read_text().strip()
    registry = _registry(s)
    spec = registry.get(tool)
    if spec is None:
        typer.echo(f"error: no tool {tool!r} in the configuration ({', '.join(registry.names())})", err=True)
        raise typer.Exit(2)

    async def main() -> None:
        # Signals first: in a container genq is PID 1, which ignores a SIGTERM it has no
        # handler for, so a pod stopped while starting (a scale-in, a rollout) used to
        # run until its grace period (the tool's deadline) ended (found on the real node).
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        rt = build_runtime(s, registry, url)
        started: list[Any] = []  # the worker, then its health server, once each has started

        async def start() -> None:
            await rt.open()
            w = Worker(spec, build_tool(spec, slots=slots or spec.concurrency_per_worker), store=rt.store, bus=rt.bus,
                       blobs=rt.blobs, settings=s, slots=slots, metrics=rt.metrics)
            await w.start()
            started.append(w)
            if health_port:
                from genq.worker.health import HealthServer

                health = HealthServer(w, health_port)
                await health.start()
                started.append(health)
            print(f"worker {w.id} ready", flush=True)

        starting, stopping = asyncio.create_task(start()), asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a start-up failure exits non-zero
            await stopping
        else:  # stopped while starting: nothing ran yet, nothing to drain
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        for part in started:  # the worker drains, then its health server goes
            await part.stop()
        await rt.close()

    eventloop.run(main(), s.event_loop)


@app.command()
def operator() -> None:
    """The operator role: retention, deadlines, lost and unpublished jobs; with
    GENQ_STORE=kubernetes also the ToolPool handlers (worker Deployments and scaling)."""
    from genq.housekeeping import Housekeeper

    s = _settings()
    _logging(s.log_level)
    if not s.nats_url:
        typer.echo("error: set GENQ_NATS_URL", err=True)
        raise typer.Exit(2)

    async def main() -> None:
        rt = _cluster_runtime(s, s.nats_url)
        await rt.open()
        hk = Housekeeper(rt)
        if s.store == "kubernetes":
            # Cluster mode: the kopf handlers (ToolPools → worker Deployments, scaling)
            # under leader election, beside the GenerationJob housekeeping. Housekeeping
            # is safe on every replica: each of its moves is a compare-and-set.
            from genq.operator.handlers import lead_and_operate

            hk_task = asyncio.create_task(hk.run())
            try:
                await lead_and_operate(s)
            finally:
                hk.stop()
                await hk_task
                await rt.close()
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, hk.stop)
        await hk.run()
        await rt.close()

    asyncio.run(main())


@models_app.command("tiny")
def models_tiny(
    dir: Path = typer.Option(Path("./genq-models"), "--dir", help="Where to write the model folders."),
    config: Optional[Path] = typer.Option(None, "--config", help="Also write a genq.yaml that uses them here."),
) -> None:
    """Write tiny randomly initialised diffusers models for all three built-in tools
    (offline, seconds on a CPU) and print a genq.yaml that runs them."""
    import yaml

    from genq.worker.tools.tiny_models import write_demo_models

    cfg = write_demo_models(dir)
    text = yaml.safe_dump(cfg, sort_keys=False)
    if config is not None:
        config.write_text(text)
        typer.echo(f"wrote {config}; start with: genq up --config {config}")
    else:
        typer.echo(text)


# -- REST clients ------------------------------------------------------------------------
def _client(url: Optional[str], key: Optional[str]) -> httpx.Client:
    url = url or os.environ.get("GENQ_URL") or "http://127.0.0.1:8000"
    key = key or os.environ.get("GENQ_KEY") or os.environ.get("GENQ_ADMIN_KEY")
    if not key:
        typer.echo("error: pass --key or set GENQ_KEY", err=True)
        raise typer.Exit(2)
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=150)


def _check(r: httpx.Response) -> dict:
    if r.status_code >= 400:
        try:
            err = r.json()["error"]
            typer.echo(f"error {r.status_code} {err['code']}: {err['message']}", err=True)
        except Exception:
            typer.echo(f"error {r.status_code}: {r.text[:300]}", err=True)
        raise typer.Exit(1)
    return r.json()


URL = typer.Option(None, "--url", help="API URL (or GENQ_URL).")
KEY = typer.Option(None, "--key", help="API key (or GENQ_KEY).")


@keys_app.command("create")
def keys_create(
    name: str = typer.Option(...), tier: str = typer.Option("standard"), admin: bool = typer.Option(False),
    max_queued: Optional[int] = typer.Option(None), url: Optional[str] = URL, key: Optional[str] = KEY,
) -> None:
    """Create an API key; prints it once."""
    with _client(url, key) as c:
        body = {"name": name, "tier": tier, "admin": admin}
        if max_queued:
            body["max_queued"] = max_queued
        out = _check(c.post("/v1/keys", json=body))
    typer.echo(json.dumps(out, indent=2))


@app.command()
def submit(
    tool: str,
    param: list[str] = typer.Option([], "--param", "-p", help="k=v, repeatable."),
    image: list[Path] = typer.Option([], "--image", "-i", help="Input image, repeatable."),
    variant: Optional[str] = typer.Option(None), priority: str = typer.Option("normal"),
    wait: bool = typer.Option(False, help="Wait with a progress bar and save the result."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where to save the result (with --wait)."),
    url: Optional[str] = URL, key: Optional[str] = KEY,
) -> None:
    """Submit a job; with --wait, follow it and download the result."""
    fields: list[tuple[str, str]] = [("tool", tool), ("priority", priority)]
    if variant:
        fields.append(("variant", variant))
    for p in param:
        k, sep, v = p.partition("=")
        if not sep:
            typer.echo(f"error: --param {p!r} is not k=v", err=True)
            raise typer.Exit(2)
        fields.append((k, v))
    files = [("image" if len(image) == 1 else "images", (f.name, f.read_bytes())) for f in image]
    with _client(url, key) as c:
        # Always multipart: plain fields as parts without a filename, then the images.
        job = _check(c.post("/v1/jobs", files=[(k, (None, v)) for k, v in fields] + files))
        if not wait:
            typer.echo(json.dumps(job, indent=2))
            return
        job = _follow(c, job)
        typer.echo(json.dumps(job, indent=2), err=True)
        if job["status"] != "succeeded":
            raise typer.Exit(1)
        for f in job["result"]["files"]:
            target = output if (output and len(job["result"]["files"]) == 1) else Path(f"{job['id']}-{f['name']}")
            r = c.get(f["url"])
            if r.status_code != 200:
                _check(r)
            target.write_bytes(r.content)
            typer.echo(str(target))


def _follow(c: httpx.Client, job: dict) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(f"{job['id']} {job['status']}", total=1.0)
        try:
            with c.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=None) as r:
                event = None
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event:
                        data = json.loads(line[5:])
                        if event == "progress":
                            bar.update(task, completed=data.get("progress") or 0)
                        elif event == "status":
                            job = data
                            desc = f"{job['id']} {job['status']}"
                            if job.get("position"):
                                desc += f" (position {job['position']})"
                            bar.update(task, description=desc, completed=job.get("progress") or 0)
                            if job["status"] in ("succeeded", "failed", "cancelled"):
                                return job
        except httpx.HTTPError:
            pass
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.5)
            job = _check(c.get(f"/v1/jobs/{job['id']}"))
            bar.update(task, completed=job.get("progress") or 0)
    return job


@app.command()
def status(job_id: str, url: Optional[str] = URL, key: Optional[str] = KEY) -> None:
    """Show one job."""
    with _client(url, key) as c:
        typer.echo(json.dumps(_check(c.get(f"/v1/jobs/{job_id}")), indent=2))


@app.command()
def jobs(status: Optional[str] = typer.Option(None), limit: int = 50, url: Optional[str] = URL, key: Optional[str] = KEY) -> None:
    """List your jobs."""
    params = {"limit": limit}
    if status:
        params["status"] = status
    with _client(url, key) as c:
        out = _check(c.get("/v1/jobs", params=params))
    for j in out["jobs"]:
        typer.echo(f"{j['id']}  {j['tool']:<16} {j['status']:<10} {j['created_at']}")
    typer.echo(f"{len(out['jobs'])} of {out['total']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
