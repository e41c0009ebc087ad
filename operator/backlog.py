"""Where the operator's scaler learns a tool's backlog and warm requests: JetStream.

:class:`JetStreamBacklog` reads the tool's three durable consumers (``num_pending`` is
queued, ``num_ack_pending`` is running) and listens on ``genq.warm.*`` for warm requests.
The handlers take any async callable ``tool -> Backlog`` (unit tests pass a fake).
Neighbours: :class:`genq.adapters.nats.NatsBus` (the connection), :mod:`genq.operator.scaling`.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import nats.js.errors

from genq import constants
from genq.adapters.nats import NatsBus
from genq.operator.scaling import Backlog


class BacklogSource(Protocol):
    async def __call__(self, tool: str) -> Backlog: ...


class JetStreamBacklog:
    """A tool's backlog read from its JetStream consumers, plus warm requests."""

    def __init__(self, bus: NatsBus):
        self.bus = bus
        self._warm_until: dict[str, float] = {}
        self._sub: Any = None

    async def start(self) -> None:
        async def on_warm(msg: Any) -> None:
            import json

            try:
                data = json.loads(msg.data)
                seconds = float(data.get("seconds") or 0)
            except (ValueError, TypeError, AttributeError):
                return
            tool = msg.subject.rsplit(".", 1)[-1]
            self._warm_until[tool] = max(self._warm_until.get(tool, 0.0), time.time() + seconds)

        self._sub = await self.bus.nc.subscribe(f"{constants.WARM_SUBJECT_PREFIX}.*", cb=on_warm)

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # connection closing
                pass

    def warm_until(self, tool: str) -> float:
        return self._warm_until.get(tool, 0.0)

    async def __call__(self, tool: str) -> Backlog:
        js = self.bus.nc.jetstream(timeout=2.0)
        queued = running = 0
        for prio in constants.PRIORITIES:
            try:
                info = await js.consumer_info(constants.JOBS_STREAM, constants.consumer_name(tool, prio))
            except nats.js.errors.NotFoundError:
                continue  # no worker has declared the tool's consumers yet: nothing queued through them
            queued += info.num_pending or 0
            running += info.num_ack_pending or 0
        return Backlog(queued=queued, running=running)
