"""``Bus`` on NATS JetStream (job messages) and core NATS (cancel, events, warm, kicks).

One work-queue stream holds every job, file storage; a tool has one durable pull consumer
per priority (``genq-<tool>-high|normal|low``), so asking them in that order gives the
SPEC's dispatch order (priority, then FIFO). The message id is the job id (publish dedupe),
acks are explicit, ``MaxDeliver`` is the tool's ``maxAttempts``.

An idle worker slot does not spin: after a publish the API sends a kick on
``genq.kick.<tool>`` naming the priority; slots wait for a kick (or a short timeout, in
case one was missed) and then ask the consumers with ``no_wait`` pull requests, which
answer at once.

One pull request per job in a steady flow: a consumer found empty is skipped by later
pulls until a kick for its priority arrives or ``EMPTY_RECHECK_SECONDS`` pass (a nak'ed
retry or an ack-wait redelivery comes back without a kick), and every consumer's pull
requests share one reply subscription instead of a fresh inbox (SUB, PUB, UNSUB) each.

Neighbours: implements :class:`genq.ports.Bus`; :mod:`genq.adapters.nats_server` starts the
embedded server this talks to.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
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
#: keeps every id for the whole window (its memory cost: BENCHMARKS.md §7).
DUPLICATE_WINDOW_SECONDS = 600.0

#: How long a pull trusts that a consumer it found empty is still empty, when no kick for
#: its priority came since. A kick follows every publish; what comes back without one (a
#: nak'ed retry after its delay, an ack-wait redelivery) is found within this time by a
#: busy slot, and by the next idle re-pull of an idle one (every second), so under 1 s.
EMPTY_RECHECK_SECONDS = 0.5

_PULL_ONE = b'{"batch":1,"no_wait":true}'

#: JetStream API error codes (``err_code``) that mean "that message is not there".
#: nats.py names the status codes (``api.StatusCode``) but not these, so they are named here.
#: JSNoMessageFoundErr: a get or delete of a sequence the stream does not hold.
ERR_NO_MESSAGE_FOUND = 10037
#: JSStreamMsgDeleteFailedF: how the server reports a delete of a message already gone.
ERR_MSG_DELETE_FAILED = 10057
#: HTTP-like ``code`` of a JetStream API error for a missing stream, consumer or message.
_NOT_FOUND = 404
#: The header of a status reply to a pull request, and its "no messages" value (nats.py's
#: names, as plain strings: read on every pull).
_STATUS = api.Header.STATUS.value
_NO_MESSAGES = api.StatusCode.NO_MESSAGES.value


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


class _PullInbox:
    """One consumer's reply subject for its pull requests, subscribed once.

    JetStream answers a pull with the job message under the message's own subject (so
    nats-py's muxed request inbox, which routes by subject, cannot take it); here each
    consumer has its own subscription, and each reply goes to the oldest waiting pull of
    that consumer. Any reply answers any pull of the same consumer, so a late reply after
    a timed-out pull is still used; a job message nobody waits for any more is handed back
    (nak) at once rather than left until its ack wait runs out."""

    def __init__(self, api_subject: str):
        self.api_subject = api_subject
        self.subject = ""
        self.sub: Any = None
        self.waiters: collections.deque[asyncio.Future[Msg]] = collections.deque()

    async def subscribe(self, nc: nats.NATS) -> None:
        self.subject = nc.new_inbox()
        self.sub = await nc.subscribe(self.subject, cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(msg)
                return
        if msg.reply and not (msg.headers and msg.headers.get(_STATUS)):
            with contextlib.suppress(Exception):
                await msg.nak()

    async def request(self, nc: nats.NATS, timeout: float) -> Msg:
        fut: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await nc.publish(self.api_subject, _PULL_ONE, reply=self.subject)
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            if not fut.done() or fut.cancelled():
                with contextlib.suppress(ValueError):
                    self.waiters.remove(fut)


class NatsBus:
    def __init__(self, url: str, *, name: str = "genq"):
        self.url = url
        self.name = name
        self._nc: nats.NATS | None = None
        self._js: Any = None
        self._kick_subs: dict[str, Any] = {}
        self._kick_gen: dict[str, int] = {}
        #: Slots waiting for work, per tool: a kick (one published job) wakes one of them.
        self._work_waiters: dict[str, collections.deque[asyncio.Future[None]]] = {}
        #: (tool, priority) -> when a pull last found that consumer empty (monotonic).
        self._empty_at: dict[tuple[str, str], float] = {}
        #: (tool, priority) -> kicks for it so far: a pull that was under way when one came
        #: does not mark the consumer empty on the strength of its (older) answer.
        self._prio_kicks: collections.Counter[tuple[str, str]] = collections.Counter()
        #: (tool, priority) -> the highest stream sequence this bus was handed from that
        #: consumer: a kick for a job at or below it comes after the job was taken.
        self._taken_seq: dict[tuple[str, str], int] = {}
        self._inboxes: dict[tuple[str, str], _PullInbox] = {}
        self._setup_lock = asyncio.Lock()
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
            kick = {"priority": priority, "seq": ack.seq}
            await self.nc.publish(constants.kick_subject(tool), json.dumps(kick, separators=(",", ":")).encode())
        except Exception:  # the kick is an optimisation; slots also poll
            pass
        return ack.seq

    async def pull(self, tool: str) -> NatsDelivery | None:
        """The next job of ``tool`` in dispatch order: ``high``, then ``normal``, then
        ``low``, skipping a consumer found empty since its last kick (for at most
        ``EMPTY_RECHECK_SECONDS``). None if every consumer asked had nothing."""
        nc = self.nc
        if (tool, constants.PRIORITIES[-1]) not in self._inboxes:
            await self._setup_pulls(tool)
        for prio in constants.PRIORITIES:
            key = (tool, prio)
            empty_at = self._empty_at.get(key)
            if empty_at is not None and time.monotonic() - empty_at < EMPTY_RECHECK_SECONDS:
                continue
            inbox = self._inboxes[key]
            kicks = self._prio_kicks[key]
            try:
                msg = await inbox.request(nc, _REQUEST_TIMEOUT)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except nats.errors.Error as e:
                raise Unavailable(f"pull from {inbox.api_subject}: {e}") from e
            status = msg.headers.get(_STATUS) if msg.headers else None
            if status:
                # No messages (or 408 timeout, 409 consumer busy, 503 no responders).
                if status == _NO_MESSAGES and self._prio_kicks[key] == kicks:
                    self._empty_at[key] = time.monotonic()
                continue
            if not msg.reply:
                continue
            # The last message the consumer had (as it said when it sent this one): the
            # next pull need not ask it again unless a kick comes. One request per job,
            # also when jobs trickle in one at a time.
            md = msg.metadata
            if md.num_pending == 0 and self._prio_kicks[key] == kicks:
                self._empty_at[key] = time.monotonic()
            else:
                self._empty_at.pop(key, None)
            if md.num_delivered == 1 and md.sequence.stream > self._taken_seq.get(key, 0):
                self._taken_seq[key] = md.sequence.stream
            try:
                job_id = json.loads(msg.data)["id"]
            except (ValueError, KeyError, TypeError):
                log.error("dropping malformed job message on %s", msg.subject)
                await msg.term()
                continue
            return NatsDelivery(msg, job_id, prio)
        return None

    async def _setup_pulls(self, tool: str) -> None:
        """The kick subscription (empty marks are only trusted while kicks are heard) and
        one reply subscription per consumer, once per tool."""
        async with self._setup_lock:
            try:
                if tool not in self._kick_subs:
                    await self._subscribe_kicks(tool)
                for prio in constants.PRIORITIES:
                    if (tool, prio) not in self._inboxes:
                        inbox = _PullInbox(constants.consumer_next_subject(tool, prio))
                        await inbox.subscribe(self.nc)
                        self._inboxes[(tool, prio)] = inbox
            except nats.errors.Error as e:
                raise Unavailable(f"pull setup for {tool}: {e}") from e

    def _may_have_work(self, key: tuple[str, str]) -> None:
        self._prio_kicks[key] += 1
        self._empty_at.pop(key, None)

    def work_token(self, tool: str) -> int:
        return self._kick_gen.get(tool, 0)

    async def wait_for_work(self, tool: str, token: int, timeout: float) -> None:
        """Return at once if a kick came since ``token``; else when a kick wakes this
        caller, or after ``timeout``. A kick announces one job, so it wakes one waiting
        slot, not all of them: idle slots do not all rush to pull the same job."""
        if tool not in self._kick_subs:
            async with self._setup_lock:
                if tool not in self._kick_subs:
                    await self._subscribe_kicks(tool)
        if self._kick_gen.get(tool, 0) != token:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._work_waiters.setdefault(tool, collections.deque())
        waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            pass
        finally:
            if not fut.done() or fut.cancelled():
                with contextlib.suppress(ValueError):
                    waiters.remove(fut)

    async def _subscribe_kicks(self, tool: str) -> None:
        self._kick_gen.setdefault(tool, 0)

        async def _on_kick(msg: Msg) -> None:
            # {"priority": "high", "seq": <stream sequence>}; a kick naming no priority
            # (older genq) means any.
            try:
                kick = json.loads(msg.data)
                prio, seq = kick.get("priority"), kick.get("seq")
            except (ValueError, AttributeError):
                prio = seq = None
            if isinstance(seq, int) and seq <= self._taken_seq.get((tool, prio), 0):
                return  # its job was handed to this bus already (consumers go in order)
            for p in (prio,) if prio in constants.PRIORITIES else constants.PRIORITIES:
                self._may_have_work((tool, p))
            self._kick_gen[tool] += 1
            waiters = self._work_waiters.get(tool)
            while waiters:
                fut = waiters.popleft()
                if not fut.done():
                    fut.set_result(None)
                    break

        self._kick_subs[tool] = await self.nc.subscribe(constants.kick_subject(tool), cb=_on_kick)

    async def remove(self, stream_seq: int) -> None:
        """Best effort (a cancelled job's message): a failure is logged, never raised."""
        try:
            await self.delete_message(stream_seq)
        except nats.js.errors.APIError as e:
            log.warning("could not remove stream message %s: %s", stream_seq, e)

    async def has_message(self, stream_seq: int) -> bool:
        return await self._get_msg(stream_seq) is not None

    async def _get_msg(self, stream_seq: int) -> Any:
        try:
            return await self._js.get_msg(constants.JOBS_STREAM, stream_seq)
        except nats.js.errors.NotFoundError:
            return None
        except nats.js.errors.APIError as e:
            if e.code == _NOT_FOUND or e.err_code == ERR_NO_MESSAGE_FOUND:
                return None
            raise

    async def message_job_id(self, stream_seq: int) -> str | None:
        msg = await self._get_msg(stream_seq)
        if msg is None:
            return None
        try:
            return str(json.loads(msg.data)["id"])
        except (ValueError, KeyError, TypeError):
            return None

    async def delete_message(self, stream_seq: int) -> None:
        """Delete message ``stream_seq``; gone already is fine, other API errors raise."""
        try:
            await self._js.delete_msg(constants.JOBS_STREAM, stream_seq)
        except nats.js.errors.NotFoundError:
            pass
        except nats.js.errors.APIError as e:
            if not (e.code == _NOT_FOUND or e.err_code in (ERR_NO_MESSAGE_FOUND, ERR_MSG_DELETE_FAILED)):
                raise

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
