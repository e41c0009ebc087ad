"""Nothing accepted is lost (SPEC §6): the whole ``genq up`` process SIGKILLed with jobs
queued and running, and a worker process dying mid-job. Delivery is at least once, effects
exactly once: every 202 job ends ``succeeded`` once, with one set of results."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import ADMIN, start_live, stop_live, tools_config
from genq.adapters.nats_server import free_port
from helpers import DRAIN_SECONDS, TERMINAL, GenqUp, alive, echo_spec, genq_env, nats_servers_for, poll, wait_until


def recording_echo(params, inputs, progress, cancel):
    """``genq_testtools.echo`` that appends ``start``/``end`` lines (with its pid) to
    ``<GENQ_TEST_STATE>/runs-<text>.log``: how many times the tool really ran and finished."""
    from genq_testtools import echo

    log = Path(os.environ["GENQ_TEST_STATE"]) / f"runs-{params.get('text', '')}.log"
    with open(log, "a") as f:
        f.write(f"start {os.getpid()}\n")
    result = echo(params, inputs, progress, cancel)
    with open(log, "a") as f:
        f.write(f"end {os.getpid()}\n")
    return result


@pytest.fixture
def genq_up(tmp_path):
    config = tmp_path / "genq.yaml"
    config.write_text(yaml.safe_dump({"tools": [echo_spec("echo", "test_durability:recording_echo", label="Echo",
                                                          maxWorkers=2, maxQueued=50)]}))
    up = GenqUp(tmp_path, tmp_path / "data", config, free_port())
    try:
        yield up
    finally:
        up.stop()
        for pid in nats_servers_for(up.data):  # never leave a server behind, even on failure
            os.kill(pid, signal.SIGKILL)


def list_jobs(c: httpx.Client) -> list[dict]:
    r = c.get("/v1/jobs", params={"limit": 500, "order": "asc"})
    assert r.status_code == 200, r.text
    return r.json()["jobs"]


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def runs(tmp: Path, tag: str) -> tuple[int, int]:
    log = tmp / f"runs-{tag}.log"
    lines = log.read_text().split() if log.exists() else []
    return lines[0::2].count("start"), lines[0::2].count("end")


@pytest.mark.slow
def test_sigkill_whole_process_loses_nothing(genq_up, tmp_path):
    up = genq_up
    timings = {"first_start": up.start()}
    headers = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=up.url, headers=headers, timeout=10) as c:
        ids: dict[str, str] = {}
        for i in range(12):
            tag = f"k{i}"
            r = c.post("/v1/jobs", json={"tool": "echo", "params": {"text": tag, "seed": i, "sleep": 1}})
            assert r.status_code == 202, r.text
            ids[r.json()["id"]] = tag

        # Kill while some jobs are done, both slots busy and the rest queued: right after the
        # first job ends, so at least one job of the next pair has just started its 1 s of work.
        def mixed():
            jobs = list_jobs(c)
            st = [j["status"] for j in jobs]
            return jobs if st.count("succeeded") >= 1 and st.count("running") == 2 and st.count("queued") >= 1 else None

        before = {j["id"]: j for j in wait_until(mixed, 15, "a mix of succeeded, running and queued jobs")}
    nats_pid = int((up.data / "nats" / "nats-server.pid").read_text())
    assert alive(nats_pid)
    up.proc.send_signal(signal.SIGKILL)
    assert up.proc.wait(5) == -signal.SIGKILL
    t_dead = time.time()  # every job the first process finished has completed_at before this
    # The embedded nats-server goes with it (parent-death signal); if not, the next start stops it.
    nats_died_with_parent = True
    try:
        wait_until(lambda: not alive(nats_pid), 5, "nats-server to exit after its parent was killed")
    except AssertionError:
        nats_died_with_parent = False

    t_restart = time.time()
    timings["restart"] = up.start()
    assert not alive(nats_pid), "the old nats-server is still running after the restart"
    assert int((up.data / "nats" / "nats-server.pid").read_text()) != nats_pid
    with httpx.Client(base_url=up.url, headers=headers, timeout=10) as c:
        t0 = time.monotonic()
        final = wait_until(lambda: (jobs := list_jobs(c)) and all(j["status"] in TERMINAL for j in jobs) and jobs,
                           30, "every job to end")
        timings["drain_backlog"] = time.monotonic() - t0
        final = {j["id"]: j for j in final}
        assert set(final) == set(ids), "a job that got a 202 is missing"
        rerun = 0
        for jid, job in final.items():
            tag = ids[jid]
            assert job["status"] == "succeeded", job
            assert job["attempts"] >= 1 and job["result"]["seed"] == int(tag[1:])
            files = {f["name"]: f for f in job["result"]["files"]}
            assert sorted(files) == ["meta.json", "result.png"], job
            meta = json.loads(c.get(files["meta.json"]["url"]).content)
            assert meta["params"]["text"] == tag, (tag, meta)
            png = c.get(files["result.png"]["url"])
            assert png.status_code == 200 and len(png.content) == files["result.png"]["size_bytes"]
            # One set of results, under the job's own keys, and nothing half-written beside it.
            results = up.data / "blobs" / "jobs" / jid / "results"
            assert sorted(p.name for p in results.iterdir()) == ["meta.json", "result.png"]
            started, ended = runs(tmp_path, tag)
            assert 1 <= ended <= started <= job["attempts"], (tag, started, ended, job["attempts"])
            if before[jid]["status"] == "succeeded":  # finished before the kill: never ran again
                assert job["attempts"] == 1 and ended == 1 and job["completed_at"] == before[jid]["completed_at"]
            if job["attempts"] > 1:
                rerun += 1
        assert rerun >= 1, "no job was interrupted by the kill; the test did not test anything"
        # Exactly once: the restarted process moved to succeeded exactly the jobs that the
        # first one had not finished (a job ending twice would count here a second time).
        ended = {jid: datetime.fromisoformat(j["completed_at"].replace("Z", "+00:00")).timestamp() for jid, j in final.items()}
        assert not any(t_dead <= t < t_restart for t in ended.values())
        finished_by_second = sum(1 for t in ended.values() if t >= t_restart)
        assert 1 <= finished_by_second < len(ids)
        m = c.get("/metrics").text
        assert metric(m, "genq_jobs_finished_total", tool="echo", status="succeeded") == finished_by_second
        assert metric(m, "genq_jobs_finished_total", tool="echo", status="failed") == 0

    # SIGTERM: drains, stops its nats-server and exits 0.
    t0 = time.monotonic()
    up.proc.send_signal(signal.SIGTERM)
    try:
        code = up.proc.wait(DRAIN_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"genq up did not exit within the drain time:\n{up.log()}")
    timings["sigterm_exit"] = time.monotonic() - t0
    assert code == 0, up.log()
    assert "genq stopped" in up.log()
    assert nats_servers_for(up.data) == []
    print(f"timings: {timings}; nats-server died with its parent: {nats_died_with_parent}")


# -- a worker process dies mid-job ------------------------------------------------------
class ExternalWorker:
    def __init__(self, tmp: Path, data: Path, config: Path, name: str):
        self.log_path = tmp / f"{name}.log"
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "genq.cli", "worker", "--tool", "ext", "--data-dir", str(data), "--config", str(config)],
            env=genq_env(tmp), cwd=tmp, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def ready(self, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while not (m := re.search(r"worker (\S+) ready", self.log())):
            assert self.proc.poll() is None, f"worker exited {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, self.log()
            await asyncio.sleep(0.05)
        return m.group(1)

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"worker still running:\n{self.log()}"
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.slow
async def test_worker_process_dies_mid_job(tmp_path, monkeypatch):
    monkeypatch.setenv("GENQ_TEST_STATE", str(tmp_path))
    ext = echo_spec("ext", "genq_testtools:echo", maxWorkers=1)
    config = tools_config()
    config["tools"].append(ext)
    worker_yaml = tmp_path / "worker.yaml"
    worker_yaml.write_text(yaml.safe_dump({"tools": [ext]}))
    live, server, task = await start_live(tmp_path, config, ack_wait_seconds=3)
    workers: list[ExternalWorker] = []
    try:
        # Only external workers serve `ext`: stop the embedded one before anything is queued.
        embedded = next(w for w in live.emb.workers if w.name == "ext")
        await embedded.stop(0)
        live.emb.workers.remove(embedded)

        first = ExternalWorker(tmp_path, live.emb.data_dir, worker_yaml, "worker-1")
        workers.append(first)
        first_id = await first.ready()
        async with live.client() as c:
            r = await c.post("/v1/jobs", json={"tool": "ext", "params": {"text": "w1", "seed": 11, "crash_once": True}})
            assert r.status_code == 202, r.text
            jid = r.json()["id"]
            # The tool os._exit()s the worker process on its first attempt.
            assert await first.wait(20) == 137
            job = (await c.get(f"/v1/jobs/{jid}")).json()
            assert job["status"] == "running" and job["attempts"] == 1, job
            assert live.emb.rt is not None
            stored = await live.emb.rt.store.get(jid)
            assert stored.worker == first_id

            second = ExternalWorker(tmp_path, live.emb.data_dir, worker_yaml, "worker-2")
            workers.append(second)
            second_id = await second.ready()
            t0 = time.monotonic()
            while (job := (await c.get(f"/v1/jobs/{jid}")).json())["status"] not in TERMINAL:
                assert time.monotonic() - t0 < 20, job
                await asyncio.sleep(0.1)
            assert job["status"] == "succeeded" and job["attempts"] == 2, job
            assert job["result"]["seed"] == 11 and job["error"] is None
            assert (await live.emb.rt.store.get(jid)).worker == second_id
            files = {f["name"]: f for f in job["result"]["files"]}
            assert sorted(files) == ["meta.json", "result.png"]
            meta = json.loads((await c.get(files["meta.json"]["url"])).content)
            assert meta["params"]["text"] == "w1"
            results = live.emb.data_dir / "blobs" / "jobs" / jid / "results"
            assert sorted(p.name for p in results.iterdir()) == ["meta.json", "result.png"]
            # Acked: nothing left for the tool on the bus, and it does not come back.
            assert await live.emb.rt.bus.backlog("ext") == 0
            await asyncio.sleep(3.5)  # longer than ack_wait
            again = (await c.get(f"/v1/jobs/{jid}")).json()
            assert again["attempts"] == 2 and again["completed_at"] == job["completed_at"]
        second.proc.send_signal(signal.SIGTERM)
        assert await second.wait(15) == 0, second.log()
    finally:
        for w in workers:
            w.kill()
        await stop_live(live, server, task)


@pytest.mark.genq(tools={"echo": {"maxAttempts": 1}})
async def test_a_job_drained_on_its_last_delivery_runs_again(live):
    """A worker stopping (scale-in, rollout) hands its running job back without counting
    the attempt, even when JetStream would not deliver that message again (its last
    delivery, MaxDeliver 1 here): the job goes out as a new message and runs."""

    rt = live.emb.rt
    old = next(w for w in live.emb.workers if w.name == "echo")
    async with live.client() as c:
        jid = (await c.post("/v1/jobs", json={"tool": "echo", "params": {"sleep": 3, "text": "drained"}})).json()["id"]
        await poll(c, jid, until=("running",))
        await old.stop(drain=0)
        assert (await c.get(f"/v1/jobs/{jid}")).json()["status"] == "queued"
        done = await run_new_echo_worker(rt, c, jid)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done


@pytest.mark.genq(tools={"echo": {"maxAttempts": 1, "maxWorkers": 1}})
async def test_the_next_job_is_pulled_in_the_last_step_and_handed_back_on_stop(live):
    """A slot pulls its next job while the running one is in its last step (no pull gap
    between jobs), and the job stays ``queued`` until it starts. A worker stopping then
    hands it back, even on its last JetStream delivery (MaxDeliver 1 here)."""

    rt = live.emb.rt
    old = next(w for w in live.emb.workers if w.name == "echo")
    async with live.client() as c:
        a = (await c.post("/v1/jobs", json={"tool": "echo", "params": {"sleep": 4, "text": "a"}})).json()["id"]
        b = (await c.post("/v1/jobs", json={"tool": "echo", "params": {"text": "b"}})).json()["id"]
        deadline = time.monotonic() + 20
        while not (old._prefetch and old._prefetch[0].done()):
            assert time.monotonic() < deadline, "the next job was not pulled during the last step"
            await asyncio.sleep(0.02)
        assert old._prefetch[0].result().job_id == b
        assert (await c.get(f"/v1/jobs/{a}")).json()["progress"] >= 0.9
        assert (await c.get(f"/v1/jobs/{b}")).json()["status"] == "queued"
        await old.stop(drain=5)  # a finishes; b was never started here
        assert (await c.get(f"/v1/jobs/{a}")).json()["status"] == "succeeded"
        assert (await c.get(f"/v1/jobs/{b}")).json()["status"] == "queued"
        done = await run_new_echo_worker(rt, c, b)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done


@pytest.mark.genq(tools={"echo": {"maxAttempts": 1, "maxWorkers": 1}})
async def test_a_delivery_spent_without_a_claim_does_not_strand_the_job(live):
    """A worker killed between its pull and its claim (or while holding the next job it
    pulled during a last step) spent a JetStream delivery with no attempt made; on the
    message's last delivery (MaxDeliver 1 here) JetStream never offers it again. Its
    advisory makes housekeeping put the job out as a new message."""

    rt = live.emb.rt
    await next(w for w in live.emb.workers if w.name == "echo").stop(drain=0)
    async with live.client() as c:
        jid = (await c.post("/v1/jobs", json={"tool": "echo", "params": {"text": "stranded"}})).json()["id"]
        # The worker that dies after its pull: it takes the delivery and never answers.
        deadline = time.monotonic() + 10
        while (d := await rt.bus.pull("echo")) is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert d.job_id == jid and d.attempt == 1
        done = await run_new_echo_worker(rt, c, jid)  # ack_wait is 3 s here
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    assert not await rt.bus.has_message(d.stream_seq)  # the spent message is gone from the stream


@pytest.mark.genq(tools={"echo": {"maxAttempts": 3, "maxWorkers": 1}})
async def test_a_job_whose_worker_died_on_its_last_delivery_runs_again(live):
    """Deliveries spent unclaimed (workers killed holding a pulled job) leave fewer
    deliveries than attempts; a worker then dying on the message's last one left the job
    ``running`` with attempts to spare and no redelivery coming: it waited for its
    deadline and failed. The advisory makes housekeeping send it out again."""
    from genq.models import Status

    rt = live.emb.rt
    await next(w for w in live.emb.workers if w.name == "echo").stop(drain=0)
    async with live.client() as c:
        jid = (await c.post("/v1/jobs", json={"tool": "echo", "params": {"text": "last"}})).json()["id"]

        async def take():
            deadline = time.monotonic() + 15
            while (d := await rt.bus.pull("echo")) is None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            return d

        # Two deliveries pulled and dropped (workers killed before their claim)...
        for n in (1, 2):
            assert (await take()).attempt == n
        # ...and the third (the last: MaxDeliver 3) claimed by a worker that then dies.
        d = await take()
        assert d.attempt == 3
        job = await rt.store.get(jid)
        assert await rt.store.transition(jid, [Status.QUEUED], status=Status.RUNNING, attempts=1, started_at=time.time(),
                                         heartbeat_at=time.time(), worker="dead-worker") is not None
        done = await run_new_echo_worker(rt, c, jid)  # the deadline is 30 s: it must not be what ends it
    assert done["status"] == "succeeded" and done["attempts"] == 2, (job, done)


async def run_new_echo_worker(rt, c, job_id: str) -> dict:
    """Start a fresh worker for ``echo`` (the one a restart brings up), wait for
    ``job_id`` to end, stop the worker; the job as it ended."""
    from genq.worker.tools import build_tool
    from genq.worker.worker import Worker

    spec = rt.registry.get("echo")
    new = Worker(spec, build_tool(spec), store=rt.store, bus=rt.bus, blobs=rt.blobs, settings=rt.settings,
                 metrics=rt.metrics)
    await new.start()
    try:
        return await poll(c, job_id, timeout=30)
    finally:
        await new.stop(drain=5)
