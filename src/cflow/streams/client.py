"""Thin adapter over nats-py: connect, create resources, append and read events, raw KV.

Every message is built by a pure function (:func:`build_append`,
:func:`build_kv_put`) and sent with one awaited publish; every NATS exception is
translated by :mod:`cflow.streams.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from cflow import events as ev
from cflow.errors import (
    CflowError,
    ConcurrencyConflict,
    InvalidInput,
    MalformedEvent,
    NotFound,
    Unavailable,
)
from cflow.hlc import HybridClock, Timestamp
from cflow.streams import names
from cflow.streams.definitions import StreamSpec, swarm_resources
from cflow.streams.errors import STREAM_NAME_IN_USE, nats_errors, translate

DEFAULT_URL = "nats://127.0.0.1:4222"
MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
TTL = "Nats-TTL"
MARKER_REASON = "Nats-Marker-Reason"
KV_OPERATION = "KV-Operation"


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def split_urls(url: str | Sequence[str]) -> list[str]:
    if isinstance(url, str):
        return [u.strip() for u in url.split(",") if u.strip()]
    return list(url)


async def connect(
    url: str | Sequence[str] = DEFAULT_URL,
    *,
    name: str = "cflow",
    connect_timeout: float = 2.0,
    **options: Any,
) -> NATS:
    """Connect with the settings a coordinator needs.

    Unlimited reconnects (a coordinator outlives server restarts), a short ping
    interval (a dead server is noticed in seconds), and several seed URLs.

    Raises:
        Unavailable: no server answered within ``connect_timeout``.
    """
    servers = split_urls(url)
    shown = ",".join(redact_url(s) for s in servers)
    user_error_cb = options.pop("error_cb", _quiet)
    connecting: list[BaseException] = []

    async def on_error(exc: Exception) -> None:
        if not connected:
            connecting.append(exc)
        await user_error_cb(exc)

    connected = False
    try:
        # nats-py retries the *first* connect forever when max_reconnect_attempts
        # is -1; give up after two tries per server, then reconnect forever.
        nc = await nats.connect(
            servers=servers,
            name=name,
            connect_timeout=connect_timeout,
            allow_reconnect=True,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.25,
            ping_interval=5,
            max_outstanding_pings=3,
            dont_randomize=False,
            **{"error_cb": on_error, "disconnected_cb": _quiet_noargs, **options},
        )
    except (nats.errors.NoServersError, OSError, TimeoutError, nats.errors.Error):
        if any(_is_auth_failure(e) for e in connecting):
            raise Unavailable(
                f"NATS at {shown} refused the credentials (authorization violation)",
                url=shown,
            ) from None
        raise Unavailable(
            f"no NATS server reachable at {shown} (start one with `cfctl up`)",
            url=shown,
        ) from None
    connected = True
    nc.options["max_reconnect_attempts"] = -1
    return nc


def _is_auth_failure(exc: BaseException) -> bool:
    # The protocol's -ERR carries no code; this is the text nats-py itself matches.
    from nats.protocol.parser import AUTHORIZATION_VIOLATION

    return isinstance(exc, nats.errors.AuthorizationError) or (
        isinstance(exc, nats.errors.Error) and AUTHORIZATION_VIOLATION in str(exc).lower()
    )


def redact_url(url: str) -> str:
    """``nats://user:secret@host`` -> ``nats://user:***@host`` for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in userinfo else f"{scheme}://***@{host}"


async def _quiet(exc: Exception) -> None:
    return None


async def _quiet_noargs() -> None:
    return None


