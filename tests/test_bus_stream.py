"""The job stream's JetStream settings that bound nats-server's memory (BENCHMARKS.md §7).

A real nats-server (the embedded one) on a free port; no mocks."""

from __future__ import annotations

import nats
from nats.js import api

from genq import constants
from genq.adapters.nats import DUPLICATE_WINDOW_SECONDS, NatsBus
from genq.adapters.nats_server import EmbeddedNats


async def test_duplicate_window_is_minutes_and_an_old_stream_is_updated(tmp_path):
    """JetStream keeps every message id for the whole duplicate window (~300 bytes each):
    a 24 h window made nats-server grow for a day under steady load. A stream made with
    the old window is brought down to the new one when genq connects."""
    server = EmbeddedNats(tmp_path / "nats")
    url = server.start()
    nc = await nats.connect(url)
    bus = NatsBus(url)
    try:
        js = nc.jetstream()
        await js.add_stream(api.StreamConfig(
            name=constants.JOBS_STREAM, subjects=[f"{constants.JOBS_SUBJECT_PREFIX}.>"],
            retention=api.RetentionPolicy.WORK_QUEUE, storage=api.StorageType.FILE,
            duplicate_window=24 * 3600.0, discard=api.DiscardPolicy.NEW,
        ))
        await bus.connect()
        info = await js.stream_info(constants.JOBS_STREAM)
        assert info.config.duplicate_window == DUPLICATE_WINDOW_SECONDS
        assert 60 <= DUPLICATE_WINDOW_SECONDS <= 3600

        # The dedupe still works inside the window: the same id publishes once.
        first = await bus.publish_job("t", "normal", "job-1", "job-1.1")
        again = await bus.publish_job("t", "normal", "job-1", "job-1.1")
        assert first == again
    finally:
        await bus.close()
        await nc.close()
        server.stop()
