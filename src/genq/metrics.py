"""Prometheus collectors shared by the API and the worker of one process.

Each process (or test app) gets its own registry, so tests never trip over duplicated
global collectors.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs_submitted = Counter("genq_jobs_submitted", "Jobs accepted (202/200) by the API.", ["tool"], registry=r)
        self.jobs_finished = Counter("genq_jobs_finished", "Jobs that reached a terminal status.", ["tool", "status"], registry=r)
        self.job_seconds = Histogram("genq_job_seconds", "Time a tool spent on one job.", ["tool"], buckets=_DURATION_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram("genq_queue_wait_seconds", "Submit to start of a job.", ["tool"], buckets=_DURATION_BUCKETS, registry=r)
        self.job_retries = Counter("genq_job_retries", "Attempts handed back for a retry.", ["tool"], registry=r)
        self.model_load_seconds = Histogram("genq_model_load_seconds", "Time to load a tool's model.", ["tool"], buckets=_DURATION_BUCKETS, registry=r)
        self.steps_per_second = Histogram(
            "genq_steps_per_second", "Denoising steps per second of one job (diffusers tools).", ["tool"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128), registry=r,
        )
        self.http_requests = Counter("genq_http_requests", "HTTP requests answered.", ["method", "route", "status"], registry=r)
        self.http_seconds = Histogram(
            "genq_http_request_seconds", "HTTP request latency.", ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10), registry=r,
        )
        self.queued = Gauge("genq_queue_queued", "Jobs waiting per tool.", ["tool"], registry=r)
        self.running = Gauge("genq_queue_running", "Jobs running per tool.", ["tool"], registry=r)
        self.workers = Gauge("genq_queue_workers", "Live workers per tool.", ["tool"], registry=r)