async def api_request(nc: NATS, subject: str, payload: dict[str, Any] | None = None,
                      timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109 - nats-py's own
    """One JetStream API request; errors in the JSON reply are raised translated."""
    data = json.dumps(payload).encode() if payload is not None else b""
    with nats_errors(subject):
        reply = await nc.request(subject, data, timeout=timeout)
    body: dict[str, Any] = json.loads(reply.data)
    if "error" in body:
        err = body["error"]
        raise translate(
            nats.js.errors.APIError(
                code=err.get("code"), err_code=err.get("err_code"),
                description=err.get("description"),
            ),
            subject=subject,
        )
    return body


async def ensure_stream(nc: NATS, spec: StreamSpec) -> dict[str, Any]:
    """Create the stream, or update it to ``spec`` if it exists (idempotent)."""
    config = spec.config()
    try:
        return await api_request(nc, f"$JS.API.STREAM.CREATE.{spec.name}", config)
    except CflowError as exc:
        cause = exc.__cause__ or exc.__context__
        exists = isinstance(cause, nats.js.errors.APIError) and cause.err_code == STREAM_NAME_IN_USE
        if not exists and "already in use" not in str(exc):
            raise
    # A client connecting with the default replicas=1 must never shrink a
    # stream that `cfctl init --replicas 3` spread over the cluster.
    current = await api_request(nc, f"$JS.API.STREAM.INFO.{spec.name}")
    have = int(current.get("config", {}).get("num_replicas", 1))
    config["num_replicas"] = max(have, spec.replicas)
    return await api_request(nc, f"$JS.API.STREAM.UPDATE.{spec.name}", config)


async def ensure_swarm(nc: NATS, swarm: str, replicas: int = 1) -> list[str]:
    """Create or update every stream and bucket of ``swarm``; returns their names."""
    made = []
    for spec in swarm_resources(swarm, replicas):
        await ensure_stream(nc, spec)
        made.append(spec.name)
    return made


# ------------------------------------------------------------------ pure builders


@dataclass(frozen=True)
class Outgoing:
    subject: str
    headers: dict[str, str]
    payload: bytes


def build_append(
    event: ev.Event, *, expected_last_seq: int | None = None, msg_id: str | None = None
) -> Outgoing:
    """Subject, headers and payload for one event append (pure)."""
    headers = {MSG_ID: msg_id or event.id}
    if expected_last_seq is not None:
        headers[EXPECTED_LAST_SUBJECT_SEQ] = str(expected_last_seq)
    return Outgoing(
        subject=names.event_subject(event.swarm, event.entity_kind, event.entity_id),
        headers=headers,
        payload=ev.encode(event),
    )


def ttl_header(ttl_s: float) -> str:
    """JetStream per-message TTLs are whole seconds, at least 1."""
    return f"{max(1, math.ceil(ttl_s))}s"


def build_kv_put(
    bucket: str,
    key: str,
    value: bytes,
    *,
    expected_revision: int | None = None,
    ttl_s: float | None = None,
    msg_id: str | None = None,
) -> Outgoing:
    headers: dict[str, str] = {}
    if expected_revision is not None:
        headers[EXPECTED_LAST_SUBJECT_SEQ] = str(expected_revision)
    if ttl_s is not None:
        headers[TTL] = ttl_header(ttl_s)
    if msg_id is not None:
        headers[MSG_ID] = msg_id
    return Outgoing(names.kv_subject(bucket, key), headers, value)


def build_kv_delete(bucket: str, key: str, *, expected_revision: int | None = None,
                    purge: bool = False) -> Outgoing:
    headers = {KV_OPERATION: "PURGE" if purge else "DEL"}
    if purge:
        headers["Nats-Rollup"] = "sub"
    if expected_revision is not None:
        headers[EXPECTED_LAST_SUBJECT_SEQ] = str(expected_revision)
    return Outgoing(names.kv_subject(bucket, key), headers, b"")


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class Appended:
    seq: int
    duplicate: bool
    event: ev.Event


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    subject: str
    event: ev.Event


@dataclass(frozen=True)
class BadMessage:
    """A message on an event subject that did not decode; projector quarantines it."""

    seq: int
    subject: str
    raw: bytes
    error: str


@dataclass(frozen=True)
class KvEntry:
    key: str
    revision: int
    value: bytes
    operation: str  # PUT, DEL, PURGE, or MARKER (server removed it after its TTL)
    headers: dict[str, str]

    @property
    def live(self) -> bool:
        return self.operation == "PUT"


async def publish(js: JetStreamContext, out: Outgoing, *, timeout: float = 5.0,  # noqa: ASYNC109
                  expected: int | None = None) -> tuple[int, bool]:
    """One awaited JetStream publish; returns (sequence, duplicate)."""
    with nats_errors(out.subject, expected):
        # nats-py mutates the headers dict it is given: hand it a fresh copy.
        ack = await js.publish(out.subject, out.payload, timeout=timeout, headers=dict(out.headers))
    return int(ack.seq), bool(ack.duplicate)


def _entry_from_raw(bucket: str, raw: Any) -> KvEntry:
    headers: dict[str, str] = dict(raw.headers or {})
    prefix = f"$KV.{bucket}."
    key = str(raw.subject)[len(prefix):]
    op = "MARKER" if MARKER_REASON in headers else headers.get(KV_OPERATION, "PUT")
    return KvEntry(key, int(raw.seq), bytes(raw.data or b""), op, headers)


class EventLog:
    """Append, read and follow one swarm's events; raw KV for its buckets.

    One instance per process and swarm. It owns the process's HLC: every append
    is stamped by it, every event read is merged into it (receive rule).
    """

    def __init__(self, nc: NATS, swarm: str, *, node: str | None = None,
                 actor: str = "cfctl", max_offset_ms: int = 500) -> None:
        ev.check_token(swarm, "swarm")
        self.nc = nc
        self.js = nc.jetstream(timeout=5.0)
        self.swarm = swarm
        self.actor = actor
        self.stream = names.events_stream(swarm)
        self.clock = HybridClock(node or f"{socket.gethostname()}-{os.getpid()}",
                                 max_offset_ms=max_offset_ms)
        self.clock_refusals = 0

    # -- clock

    def stamp(self) -> str:
        return str(self.clock.now(wall_ms()))

    def observe(self, hlc: str) -> None:
        """Receive rule. A stamp too far ahead is counted and ignored, never adopted."""
        try:
            self.clock.observe(Timestamp.parse(hlc), wall_ms())
        except CflowError:
            self.clock_refusals += 1

    # -- append

    def event(self, data: ev.EventData, entity_id: str, *, actor: str | None = None,
              event_id: str | None = None, causation_id: str | None = None,
              correlation_id: str | None = None) -> ev.Event:
        return ev.make_event(
            data, swarm=self.swarm, entity_id=entity_id, hlc=self.stamp(),
            actor=actor or self.actor, event_id=event_id, causation_id=causation_id,
            correlation_id=correlation_id,
        )

    async def append(
        self,
        data: ev.EventData,
        entity_id: str,
        *,
        expected: int | None = None,
        msg_id: str | None = None,
        actor: str | None = None,
        event_id: str | None = None,
        causation_id: str | None = None,
        correlation_id: str | None = None,
    ) -> Appended:
        """Append one event on its entity's subject.

        With ``expected``, the append succeeds only if the entity's last sequence
        is exactly that (0: the entity has no events yet). A publish that times out
        is retried once with the same Msg-Id, then read back before deciding.

        Raises:
            ConcurrencyConflict: the entity moved on since ``expected``.
            Unavailable: NATS did not answer and the read-back found nothing.
        """
        event = self.event(data, entity_id, actor=actor, event_id=event_id,
                           causation_id=causation_id, correlation_id=correlation_id)
        return await self.append_event(event, expected=expected, msg_id=msg_id)

    async def append_event(self, event: ev.Event, *, expected: int | None = None,
                           msg_id: str | None = None) -> Appended:
        out = build_append(event, expected_last_seq=expected, msg_id=msg_id)
        mid = out.headers[MSG_ID]
        for attempt in range(3):
            try:
                seq, dup = await publish(self.js, out, expected=expected)
                return Appended(seq, dup, event)
            except Unavailable:
                if attempt == 2:
                    found = await self._read_back(out.subject, mid)
                    if found is not None:
                        return Appended(found, True, event)
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
            except ConcurrencyConflict as conflict:
                # A first try that timed out may have landed; the retry then
                # reports a wrong last sequence although the write is ours; so may a
                # caller's retry under a deterministic Msg-Id. A fresh event on its
                # first try cannot be there yet: skip the read-back round trip.
                if attempt > 0 or msg_id is not None:
                    found = await self._read_back(out.subject, mid)
                    if found is not None:
                        return Appended(found, True, event)
                actual = await self.last_seq_subject(out.subject)
                raise ConcurrencyConflict(out.subject, expected, actual) from conflict
        raise AssertionError("unreachable")

    async def _read_back(self, subject: str, msg_id: str) -> int | None:
        try:
            raw = await self._direct_last(self.stream, subject)
        except (NotFound, Unavailable):
            return None
        if raw is not None and (raw.headers or {}).get(MSG_ID) == msg_id:
            return int(raw.seq)
        return None

    async def append_many(self, items: Sequence[tuple[ev.Event, int | None]],
                          *, ack_wait_s: float = 10.0) -> list[int]:
        """Bulk append: publish every message in order, then wait for all acks at once.

        This is what ``js.publish_async`` does, on a reply subscription of our
        own: nats-py 2.16's ``publish_async`` never resolves a future whose ack
        is an error (its reply callback raises), so one conflict would hang the
        batch forever. Each message keeps its Msg-Id, so a batch can be retried.

        Raises:
            ConcurrencyConflict: the first item whose expectation failed (items
                before and after it may have been stored).
            Unavailable: no ack for the whole batch within ``ack_wait_s``.
        """
        if not items:
            return []
        outs = [build_append(event, expected_last_seq=expected) for event, expected in items]
        prefix = f"{self.nc.new_inbox()}."
        loop = asyncio.get_running_loop()
        acks: list[asyncio.Future[Msg]] = [loop.create_future() for _ in outs]

        async def on_ack(msg: Msg) -> None:
            index = msg.subject[len(prefix):]
            if index.isdigit() and int(index) < len(acks) and not acks[int(index)].done():
                acks[int(index)].set_result(msg)

        with nats_errors(self.stream):
            sub = await self.nc.subscribe(f"{prefix}*", cb=on_ack)
            try:
                for index, out in enumerate(outs):
                    await self.nc.publish(out.subject, out.payload, reply=f"{prefix}{index}",
                                          headers=dict(out.headers))
                await self.nc.flush()
                async with asyncio.timeout(ack_wait_s):
                    replies = await asyncio.gather(*acks)
            finally:
                with contextlib.suppress(nats.errors.Error, OSError):
                    await sub.unsubscribe()
        seqs = []
        for (_, expected), out, reply in zip(items, outs, replies, strict=True):
            seqs.append(await self._ack_seq(reply, out.subject, expected))
        return seqs

    async def _ack_seq(self, reply: Msg, subject: str, expected: int | None) -> int:
        """The stream sequence in a publish ack, or the ack's error translated."""
        if (reply.headers or {}).get("Status") == "503":
            raise translate(nats.errors.NoRespondersError(), subject=subject)
        body: dict[str, Any] = json.loads(reply.data)
        err = body.get("error")
        if err is None:
            return int(body["seq"])
        failure = translate(
            nats.js.errors.APIError(code=err.get("code"), err_code=err.get("err_code"),
                                    description=err.get("description")),
            subject=subject, expected=expected,
        )
        if isinstance(failure, ConcurrencyConflict):
            actual = await self.last_seq_subject(subject)
            raise ConcurrencyConflict(subject, expected, actual)
        raise failure

    # -- read

    async def _direct_last(self, stream: str, subject: str) -> Any:
        try:
            with nats_errors(subject):
                return await self.js.get_msg(stream, subject=subject, direct=True)
        except NotFound:
            return None

    async def last_seq_subject(self, subject: str) -> int:
        raw = await self._direct_last(self.stream, subject)
        return 0 if raw is None else int(raw.seq)

    async def last_seq(self, kind: str, entity_id: str) -> int:
        return await self.last_seq_subject(names.event_subject(self.swarm, kind, entity_id))

    async def get(self, seq: int) -> StoredEvent | BadMessage:
        with nats_errors(self.stream):
            raw = await self.js.get_msg(self.stream, seq=seq, direct=True)
        return self._decode(int(raw.seq or 0), str(raw.subject), bytes(raw.data or b""))

    def _decode(self, seq: int, subject: str, data: bytes) -> StoredEvent | BadMessage:
        try:
            event = ev.decode(data, subject)
        except MalformedEvent as exc:
            return BadMessage(seq, subject, data, str(exc))
        self.observe(event.hlc)
        return StoredEvent(seq, subject, event)

    async def entity_events(self, kind: str, entity_id: str) -> list[StoredEvent]:
        """Every event of one entity in order (direct gets, next-by-subject)."""
        subject = names.event_subject(self.swarm, kind, entity_id)
        out: list[StoredEvent] = []
        seq = 1
        while True:
            try:
                with nats_errors(subject):
                    raw = await self.js.get_msg(self.stream, seq=seq, subject=subject,
                                                next=True, direct=True)
            except NotFound:
                return out
            item = self._decode(int(raw.seq or 0), str(raw.subject), bytes(raw.data or b""))
            if isinstance(item, StoredEvent):
                out.append(item)
            seq = int(raw.seq or 0) + 1

    async def stream_last_seq(self) -> int:
        info = await api_request(self.nc, f"$JS.API.STREAM.INFO.{self.stream}")
        return int(info["state"]["last_seq"])

    async def follow(
        self,
        filter_subject: str | None = None,
        *,
        start_seq: int = 1,
        caught_up: asyncio.Event | None = None,
    ) -> AsyncGenerator[StoredEvent | BadMessage, None]:
        """Read from ``start_seq`` and keep following new events (ordered push consumer).

        ``caught_up`` is set together with the last item stored when the consumer
        was created: just before that item is yielded (at once if there is none).
        The ordered consumer recreates itself after gaps or
        reconnects, so the sequence seen here never skips or repeats.
        """
        subject = filter_subject or names.events_filter(self.swarm)
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start_seq > 1 else DeliverPolicy.ALL,
            opt_start_seq=start_seq if start_seq > 1 else None,
            headers_only=False,
        )
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_msg(msg: Msg) -> None:
            await queue.put(msg)

        with nats_errors(subject):
            sub = await self.js.subscribe(subject, cb=on_msg, ordered_consumer=True,
                                          config=config, stream=self.stream)
        try:
            if caught_up is not None:
                with nats_errors(subject):
                    info = await sub.consumer_info()
                # Only "nothing pending and nothing delivered yet" means empty: with
                # everything already delivered but not yet queued, num_pending is 0
                # too; then the last message's own num_pending == 0 sets it below.
                delivered = info.delivered.consumer_seq if info.delivered else 0
                if info.num_pending == 0 and not delivered and queue.empty():
                    caught_up.set()
            last = start_seq - 1
            while True:
                msg = await queue.get()
                meta = msg.metadata
                seq = int(meta.sequence.stream)
                if seq <= last:
                    if caught_up is not None and meta.num_pending == 0:
                        caught_up.set()  # a redelivered tail still means "caught up"
                    continue
                last = seq
                item = self._decode(seq, msg.subject, msg.data)
                # Set before yielding, so the consumer sees it with the last stored item.
                if caught_up is not None and not caught_up.is_set() and meta.num_pending == 0:
                    caught_up.set()
                yield item
        finally:
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()

    async def read(self, filter_subject: str | None = None, *, start_seq: int = 1
                   ) -> list[StoredEvent | BadMessage]:
        """Everything stored now (from ``start_seq``), then stop."""
        end = await self.stream_last_seq()
        out: list[StoredEvent | BadMessage] = []
        if end < start_seq:
            return out
        # Nothing matches: following would wait for a first message forever.
        subject = filter_subject or names.events_filter(self.swarm)
        try:
            with nats_errors(subject):
                await self.js.get_msg(self.stream, seq=start_seq, subject=subject, next=True,
                                      direct=True)
        except NotFound:
            return out
        done = asyncio.Event()
        agen = self.follow(filter_subject, start_seq=start_seq, caught_up=done)
        try:
            async for item in agen:
                out.append(item)
                if done.is_set() or item.seq >= end:
                    break
        finally:
            await agen.aclose()
        return out

    # -- raw KV (leases, presence, ...)

    def bucket(self, name: str) -> str:
        return names.bucket(self.swarm, name)

    async def kv_last(self, bucket: str, key: str) -> KvEntry | None:
        """The raw last message of a key, marker and tombstone included."""
        raw = await self._direct_last(names.kv_stream(bucket), names.kv_subject(bucket, key))
        return None if raw is None else _entry_from_raw(bucket, raw)

    async def kv_put(self, bucket: str, key: str, value: bytes, *,
                     expected_revision: int | None = None, ttl_s: float | None = None,
                     msg_id: str | None = None) -> int:
        out = build_kv_put(bucket, key, value, expected_revision=expected_revision,
                           ttl_s=ttl_s, msg_id=msg_id)
        seq, _ = await publish(self.js, out, expected=expected_revision)
        return seq

    async def kv_delete(self, bucket: str, key: str, *, expected_revision: int | None = None,
                        purge: bool = False) -> int:
        out = build_kv_delete(bucket, key, expected_revision=expected_revision, purge=purge)
        seq, _ = await publish(self.js, out, expected=expected_revision)
        return seq

    @contextlib.asynccontextmanager
    async def kv_subscription(
        self, bucket: str, *, last_per_subject: bool = False
    ) -> AsyncIterator[tuple[asyncio.Queue[Msg], Any]]:
        """An ordered push consumer on a KV bucket, feeding a queue; unsubscribed on exit.

        Delivers new messages only, or with ``last_per_subject`` the current entry of
        every key first. A key removed by its TTL arrives as a message with a
        ``Nats-Marker-Reason`` header (the server's marker).
        """
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_msg(msg: Msg) -> None:
            await queue.put(msg)

        subject = f"$KV.{bucket}.>"
        policy = DeliverPolicy.LAST_PER_SUBJECT if last_per_subject else DeliverPolicy.NEW
        with nats_errors(subject):
            sub = await self.js.subscribe(subject, cb=on_msg, ordered_consumer=True,
                                          config=ConsumerConfig(deliver_policy=policy),
                                          stream=names.kv_stream(bucket))
        try:
            yield queue, sub
        finally:
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()

    async def kv_keys(self, bucket: str) -> list[KvEntry]:
        """Last entry of every key in a bucket (live or not)."""
        stream = names.kv_stream(bucket)
        info = await api_request(self.nc, f"$JS.API.STREAM.INFO.{stream}")
        if int(info["state"]["messages"]) == 0:
            return []
        out: list[KvEntry] = []
        async with self.kv_subscription(bucket, last_per_subject=True) as (queue, sub):
            with nats_errors(bucket):
                info_c = await sub.consumer_info()
            delivered = info_c.delivered.consumer_seq if info_c.delivered else 0
            if info_c.num_pending == 0 and not delivered and queue.empty():
                return out  # delivered-but-not-queued also shows num_pending 0: see follow()
            try:
                while True:
                    msg = await asyncio.wait_for(queue.get(), timeout=5.0)
                    headers = dict(msg.headers or {})
                    op = "MARKER" if MARKER_REASON in headers else headers.get(KV_OPERATION,
                                                                                 "PUT")
                    out.append(KvEntry(msg.subject[len(f"$KV.{bucket}."):],
                                       int(msg.metadata.sequence.stream), bytes(msg.data), op,
                                       headers))
                    if msg.metadata.num_pending == 0:
                        return out
            except TimeoutError:
                raise Unavailable(f"timed out listing bucket {bucket}") from None


def require_positive(value: float, what: str) -> float:
    if value <= 0:
        raise InvalidInput(f"{what} must be > 0")
    return value
