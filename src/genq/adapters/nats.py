"""``Bus`` on NATS JetStream (job messages) and core NATS (cancel, events, warm, kicks).

One work-queue stream holds every job, file storage; a tool has one durable pull consumer
per priority (``genq-<tool>-high|normal|low``), so asking them in that order gives the
SPEC's dispatch order (priority, then FIFO). The message id is the job id (publish dedupe),
acks are explicit, ``MaxDeliver`` is the tool's ``maxAttempts``.

An idle worker slot does not spin: after a publish the API sends a kick on
``genq.kick.<tool>``; slots wait for a kick (or a short timeout, in case one was missed)
and then ask the consumers with ``no_wait`` pull requests, which answer at once.

Neighbours: implements :class:`genq.ports.Bus`; :mod:`genq.adapters.nats_server` starts the
embedded server this talks to.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from genq import constants
from genq.ports import Unavailable

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT = 2.0

#: How long JetStream remembers a published message id to drop a second publish of it:
#: a republish by housekeeping of a job whose stream position was not noted (5 s after
#: the submit, or when a failing store recovers). Longer gaps cost only a duplicate
#: delivery, which the worker's compare-and-set turns into a no-op. Not longer: the server
#: keeps every id for the whole window, ~300 bytes each (24 h at 14 jobs/s grew
#: nats-server by 0.2 MB a minute, ~350 MB a day; bench/soak.py, BENCHMARKS.md §7).
DUPLICATE_WINDOW_SECONDS = 600.0


class NatsDelivery:
    """One JetStream delivery of a job message."""

    __slots__ = ("_msg", "job_id", "attempt", "stream_seq", "priority", "reply")

    def __init__(self, msg: Msg, job_id: str, priority: str):
        self._msg = msg
        self.reply = msg.reply
        md = msg.metadata
        self.job_id = job_id
        self.attempt = md.num_delivered
        self.stream_seq = md.sequence.stream
        self.priority = priority

    async def ack(self) -> None:
        await self._msg.ack()

    async def nak(self, delay: float | None = None) -> None:
        await self._msg.nak(delay=delay)

    async def in_progress(self) -> None:
        await self._msg.in_progress()

    async def term(self) -> None:
        await self._msg.term()


class NatsSubscription:
    """Core NATS messages on a subject as an async iterator of decoded JSON."""

    def __init__(self, sub: Any):
        self._sub = sub

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[dict[str, Any]]:
        async for msg in self._sub.messages:
            try:
                data = json.loads(msg.data)
            except ValueError:
                continue
            if isinstance(data, dict):
                data.setdefault("_subject", msg.subject)
                yield data

    async def next(self, timeout: float) -> dict[str, Any] | None:
        """The next message, or None after ``timeout``."""
        try:
            msg = await self._sub.next_msg(timeout=timeout)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            return None
        try:
            data = json.loads(msg.data)
        except ValueError:
            return None
        if isinstance(data, dict):
            data.setdefault("_subject", msg.subject)
            return data
        return None

    async def unsubscribe(self) -> None:
        try:
            await self._sub.unsubscribe()
        except Exception:  # connection closing: nothing to undo
            pass


class NatsBus:
    def __init__(self, url: str, *, name: str = "genq"):
        self.url = url
        self.name = name
        self._nc: nats.NATS | None = None
        self._js: Any = None
        self._kick_subs: dict[str, Any] = {}
        self._kick_gen: dict[str, int] = {}
        self._kick_event: dict[str, asyncio.Event] = {}
        self._closing = False
        #: When JetStream first left a publish unanswered on a live connection (None once one
        #: succeeds). After a failed write (a full disk) a stream refuses every publish until
        #: its server restarts, even with space back; ``genq up`` restarts the one it owns.
        self.stalled_since: float | None = None

    # -- lifecycle ---------------------------------------------------------------------
    async def connect(self) -> None:
        async def _err(e: Exception) -> None:
            log.warning("nats: %s", e)

        async def _disc() -> None:
            if not self._closing:
                log.warning("nats: disconnected from %s", self.url)

        async def _reconn() -> None:
            log.info("nats: reconnected to %s", self.url)

        self._nc = await nats.connect(
            self.url,
            name=self.name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            connect_timeout=2,
            allow_reconnect=True,
            error_cb=_err,
            disconnected_cb=_disc,
            reconnected_cb=_reconn,
            pending_size=8 * 1024 * 1024,
        )
        self._js = self._nc.jetstream(timeout=_REQUEST_TIMEOUT)
        await self._ensure_stream()

    async def close(self) -> None:
        self._closing = True
        if self._nc is not None and not self._nc.is_closed:
            try:
                await self._nc.drain()
            except Exception:
                await self._nc.close()
        self._nc = None

    @property
    def nc(self) -> nats.NATS:
        if self._nc is None:
            raise Unavailable("bus is not connected")
        return self._nc

    async def ping(self) -> None:
        if self._nc is None or not self._nc.is_connected:
            raise Unavailable("NATS is not connected")
        try:
            await self._js.stream_info(constants.JOBS_STREAM)
        except Exception as e:
            raise Unavailable(f"JetStream: {e}") from e

    async def _ensure_stream(self) -> None:
        cfg = api.StreamConfig(
            name=constants.JOBS_STREAM,
            subjects=[f"{constants.JOBS_SUBJECT_PREFIX}.>"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
            discard=api.DiscardPolicy.NEW,
        )
        try:
            await self._js.add_stream(cfg)
        except nats.js.errors.BadRequestError:
            await self._js.update_stream(cfg)

    async def ensure_tool(self, tool: str, max_attempts: int, ack_wait: float) -> None:
        for prio in constants.PRIORITIES:
            name = constants.consumer_name(tool, prio)
            cfg = api.ConsumerConfig(
                durable_name=name,
                filter_subject=constants.job_subject(tool, prio),
                ack_policy=api.AckPolicy.EXPLICIT,
                deliver_policy=api.DeliverPolicy.ALL,
                max_deliver=max_attempts,
                ack_wait=ack_wait,
                max_ack_pending=-1,
                max_waiting=4096,
            )
            try:
                await self._js.add_consumer(constants.JOBS_STREAM, cfg)
            except nats.js.errors.BadRequestError as e:
                # An older definition (another maxAttempts or ackWait): update it in place.
                log.info("updating consumer %s: %s", name, e)
                await self._js.add_consumer(constants.JOBS_STREAM, cfg)

    # -- jobs ----------------------------------------------------------------------------
    async def publish_job(self, tool: str, priority: str, job_id: str, dedupe_id: str | None = None) -> int:
        try:
            ack = await self._js.publish(
                constants.job_subject(tool, priority),
                json.dumps({"id": job_id}).encode(),
                timeout=_REQUEST_TIMEOUT,
                headers={"Nats-Msg-Id": dedupe_id or job_id},
            )
        except (nats.errors.Error, asyncio.TimeoutError, nats.js.errors.Error) as e:
            if isinstance(e, nats.errors.TimeoutError | asyncio.TimeoutError) and self._nc is not None and self._nc.is_connected:
                self.stalled_since = self.stalled_since or time.monotonic()
            raise Unavailable(f"could not enqueue on JetStream: {e}") from e
        self.stalled_since = None
        try:
            await self.nc.publish(constants.kick_subject(tool), b"{}")
        except Exception:  # the kick is an optimisation; slots also poll
            pass
        return ack.seq

    async def pull(self, tool: str) -> NatsDelivery | None:
        nc = self.nc
        for prio in constants.PRIORITIES:
            subject = f"$JS.API.CONSUMER.MSG.NEXT.{constants.JOBS_STREAM}.{constants.consumer_name(tool, prio)}"
            try:
                # old_style: JetStream delivers with the message's own subject, which the
                # muxed request inbox cannot route; a per-request inbox routes by sid.
                msg = await nc.request(subject, b'{"batch":1,"no_wait":true}', timeout=_REQUEST_TIMEOUT, old_style=True)
            except (nats.errors.TimeoutError, asyncio.TimeoutError, nats.errors.NoRespondersError):
                continue
            except nats.errors.Error as e:
                raise Unavailable(f"pull from {subject}: {e}") from e
            if msg.headers and msg.headers.get("Status"):
                continue  # 404 no messages, 408 timeout, 409 consumer busy
            if not msg.reply:
                continue
            try:
                job_id = json.loads(msg.data)["id"]
            except (ValueError, KeyError, TypeError):
                log.error("dropping malformed job message on %s", msg.subject)
                await msg.term()
                continue
            return NatsDelivery(msg, job_id, prio)
        return None

    def work_token(self, tool: str) -> int:
        return self._kick_gen.get(tool, 0)

    async def wait_for_work(self, tool: str, token: int, timeout: float) -> None:
        if tool not in self._kick_subs:
            await self._subscribe_kicks(tool)
        if self._kick_gen.get(tool, 0) != token:
            return
        try:
            await asyncio.wait_for(self._kick_event[tool].wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _subscribe_kicks(self, tool: str) -> None:
        self._kick_gen.setdefault(tool, 0)
        self._kick_event.setdefault(tool, asyncio.Event())

        async def _on_kick(_msg: Msg) -> None:
            self._kick_gen[tool] += 1
            ev = self._kick_event[tool]
            self._kick_event[tool] = asyncio.Event()
            ev.set()

        self._kick_subs[tool] = await self.nc.subscribe(constants.kick_subject(tool), cb=_on_kick)

    async def remove(self, stream_seq: int) -> None:
        try:
            await self._js.delete_msg(constants.JOBS_STREAM, stream_seq)
        except nats.js.errors.NotFoundError:
            pass
        except nats.js.errors.APIError as e:
            if e.code != 404 and e.err_code not in (10037, 10057):
                log.warning("could not remove stream message %s: %s", stream_seq, e)

    async def has_message(self, stream_seq: int) -> bool:
        try:
            await self._js.get_msg(constants.JOBS_STREAM, stream_seq)
        except nats.js.errors.NotFoundError:
            return False
        except nats.js.errors.APIError as e:
            if e.code == 404 or e.err_code == 10037:
                return False
            raise
        return True

    async def backlog(self, tool: str) -> int:
        total = 0
        for prio in constants.PRIORITIES:
            try:
                info = await self._js.consumer_info(constants.JOBS_STREAM, constants.consumer_name(tool, prio))
            except nats.js.errors.NotFoundError:
                continue
            total += (info.num_pending or 0) + (info.num_ack_pending or 0)
        return total

    # -- side channels -------------------------------------------------------------------
    async def nak_subject(self, reply: str) -> None:
        """Hand back a delivery by its ack subject (its worker is known to be dead)."""
        await self.nc.publish(reply, b"-NAK")

    async def publish(self, subject: str, data: dict[str, Any]) -> None:
        await self.nc.publish(subject, json.dumps(data, separators=(",", ":")).encode())

    async def subscribe(self, subject: str) -> NatsSubscription:
        return NatsSubscription(await self.nc.subscribe(subject))
