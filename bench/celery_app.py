"""The Celery side of ``bench/celery_compare.py``: one no-op task on a Redis broker.

Configured from the environment by the benchmark (``BENCH_REDIS_URL``,
``BENCH_ACKS_LATE``, ``BENCH_READY_FILE``) so the client and the worker it starts
(``celery -A celery_app worker``, run with this folder as cwd) agree.

Settings chosen to be comparable with genq, which acknowledges a job only after it ran
and keeps every job's status and result:
  * ``task_acks_late``: ack after the task returns (at-least-once, like genq); Celery's
    default acks before running, which loses the task if the worker dies mid-run.
  * a Redis result backend: the task's status and return value are stored, as genq
    stores each job's status and result.
Everything else is Celery's default (prefork pool, ``worker_prefetch_multiplier`` 4,
JSON serializer).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from celery import Celery
from celery.signals import worker_ready



def make_app(url: str, acks_late: bool = True) -> Celery:
    """The Celery app for one Redis; the benchmark's client makes one per Redis it starts."""
    app = Celery("genq_bench", broker=url, backend=url)
    app.conf.update(
        task_acks_late=acks_late,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=86400,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


app = make_app(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"), os.environ.get("BENCH_ACKS_LATE", "1") == "1")


@app.task(name="noop")
def noop(n: int = 0) -> float:
    """Does nothing but return the wall-clock time it was called (the start time)."""
    return time.time()


@worker_ready.connect
def _ready(**_: object) -> None:
    ready = os.environ.get("BENCH_READY_FILE")
    if ready:
        Path(ready).write_text("ready")
