"""Thin adapter over nats-py: connect, create resources, append and read events, raw KV.

Every message is built by a pure function (:func:`build_append`,
:func:`build_kv_put`) and sent with one awaited publish; every NATS exception is
translated by :mod:`cflow.streams.errors`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import random
import socket
import time
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Sequence,
)
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from cflow import events as ev
from cflow.background import stop_tasks
from cflow.errors import (
    CflowError,
    ClockOffsetError,
    ConcurrencyConflict,
    InvalidInput,
    MalformedEvent,
    NotFound,
    Unavailable,
)
from cflow.hlc import LOGICAL_MAX, HybridClock, Timestamp
from cflow.streams import names
from cflow.streams.acks import js_publish
from cflow.streams.definitions import StreamSpec, ephemeral_bucket, swarm_resources
from cflow.streams.errors import (
    NO_MESSAGE_FOUND,
    STREAM_NAME_IN_USE,
    nats_errors,
    retryable,
    translate,
)
from cflow.streams.server_clock import ServerClock

DEFAULT_URL = "nats://127.0.0.1:4222"
MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
TTL = "Nats-TTL"
MARKER_REASON = "Nats-Marker-Reason"
KV_OPERATION = "KV-Operation"
DEFAULT_RETRY_S = 12.0  # how long a read or write retries through an election
EXPLAIN_TIMEOUT_S = 1.5  # the STREAM.INFO that tells why a stream does not answer
CONSUMER_CREATE_S = 1.5  # one try at creating an ordered consumer (placed on a random replica)
FILL_WAIT_S = 0.02  # follow_batches: the longest wait for more of a backlog
REPLICAS_TTL_S = 30.0  # how long a stream's replica count is trusted (R1 -> R3 upgrades)

T = TypeVar("T")
log = logging.getLogger(__name__)


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
    user_reconnected_cb = options.pop("reconnected_cb", _quiet_noargs)
    connecting: list[BaseException] = []

    async def on_error(exc: Exception) -> None:
        if not connected:
            connecting.append(exc)
        await user_error_cb(exc)

    async def on_reconnected() -> None:
        for wake in list(_reconnect_waiters.get(nc, ())):
            wake()
        await user_reconnected_cb()

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
            **{"error_cb": on_error, "disconnected_cb": _quiet_noargs,
               "reconnected_cb": on_reconnected, **options},
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


# Per connection made by :func:`connect`: what to call once it has reconnected.
_reconnect_waiters: weakref.WeakKeyDictionary[NATS, set[Callable[[], None]]] = (
    weakref.WeakKeyDictionary())


@contextlib.contextmanager
def on_reconnect(nc: NATS, wake: Callable[[], None]) -> Iterator[None]:
    """Call ``wake`` (synchronously, from nats-py's callback) each time ``nc``
    reconnects, while inside the block. Connections not made by :func:`connect`
    never call it."""
    waiters = _reconnect_waiters.setdefault(nc, set())
    waiters.add(wake)
    try:
        yield
    finally:
        waiters.discard(wake)


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


UNSUBSCRIBE_S = 2.0  # a follower's teardown never waits longer than this on NATS


async def _unsubscribe(sub: Any) -> None:
    """Drop a subscription, best effort and bounded: a teardown (cancellation, shutdown)
    must not hang on a connection that is stalled or gone."""
    try:
        with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
            await asyncio.wait_for(sub.unsubscribe(), UNSUBSCRIBE_S)
    finally:
        # nats-py stops an ordered consumer's heartbeat monitor only once its
        # unsubscribe succeeded; left running, it would "reset" the consumer after
        # two missed heartbeats: subscribe again and create a new server consumer.
        jsi = getattr(getattr(sub, "_sub", None), "_jsi", None)
        for task in (getattr(jsi, "_hbtask", None), getattr(jsi, "_fctask", None)):
            if isinstance(task, asyncio.Task):
                task.cancel()


async def _quiet(exc: Exception) -> None:
    return None


async def _quiet_noargs() -> None:
    return None


async def api_request(nc: NATS, subject: str, payload: dict[str, Any] | None = None,
                      timeout: float = 5.0, *,  # noqa: ASYNC109 - nats-py's own
                      retry_s: float = 0.0) -> dict[str, Any]:
    """One JetStream API request; errors in the JSON reply are raised translated.

    With ``retry_s`` a retryable failure (no leader, timeout, ...) is retried
    with backoff for that long before it is raised.
    """
    data = json.dumps(payload).encode() if payload is not None else b""
    attempts = Attempts(retry_s, timeout)
    while True:
        try:
            with nats_errors(subject):
                reply = await nc.request(subject, data, timeout=attempts.timeout())
            return _api_body(reply, subject)
        except Unavailable as exc:
            if not retryable(exc) or not await attempts.pause():
                raise


def _api_body(reply: Msg, subject: str) -> dict[str, Any]:
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


class Attempts:
    """Bounded retries of one operation through an election: a deadline and backoff.

    ``timeout()`` is the time the next try may take (never past the deadline by
    much); ``pause()`` sleeps before the next try and is False once the budget
    is spent. Backoff doubles from 50 ms to 1 s, with jitter, so a herd of
    clients does not hammer a new leader in step.
    """

    def __init__(self, budget_s: float, per_try_s: float) -> None:
        self.started = time.monotonic()
        self.budget_s = max(0.0, budget_s)
        self.deadline = self.started + self.budget_s
        self.per_try_s = per_try_s
        self.delay = 0.05
        self.tries = 1
        self.checked = False  # whether the target's existence was checked

    def timeout(self) -> float:
        if not self.budget_s:
            return self.per_try_s  # one try: it gets its whole time
        return max(0.25, min(self.per_try_s, self.deadline - time.monotonic()))

    def waited_s(self) -> float:
        return time.monotonic() - self.started

    async def pause(self) -> bool:
        left = self.deadline - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(left, self.delay * (0.5 + random.random() / 2)))  # noqa: S311
        self.delay = min(1.0, self.delay * 2)
        self.tries += 1
        return True


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
    # JetStream cannot change a stream's storage type: a stream created by an
    # older cflow (leases on file) keeps what it has.
    config["storage"] = current.get("config", {}).get("storage", config["storage"])
    return await api_request(nc, f"$JS.API.STREAM.UPDATE.{spec.name}", config)


async def ensure_swarm(nc: NATS, swarm: str, replicas: int = 1) -> list[str]:
    """Create or update every stream and bucket of ``swarm``; returns their names.

    One look first: a ``STREAM.INFO`` per resource, sent together (the requests
    an agent's credentials allow; ``STREAM.LIST`` would show it every swarm), so
    the usual case (all there, as configured) costs one round trip instead of a
    create per resource in turn. Only a resource that is missing, or differs
    from its spec, goes through :func:`ensure_stream`.
    """
    specs = swarm_resources(swarm, replicas)
    have = await _stream_configs(nc, [spec.name for spec in specs])
    for spec in specs:
        current = have.get(spec.name)
        if current is None or not satisfies(current, spec):
            await ensure_stream(nc, spec)
    return [spec.name for spec in specs]


async def _stream_configs(nc: NATS, streams: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Configurations by name of those of ``streams`` that exist.

    Best effort: a stream not found, or an info request that failed, is left
    out, and the caller then creates or updates it as before.
    """
    replies = await asyncio.gather(
        *(api_request(nc, f"$JS.API.STREAM.INFO.{name}") for name in streams),
        return_exceptions=True)
    found: dict[str, dict[str, Any]] = {}
    for name, reply in zip(streams, replies, strict=True):
        if isinstance(reply, CflowError):
            continue
        if isinstance(reply, BaseException):
            raise reply
        found[name] = reply.get("config") or {}
    return found


def satisfies(current: dict[str, Any], spec: StreamSpec) -> bool:
    """Whether a stream's configuration already is what ``ensure_stream`` would make.

    Replicas may be more than asked (R3 never shrinks) and the storage type is
    kept whatever it is (JetStream cannot change it), as in ``ensure_stream``.
    """
    want = spec.config()
    want.setdefault("allow_msg_ttl", False)
    want.setdefault("subject_delete_marker_ttl", 0)
    for key, value in want.items():
        if key == "storage":
            continue
        if key == "num_replicas":
            if int(current.get(key) or 1) < int(value):  # type: ignore[call-overload]
                return False
        elif (current.get(key) or type(value)()) != value:
            return False
    return True


# ------------------------------------------------------------------ pure builders


# The value types below are Structs, not dataclasses: a tenth of the cost to define
# when a command imports this module (issue 18).
class Outgoing(msgspec.Struct, frozen=True):
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
                    purge: bool = False, msg_id: str | None = None) -> Outgoing:
    headers = {KV_OPERATION: "PURGE" if purge else "DEL"}
    if purge:
        headers["Nats-Rollup"] = "sub"
    if expected_revision is not None:
        headers[EXPECTED_LAST_SUBJECT_SEQ] = str(expected_revision)
    if msg_id is not None:
        headers[MSG_ID] = msg_id
    return Outgoing(names.kv_subject(bucket, key), headers, b"")


# ------------------------------------------------------------- raw stored messages


class RawMessage(msgspec.Struct, frozen=True):
    """One stored message as a get returns it (direct or from the stream leader)."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]
    time_ms: int  # the server's storage timestamp, ms since the epoch


def iso_ms(text: str) -> int:
    """``2026-12-02T06:05:09.261928948Z`` (the server's RFC 3339, ns) -> ms since the epoch."""
    text = text.strip()
    if text.endswith("Z"):
        text = text[:-1]
        offset = ""
    else:
        cut = max(text.rfind("+"), text.rfind("-"))
        offset = text[cut:] if cut > 10 else ""
        text = text[: len(text) - len(offset)]
    whole, _, frac = text.partition(".")
    seconds = datetime.fromisoformat(whole + (offset or "+00:00")).timestamp()
    return int(seconds) * 1000 + int((frac[:3] or "0").ljust(3, "0"))


def datetime_ms(at: datetime | None) -> int:
    """An aware datetime (nats-py's message metadata) -> ms since the epoch, exactly."""
    if at is None:
        return 0
    return (at - EPOCH) // timedelta(milliseconds=1)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def msg_time_ms(msg: Msg) -> int:
    """Storage timestamp of a message delivered by a push consumer (0 if it has none)."""
    try:
        return datetime_ms(msg.metadata.timestamp)
    except (nats.errors.Error, ValueError, IndexError):
        return 0


def parse_headers(block: bytes) -> dict[str, str]:
    """``NATS/1.0\\r\\nKey: value\\r\\n\\r\\n`` -> {key: value} (the last value of a key wins)."""
    out: dict[str, str] = {}
    for line in block.decode(errors="replace").split("\r\n")[1:]:
        key, sep, value = line.partition(":")
        if sep and key:
            out[key.strip()] = value.strip()
    return out


def raw_from_direct(reply: Msg) -> RawMessage | None:
    """A direct-get reply as a message; None for 404 (no such message).

    Raises:
        CflowError: any other status the server answered with.
    """
    headers = dict(reply.headers or {})
    status = headers.get("Status")
    if status and not reply.data:
        if status == "404":
            return None
        raise translate(nats.js.errors.APIError(code=int(status) if status.isdigit() else None,
                                                description=headers.get("Description")))
    stamp = headers.get("Nats-Time-Stamp")
    return RawMessage(
        seq=int(headers.get("Nats-Sequence", 0)),
        subject=headers.get("Nats-Subject", ""),
        data=bytes(reply.data or b""),
        headers=headers,
        time_ms=iso_ms(stamp) if stamp else 0,
    )


def raw_from_leader(body: dict[str, Any]) -> RawMessage:
    """A ``STREAM.MSG.GET`` reply's ``message`` object as a message (base64 decoded)."""
    hdrs = body.get("hdrs")
    data = body.get("data")
    return RawMessage(
        seq=int(body.get("seq", 0)),
        subject=str(body.get("subject", "")),
        data=base64.b64decode(data) if data else b"",
        headers=parse_headers(base64.b64decode(hdrs)) if hdrs else {},
        time_ms=iso_ms(body["time"]) if body.get("time") else 0,
    )


# ---------------------------------------------------------------------- results


class Appended(msgspec.Struct, frozen=True):
    seq: int
    duplicate: bool
    event: ev.Event


class StoredEvent(msgspec.Struct, frozen=True):
    seq: int
    subject: str
    event: ev.Event
    time_ms: int = 0  # the server's storage timestamp (ms since the epoch); 0: unknown


class BadMessage(msgspec.Struct, frozen=True):
    """A message on an event subject that did not decode; projector quarantines it."""

    seq: int
    subject: str
    raw: bytes
    error: str
    time_ms: int = 0


RawDelivery = tuple[int, str, bytes, int]  # (stream seq, subject, data, server time ms)


def decode_delivery(seq: int, subject: str, data: bytes, time_ms: int = 0
                    ) -> StoredEvent | BadMessage:
    """One delivered message as a stored event, or a bad message to quarantine (no I/O)."""
    try:
        event = ev.decode(data, subject)
    except MalformedEvent as exc:
        return BadMessage(seq, subject, data, str(exc), time_ms)
    return StoredEvent(seq, subject, event, time_ms)


class KvEntry(msgspec.Struct, frozen=True):
    key: str
    revision: int
    value: bytes
    operation: str  # PUT, DEL, PURGE, or MARKER (server removed it after its TTL)
    headers: dict[str, str]
    time_ms: int = 0  # the server's storage timestamp (ms since the epoch); 0: unknown

    @property
    def live(self) -> bool:
        return self.operation == "PUT"


async def publish(js: JetStreamContext, out: Outgoing, *, timeout: float = 5.0,  # noqa: ASYNC109
                  expected: int | None = None) -> tuple[int, bool]:
    """One awaited JetStream publish; returns (sequence, duplicate).

    Through the connection's :class:`~cflow.streams.acks.AckMux`, not ``js.publish``
    (less client CPU per write: see that module).
    """
    with nats_errors(out.subject, expected):
        # nats-py mutates the headers dict it is given: hand it a fresh copy.
        return await js_publish(js._nc, out.subject, out.payload, dict(out.headers), timeout)


def _kv_operation(headers: dict[str, str]) -> str:
    return "MARKER" if MARKER_REASON in headers else headers.get(KV_OPERATION, "PUT")


def _entry_from_raw(bucket: str, raw: RawMessage) -> KvEntry:
    key = raw.subject[len(f"$KV.{bucket}."):]
    return KvEntry(key, raw.seq, raw.data, _kv_operation(raw.headers), raw.headers, raw.time_ms)


def kv_entry_from_msg(bucket: str, msg: Msg) -> KvEntry:
    """A KV message delivered by a push consumer (``kv_subscription``) as an entry.

    A key the server removed after its TTL arrives as a ``MARKER`` entry.
    """
    headers = dict(msg.headers or {})
    return KvEntry(msg.subject[len(f"$KV.{bucket}."):], int(msg.metadata.sequence.stream),
                   bytes(msg.data or b""), _kv_operation(headers), headers, msg_time_ms(msg))


PROBE_AFTER_S = 10.0  # server_time_ms() probes when it saw nothing fresher for this long
CLOCK_KEY = "_clock"  # the leases bucket key of the fallback clock probe (readers skip "_")


def stamp_after(stamp: Timestamp, after: Timestamp) -> Timestamp:
    """``stamp`` if it is already later than ``after``, else the least stamp after it (pure)."""
    if stamp > after:
        return stamp
    wall, logical = after.wall_ms, after.logical + 1
    if logical > LOGICAL_MAX:
        wall, logical = wall + 1, 0
    return Timestamp(wall, logical, stamp.node)


class EventLog:
    """Append, read and follow one swarm's events; raw KV for its buckets.

    One instance per process and swarm. It owns the process's HLC: every append
    is stamped by it, every event read is merged into it (receive rule). It also
    keeps an estimate of the server's clock (``server_now_ms``) from every
    server timestamp it sees, so deadlines never depend on this host's wall clock.
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
        self.server_clock = ServerClock()
        self.request_timeout_s = 5.0  # one request
        self.retry_s = DEFAULT_RETRY_S  # one read or write, through an election
        self._replicas: dict[str, tuple[int, float]] = {}  # stream -> (replicas, when seen)

    # -- clock

    def stamp(self, after_hlc: str | None = None) -> str:
        """A fresh HLC stamp; with ``after_hlc``, one strictly later than it.

        ``after_hlc`` is the stamp of the entity's previous event: the new event
        must sort after it even when this host's clock lags far behind. A stamp
        within the max offset is merged into the clock (receive rule); one beyond
        it only pushes this one stamp past it, the clock itself is not dragged.
        """
        if after_hlc is None:
            return str(self.clock.now(wall_ms()))
        after = Timestamp.parse(after_hlc)
        stamp = self.clock.now(wall_ms())
        if stamp > after:
            return str(stamp)
        try:
            return str(self.clock.observe(after, wall_ms()))
        except ClockOffsetError:
            return str(stamp_after(stamp, after))

    def observe(self, hlc: str) -> None:
        """Receive rule. A stamp too far ahead is counted and ignored, never adopted."""
        try:
            self.clock.observe(Timestamp.parse(hlc), wall_ms())
        except CflowError:
            self.clock_refusals += 1

    def server_now_ms(self) -> int:
        """The server's current time as far as seen: a lower bound, 0 before anything was seen.

        Fed by every server timestamp this log receives (events followed or
        read, KV reads, probes), advanced by this process's monotonic clock; the
        local wall clock never enters it.
        """
        return self.server_clock.now_ms()

    async def server_time_ms(self) -> int:
        """The server's current time (lower bound), probing it when nothing fresh was seen.

        A probe is one ``STREAM.INFO`` request (its reply carries the server's
        time) when no fresh server timestamp arrived in the last 10 s.

        Raises:
            Unavailable: the probe was needed and NATS did not answer.
        """
        if not self.server_clock.fresh(PROBE_AFTER_S):
            await self._probe_clock()
        return self.server_clock.now_ms()

    async def _probe_clock(self) -> None:
        info = await self.stream_info(self.stream)
        if info.get("ts"):
            return  # stream_info fed it
        # A server without the reply timestamp: store a tiny message, read its stamp back.
        bucket = self.bucket(names.LEASES)
        await self.kv_put(bucket, CLOCK_KEY, b"", ttl_s=1)
        raw = await self._fetch(names.kv_stream(bucket),
                                last_by_subj=names.kv_subject(bucket, CLOCK_KEY))
        if raw is not None:
            self.server_clock.observe(raw.time_ms, probe=True)

    # -- append

    def event(self, data: ev.EventData, entity_id: str, *, actor: str | None = None,
              event_id: str | None = None, causation_id: str | None = None,
              correlation_id: str | None = None, after_hlc: str | None = None) -> ev.Event:
        """A new event of this swarm, stamped now (and after ``after_hlc`` when given)."""
        return ev.make_event(
            data, swarm=self.swarm, entity_id=entity_id, hlc=self.stamp(after_hlc),
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
        after_hlc: str | None = None,
        dedupe_by_msg_id: bool = False,
    ) -> Appended:
        """Append one event on its entity's subject.

        With ``expected``, the append succeeds only if the entity's last sequence
        is exactly that (0: the entity has no events yet). With ``after_hlc`` (the
        HLC of the entity's previous event) the new event's stamp sorts after it.
        A publish that times out is retried with the same Msg-Id, then read back
        before deciding. A Msg-Id held by another event is a conflict, unless
        ``dedupe_by_msg_id`` says the Msg-Id names an intent that any event under it
        fulfils (e.g. "bob acked message m"): then that is a duplicate.

        Raises:
            ConcurrencyConflict: the entity moved on since ``expected``, or another
                event already holds this Msg-Id.
            Unavailable: NATS did not answer and the read-back found nothing.
        """
        event = self.event(data, entity_id, actor=actor, event_id=event_id,
                           causation_id=causation_id, correlation_id=correlation_id,
                           after_hlc=after_hlc)
        return await self.append_event(event, expected=expected, msg_id=msg_id,
                                       dedupe_by_msg_id=dedupe_by_msg_id)

    async def append_event(self, event: ev.Event, *, expected: int | None = None,
                           msg_id: str | None = None, dedupe_by_msg_id: bool = False
                           ) -> Appended:
        """Append a built event (see :meth:`append`); a duplicate is confirmed to be it.

        Retries through a leader election for up to ``retry_s`` (no leader, no
        responders, timeouts, "duplicate message id is in process"). Once a try
        may have been stored (it timed out, or the server is still storing it),
        the event is read back by identity before anything is decided.

        Raises:
            ConcurrencyConflict: the entity moved on since ``expected``, or another
                event already holds this Msg-Id.
            NotFound: the events stream does not exist.
            Unavailable: the cluster did not store it within ``retry_s`` and the
                read-back did not find it; the text says why (e.g. no leader).
        """
        out = build_append(event, expected_last_seq=expected, msg_id=msg_id)
        mid = out.headers[MSG_ID]
        attempts = Attempts(self.retry_s, self.request_timeout_s)
        uncertain = False  # a try may have been stored
        while True:
            try:
                seq, dup = await publish(self.js, out, expected=expected,
                                         timeout=attempts.timeout())
            except Unavailable as exc:
                if not retryable(exc):
                    raise
                uncertain = uncertain or getattr(exc, "reason", None) != "no-responders"
                await self._exists_once(self.stream, exc, attempts)
                if uncertain:
                    found = await self._read_back_quietly(out.subject, mid, event, expected,
                                                          dedupe_by_msg_id)
                    if found is not None:
                        return Appended(found, True, event)
                if not await attempts.pause():
                    raise await self._explain(self.stream, exc, attempts.waited_s()) from exc
                continue
            except ConcurrencyConflict as conflict:
                # A try that timed out may have landed; the retry then reports a
                # wrong last sequence although the write is ours (one server checks
                # the sequence before the Msg-Id); so may a caller's retry under a
                # deterministic Msg-Id. A fresh event on its first try cannot be
                # there yet: skip the read-back round trip.
                if uncertain or msg_id is not None:
                    found = await self._read_back(out.subject, mid, event, expected,
                                                  by_msg_id=dedupe_by_msg_id)
                    if found is not None:
                        return Appended(found, True, event)
                actual = await self.last_seq_subject(out.subject)
                raise ConcurrencyConflict(out.subject, expected, actual) from conflict
            if dup and not dedupe_by_msg_id:
                await self._confirm_duplicate(out.subject, seq, mid, event, expected)
            return Appended(seq, dup, event)

    async def _read_back_quietly(self, subject: str, msg_id: str, event: ev.Event,
                                 expected: int | None, by_msg_id: bool) -> int | None:
        """One read-back try between write retries: None when it cannot tell yet."""
        try:
            return await self._read_back(subject, msg_id, event, expected, by_msg_id=by_msg_id,
                                         retry_s=0.0, timeout=EXPLAIN_TIMEOUT_S)
        except Unavailable:
            return None

    async def _confirm_duplicate(self, subject: str, seq: int, msg_id: str, event: ev.Event,
                                 expected: int | None) -> None:
        """A "duplicate" ack names the message holding the Msg-Id: it must be this event."""
        raw = await self._fetch(self.stream, seq=seq)
        if raw is not None and _event_id(raw) == event.id:
            return
        raise await self._held_by_another(subject, expected, msg_id, raw, seq)

    async def _read_back(self, subject: str, msg_id: str, event: ev.Event,
                         expected: int | None, *, by_msg_id: bool = False,
                         retry_s: float | None = None,
                         timeout: float | None = None) -> int | None:  # noqa: ASYNC109
        """Where an append whose outcome is unknown was stored, if it was.

        With ``expected``, the write can only sit right after that sequence on
        its subject; without, only a last message can be checked. The stored
        message must be this event (same event id), not merely carry its Msg-Id.

        Raises:
            ConcurrencyConflict: another event holds this Msg-Id.
            Unavailable: the read itself failed (within ``retry_s``).
        """
        if expected is None:
            raw = await self._fetch(self.stream, last_by_subj=subject, retry_s=retry_s,
                                    timeout=timeout)
        else:
            raw = await self._fetch(self.stream, seq=expected + 1, next_by_subj=subject,
                                    retry_s=retry_s, timeout=timeout)
        if raw is None:
            return None
        if _event_id(raw) == event.id:
            return raw.seq
        if raw.headers.get(MSG_ID) == msg_id:
            if by_msg_id:
                return raw.seq
            raise await self._held_by_another(subject, expected, msg_id, raw, raw.seq)
        return None

    async def _held_by_another(self, subject: str, expected: int | None, msg_id: str,
                               raw: RawMessage | None, seq: int) -> ConcurrencyConflict:
        """The conflict "another event holds this Msg-Id", naming it (``held_by``, ``held_seq``)."""
        actual = await self.last_seq_subject(subject)
        held_by = None if raw is None else _event_id(raw)
        what = f"event {held_by}" if raw is not None else "a message that is gone"
        conflict = ConcurrencyConflict(subject, expected, actual,
                                       detail=f"Msg-Id {msg_id} is held by {what} at seq {seq}")
        for name, value in (("held_by", held_by), ("held_seq", seq)):
            setattr(conflict, name, value)  # facts, as CflowError keeps them
            conflict.facts[name] = value
        return conflict

    async def append_many(self, items: Sequence[tuple[ev.Event, int | None]],
                          *, ack_wait_s: float = 10.0) -> list[int]:
        """Bulk append: publish every message in order, then wait for all acks at once.

        This is what ``js.publish_async`` does, on a reply subscription of our
        own: nats-py 2.16's ``publish_async`` never resolves a future whose ack
        is an error (its reply callback raises), so one conflict would hang the
        batch forever. Each message's Msg-Id is its event id, so the items not
        acknowledged (no ack in ``ack_wait_s``, no leader, in process) are
        published again, through an election, for up to ``retry_s``; an item
        whose earlier try may have landed is read back before a conflict counts.

        Raises:
            ConcurrencyConflict: the first item whose expectation failed (items
                before and after it may have been stored).
            Unavailable: items still unacknowledged after ``retry_s``.
        """
        if not items:
            return []
        outs = [build_append(event, expected_last_seq=expected) for event, expected in items]
        seqs: list[int | None] = [None] * len(outs)
        uncertain = [False] * len(outs)
        attempts = Attempts(self.retry_s, ack_wait_s)
        while True:
            todo = [i for i, seq in enumerate(seqs) if seq is None]
            replies = await self._publish_batch([outs[i] for i in todo], attempts.timeout())
            failure: CflowError | None = None
            for i, reply in zip(todo, replies, strict=True):
                (event, expected), out = items[i], outs[i]
                try:
                    if reply is None:
                        raise Unavailable("no publish ack in time", reason="timeout")
                    seqs[i] = await self._ack_seq(reply, out.subject, expected)
                except ConcurrencyConflict:
                    found = None
                    if uncertain[i]:
                        found = await self._read_back(out.subject, out.headers[MSG_ID], event,
                                                      expected)
                    if found is None:
                        raise
                    seqs[i] = found
                except Unavailable as exc:
                    if not retryable(exc):
                        raise
                    uncertain[i] = uncertain[i] or exc.facts.get("reason") != "no-responders"
                    failure = exc
            if failure is None:
                return [seq for seq in seqs if seq is not None]
            if not await attempts.pause():
                raise await self._explain(self.stream, failure, attempts.waited_s())

    async def _publish_batch(self, outs: Sequence[Outgoing],
                             ack_wait_s: float) -> list[Msg | None]:
        """Publish in order and collect the acks; None where none came within ``ack_wait_s``."""
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
                await asyncio.wait(acks, timeout=ack_wait_s)
            finally:
                with contextlib.suppress(nats.errors.Error, OSError):
                    await sub.unsubscribe()
        return [ack.result() if ack.done() else None for ack in acks]

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

    async def _fetch(self, stream: str, *, seq: int | None = None,
                     last_by_subj: str | None = None, next_by_subj: str | None = None,
                     retry_s: float | None = None,
                     timeout: float | None = None) -> RawMessage | None:  # noqa: ASYNC109
        """One stored message: by sequence, last on a subject, or next on a subject from ``seq``.

        Read-your-writes: a replicated stream is read from its leader (a direct get
        may be answered by a follower that has not applied the write the leader
        just acknowledged, or by a paused one); a single-replica stream by direct
        get (its one server is the leader). Retried through an election for
        ``retry_s`` (default: the log's). Every timestamp read feeds the server clock.

        Returns None when there is no such message.

        Raises:
            NotFound: the stream does not exist.
            Unavailable: no answer within ``retry_s``; the text says why.
        """
        req: dict[str, Any] = {}
        if last_by_subj is not None:
            req["last_by_subj"] = last_by_subj
        else:
            req["seq"] = seq or 0
            if next_by_subj is not None:
                req["next_by_subj"] = next_by_subj

        async def once(timeout: float) -> RawMessage | None:  # noqa: ASYNC109
            if await self._leader_reads(stream):
                return await self._leader_get(stream, req, timeout)
            return await self._direct_get(stream, req, timeout)

        raw = await self._retrying(stream, once, retry_s, timeout)
        if raw is not None:
            self.server_clock.observe(raw.time_ms)
        return raw

    async def _retrying(self, stream: str, op: Callable[[float], Awaitable[T]],
                        retry_s: float | None = None,
                        timeout: float | None = None) -> T:  # noqa: ASYNC109
        """Run ``op(timeout)`` until it answers, retrying what an election explains.

        Raises:
            NotFound: the stream does not exist (checked at the first "no responders").
            Unavailable: still failing after ``retry_s``, explained by ``_explain``.
        """
        attempts = Attempts(self.retry_s if retry_s is None else retry_s,
                            timeout or self.request_timeout_s)
        while True:
            try:
                return await op(attempts.timeout())
            except Unavailable as exc:
                if not retryable(exc):
                    raise
                await self._exists_once(stream, exc, attempts)
                if not await attempts.pause():
                    raise await self._explain(stream, exc, attempts.waited_s()) from exc

    async def _exists_once(self, stream: str, exc: CflowError, attempts: Attempts) -> None:
        """At a "no responders" of an operation, fail at once if the stream is missing.

        Asked until the server answers once (a restarting server's JetStream may
        not answer yet). A memory-storage bucket found missing is created again
        (a restart forgot it) and the operation goes on.

        Raises:
            NotFound: ``stream`` does not exist (run ``cfctl init``).
        """
        if getattr(exc, "reason", None) != "no-responders" or attempts.checked:
            return
        try:
            attempts.checked = bool(await self.stream_info(
                stream, retry_s=0.0, missing_only=True, timeout=EXPLAIN_TIMEOUT_S))
        except NotFound:
            if ephemeral_bucket(self.swarm, stream) is None:
                raise
            with contextlib.suppress(Unavailable):
                await self._recreate(stream)

    async def _recreate(self, stream: str) -> bool:
        """Create ``stream`` again, empty, if it is one of the swarm's memory buckets.

        Returns False (and does nothing) for any other stream. The bucket gets
        the events stream's replica count. Leases coming back empty is safe: see
        ``TaskService.lease_generation_ms``.

        Raises:
            NotFound: the swarm's events stream is missing too (run ``cfctl init``).
            Unavailable: JetStream did not answer.
        """
        if ephemeral_bucket(self.swarm, stream) is None:
            return False
        info = await self.stream_info(self.stream, retry_s=0.0, timeout=EXPLAIN_TIMEOUT_S)
        replicas = 3 if int((info.get("config") or {}).get("num_replicas", 1)) > 1 else 1
        spec = ephemeral_bucket(self.swarm, stream, replicas)
        assert spec is not None
        log.warning("%s is missing (a restarted server forgets memory storage): "
                    "creating it again, empty", stream)
        await ensure_stream(self.nc, spec)
        leases = self.bucket(names.LEASES)
        if stream == names.kv_stream(leases):
            # Its new life starts now: holders have a whole TTL from here to write
            # their leases back (the first judge would otherwise start it later).
            with contextlib.suppress(ConcurrencyConflict):
                await self.kv_put(leases, names.LEASES_GENERATION_KEY, b"{}",
                                  expected_revision=0)
        return True

    async def _bucket_info(self, stream: str) -> dict[str, Any]:
        """``STREAM.INFO`` of a bucket's stream; a forgotten memory bucket is created again.

        Raises:
            NotFound: the bucket does not exist and is not one to create again.
            Unavailable: no answer within ``retry_s``.
        """
        try:
            return await self.stream_info(stream)
        except NotFound:
            if not await self._recreate(stream):
                raise
        return await self.stream_info(stream)

    async def _leader_reads(self, stream: str) -> bool:
        """Whether reads of ``stream`` go to its leader: it has replicas that may lag."""
        cached = self._replicas.get(stream)
        if cached is not None and time.monotonic() - cached[1] < REPLICAS_TTL_S:
            return cached[0] != 1  # 0: unknown
        try:
            await self.stream_info(stream, retry_s=0.0, timeout=EXPLAIN_TIMEOUT_S)
        except Unavailable:
            # Cannot tell now: the leader is never wrong. Ask again in a few seconds,
            # not on every read of an election.
            self._replicas[stream] = (0, time.monotonic() - REPLICAS_TTL_S + 5.0)
            return True
        return self._replicas[stream][0] > 1

    async def stream_info(self, stream: str, *, retry_s: float | None = None,
                          missing_only: bool = False,
                          timeout: float | None = None) -> dict[str, Any]:  # noqa: ASYNC109
        """``STREAM.INFO`` of one stream; notes its replica count and the server's time.

        ``missing_only``: only a missing stream is an error; any other failure
        returns ``{}``.

        Raises:
            NotFound: no such stream (run ``cfctl init``).
            Unavailable: no answer within ``retry_s`` (default: the log's).
        """
        try:
            info = await api_request(self.nc, f"$JS.API.STREAM.INFO.{stream}",
                                     timeout=timeout or self.request_timeout_s,
                                     retry_s=self.retry_s if retry_s is None else retry_s)
        except NotFound:
            raise NotFound("stream", f"{stream} (run `cfctl init`)") from None
        except CflowError:
            if missing_only:
                return {}
            raise
        replicas = int((info.get("config") or {}).get("num_replicas", 1))
        self._replicas[stream] = (replicas, time.monotonic())
        if info.get("ts"):
            self.server_clock.observe(iso_ms(str(info["ts"])), probe=True)
        return info

    async def _explain(self, stream: str, exc: CflowError, waited_s: float) -> CflowError:
        """The one error to report after retrying ``exc`` for ``waited_s``: what is going on."""
        after = f"retried for {max(1, int(waited_s))} s"
        try:
            info = await self.stream_info(stream, retry_s=0.0, timeout=EXPLAIN_TIMEOUT_S)
        except NotFound as missing:
            return missing
        except CflowError as info_exc:
            return Unavailable(
                f"stream {stream} has no leader answering ({info_exc.message}; "
                f"election in progress?); {after}",
                reason="no-leader", stream=stream,
                retried_s=waited_s)
        cluster = info.get("cluster") or {}
        leader = cluster.get("leader")
        replicas = int((info.get("config") or {}).get("num_replicas", 1))
        if not leader and replicas > 1:
            return Unavailable(f"stream {stream} has no leader (election in progress?); {after}",
                               reason="no-leader", stream=stream, retried_s=waited_s)
        peers = cluster.get("replicas") or []
        reachable = 1 + sum(1 for r in peers if r.get("current") and not r.get("offline"))
        if replicas > 1 and reachable <= replicas // 2:
            gone = ", ".join(str(r.get("name")) for r in peers
                             if not r.get("current") or r.get("offline"))
            return Unavailable(
                f"stream {stream} has no quorum: leader {leader}, {gone} not current "
                f"(election in progress?); {after}",
                reason="no-leader", stream=stream, retried_s=waited_s)
        at = f" (leader {leader})" if leader else ""
        return Unavailable(f"stream {stream}{at} did not answer: {exc.message}; {after}",
                           reason=getattr(exc, "reason", None), stream=stream,
                           retried_s=waited_s)

    async def _direct_get(self, stream: str, req: dict[str, Any],
                          timeout: float) -> RawMessage | None:  # noqa: ASYNC109
        subject = f"$JS.API.DIRECT.GET.{stream}"
        if set(req) == {"last_by_subj"}:
            subject, payload = f"{subject}.{req['last_by_subj']}", b""
        else:
            payload = json.dumps(req).encode()
        with nats_errors(subject):
            reply = await self.nc.request(subject, payload, timeout=timeout)
        return raw_from_direct(reply)

    async def _leader_get(self, stream: str, req: dict[str, Any],
                          timeout: float) -> RawMessage | None:  # noqa: ASYNC109
        """``STREAM.MSG.GET``: only the stream leader answers it (or a member says "no leader")."""
        subject = f"$JS.API.STREAM.MSG.GET.{stream}"
        with nats_errors(subject):
            reply = await self.nc.request(subject, json.dumps(req).encode(), timeout=timeout)
        body: dict[str, Any] = json.loads(reply.data)
        err = body.get("error")
        if err is not None:
            if err.get("err_code") == NO_MESSAGE_FOUND:
                return None
            raise translate(nats.js.errors.APIError(code=err.get("code"),
                                                    err_code=err.get("err_code"),
                                                    description=err.get("description")),
                            subject=stream)
        return raw_from_leader(body["message"])

    async def last_message(self, stream: str, subject: str) -> RawMessage | None:
        """The last stored message on ``subject`` (read-your-writes), or None."""
        return await self._fetch(stream, last_by_subj=subject)

    _direct_last = last_message  # the old private name, still used outside this module

    async def last_seq_subject(self, subject: str) -> int:
        raw = await self._fetch(self.stream, last_by_subj=subject)
        return 0 if raw is None else raw.seq

    async def last_seq(self, kind: str, entity_id: str) -> int:
        return await self.last_seq_subject(names.event_subject(self.swarm, kind, entity_id))

    async def get(self, seq: int) -> StoredEvent | BadMessage:
        """The message at ``seq`` of the events stream, decoded.

        Raises:
            NotFound: no message at ``seq`` (or no events stream).
        """
        raw = await self._fetch(self.stream, seq=seq)
        if raw is None:
            raise NotFound("message", f"{self.stream} seq {seq}")
        return self._decode(raw.seq, raw.subject, raw.data, raw.time_ms)

    def _decode(self, seq: int, subject: str, data: bytes, time_ms: int = 0
                ) -> StoredEvent | BadMessage:
        try:
            event = ev.decode(data, subject)
        except MalformedEvent as exc:
            return BadMessage(seq, subject, data, str(exc), time_ms)
        self.observe(event.hlc)
        return StoredEvent(seq, subject, event, time_ms)

    async def entity_events(self, kind: str, entity_id: str) -> list[StoredEvent]:
        """Every event of one entity in order (gets, next-by-subject)."""
        subject = names.event_subject(self.swarm, kind, entity_id)
        out: list[StoredEvent] = []
        seq = 1
        while True:
            raw = await self._fetch(self.stream, seq=seq, next_by_subj=subject)
            if raw is None:
                return out
            item = self._decode(raw.seq, raw.subject, raw.data, raw.time_ms)
            if isinstance(item, StoredEvent):
                out.append(item)
            seq = raw.seq + 1

    async def stream_last_seq(self) -> int:
        info = await self.stream_info(self.stream)
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
        The ordered consumer recreates itself after gaps, and after a reconnect
        this follower places a new one after the last event it saw (one pushed as
        the connection dropped is lost to the old consumer, and nats-py would only
        notice at the next event or heartbeat, or never if none had arrived yet),
        so the sequence seen here never skips or repeats.
        """
        subject = filter_subject or names.events_filter(self.swarm)
        resume_seq = start_seq

        def config() -> ConsumerConfig:
            return ConsumerConfig(
                deliver_policy=(DeliverPolicy.BY_START_SEQUENCE if resume_seq > 1
                                else DeliverPolicy.ALL),
                opt_start_seq=resume_seq if resume_seq > 1 else None,
                headers_only=False,
            )

        # (generation, message); generation 0 is "reconnected": resubscribe. Messages
        # of an older subscription still queued are dropped (the new one has them).
        queue: asyncio.Queue[tuple[int, Msg | None]] = asyncio.Queue()
        generation = 1

        def receiver(gen: int) -> Callable[[Msg], Awaitable[None]]:
            async def on_msg(msg: Msg) -> None:
                queue.put_nowait((gen, msg))
            return on_msg

        sub, info = await self._ordered_subscription(subject, self.stream, receiver(generation),
                                                     config, with_info=caught_up is not None)
        try:
            with on_reconnect(self.nc, lambda: queue.put_nowait((0, None))):
                if caught_up is not None and info is not None:
                    # Only "nothing pending and nothing delivered yet" means empty: with
                    # everything already delivered but not yet queued, num_pending is 0
                    # too; then the last message's own num_pending == 0 sets it below.
                    delivered = info.delivered.consumer_seq if info.delivered else 0
                    if info.num_pending == 0 and not delivered and queue.empty():
                        caught_up.set()
                last = start_seq - 1
                while True:
                    gen, msg = await queue.get()
                    if msg is None:
                        await _unsubscribe(sub)
                        generation += 1
                        resume_seq = last + 1
                        sub = await self._ordered_subscription_again(
                            subject, self.stream, receiver(generation), config)
                        continue
                    if gen != generation:
                        continue
                    meta = msg.metadata
                    seq = int(meta.sequence.stream)
                    if seq <= last:
                        if caught_up is not None and meta.num_pending == 0:
                            caught_up.set()  # a redelivered tail still means "caught up"
                        continue
                    last = seq
                    time_ms = msg_time_ms(msg)
                    self.server_clock.observe(time_ms)
                    item = self._decode(seq, msg.subject, msg.data, time_ms)
                    # Set before yielding, so the consumer sees it with the last stored item.
                    if caught_up is not None and not caught_up.is_set() and meta.num_pending == 0:
                        caught_up.set()
                    yield item
        finally:
            await _unsubscribe(sub)

    async def follow_batches(
        self,
        filter_subject: str | None = None,
        *,
        start_seq: int = 1,
        caught_up: asyncio.Event | None = None,
        max_batch: int = 5000,
    ) -> AsyncGenerator[list[StoredEvent | BadMessage], None]:
        """:meth:`follow`, a batch at a time: what arrived since the last batch, in order.

        The same ordered push consumer and guarantees as :meth:`follow` (no skip,
        no repeat across its resets), with the per-message work done in bulk: the
        subscription callback only appends to a buffer (no queue round trip per
        message), and the HLC receive rule is applied once per batch to its
        latest stamp (stamps sort as time; a batch whose latest stamp is refused
        is observed event by event, so refusals are still counted one by one).
        A batch holds at most ``max_batch`` items; once ``4 * max_batch`` wait
        unread, the subscription ends and a new one starts after the last of them
        when they are read (memory stays bounded; nothing is dropped or skipped).
        """
        raw_batches = self.follow_raw_batches(filter_subject, start_seq=start_seq,
                                              caught_up=caught_up, max_batch=max_batch)
        try:
            async for raw in raw_batches:
                batch = [decode_delivery(seq, subject, data, time_ms)
                         for seq, subject, data, time_ms in raw]
                newest_ms = max(item[3] for item in raw)
                if newest_ms:
                    self.server_clock.observe(newest_ms)
                self._observe_batch(batch)
                yield batch
        finally:
            await raw_batches.aclose()

    async def follow_raw_batches(
        self,
        filter_subject: str | None = None,
        *,
        start_seq: int = 1,
        caught_up: asyncio.Event | None = None,
        max_batch: int = 5000,
    ) -> AsyncGenerator[list[RawDelivery], None]:
        """:meth:`follow_batches` undecoded: lists of ``(seq, subject, data, time_ms)``.

        Nothing is decoded and no HLC is observed (a rebuild decodes in another
        process); the buffering, batching and flow control are the same.
        """
        subject = filter_subject or names.events_filter(self.swarm)
        resume_seq = start_seq

        def config() -> ConsumerConfig:
            return ConsumerConfig(
                deliver_policy=(DeliverPolicy.BY_START_SEQUENCE if resume_seq > 1
                                else DeliverPolicy.ALL),
                opt_start_seq=resume_seq if resume_seq > 1 else None,
                headers_only=False,
            )

        loop = asyncio.get_running_loop()
        buffer: list[Msg] = []
        arrived = asyncio.Event()
        limit = 4 * max_batch
        # The callback never waits: nats-py answers a stalled consumer's flow control
        # from its heartbeats anyway, so a waiting callback lets the subscription's
        # queue grow until messages are dropped (and an ordered consumer skips them).
        # A full buffer ends the subscription instead; once drained, a new one
        # starts after the last buffered message.
        paused: asyncio.Task[None] | None = None
        subscribed = asyncio.Event()  # ``sub`` is the current subscription

        async def stop() -> None:
            await subscribed.wait()
            await _unsubscribe(sub)

        async def on_msg(msg: Msg) -> None:
            nonlocal paused, resume_seq
            if paused is not None:
                return  # after the last buffered one: delivered again on resuming
            buffer.append(msg)
            if (len(buffer) == 1 or len(buffer) >= max_batch
                    or msg.metadata.num_pending == 0):
                arrived.set()
            if len(buffer) >= limit:
                resume_seq = msg.metadata.sequence.stream + 1
                paused = asyncio.ensure_future(stop())
                log.debug("follow %s: %d messages unread, paused until they are read",
                          subject, len(buffer))

        sub, info = await self._ordered_subscription(subject, self.stream, on_msg, config,
                                                     with_info=caught_up is not None)
        subscribed.set()
        try:
            if caught_up is not None and info is not None:
                delivered = info.delivered.consumer_seq if info.delivered else 0
                if info.num_pending == 0 and not delivered and not buffer:
                    caught_up.set()
            last = start_seq - 1
            while True:
                # Catching up (the server says more are pending), take a batch once
                # max_batch wait or FILL_WAIT_S after the first arrived: a backlog is
                # applied in few large batches. Live, a burst's last message (nothing
                # pending) ends the batch at once.
                deadline: float | None = None
                while not (buffer and (len(buffer) >= max_batch
                                       or buffer[-1].metadata.num_pending == 0)):
                    if buffer and deadline is None:
                        deadline = loop.time() + FILL_WAIT_S
                    arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout_at(deadline):
                            await arrived.wait()
                    if deadline is not None and loop.time() >= deadline:
                        break
                msgs = buffer[:max_batch]
                del buffer[:max_batch]
                if paused is not None and len(buffer) < max_batch:
                    await paused
                    subscribed.clear()
                    paused = None
                    sub, _ = await self._ordered_subscription(subject, self.stream, on_msg,
                                                              config)
                    subscribed.set()
                batch: list[RawDelivery] = []
                caught = False
                for msg in msgs:
                    meta = msg.metadata
                    seq = meta.sequence.stream
                    if meta.num_pending == 0:
                        caught = True  # a redelivered tail still means "caught up"
                    if seq <= last:
                        continue
                    last = seq
                    batch.append((seq, msg.subject, msg.data, datetime_ms(meta.timestamp)))
                if caught and caught_up is not None:
                    caught_up.set()
                if batch:
                    yield batch
        finally:
            if paused is not None:
                paused.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await paused
            if subscribed.is_set():
                await _unsubscribe(sub)

    def _observe_batch(self, batch: Sequence[StoredEvent | BadMessage]) -> None:
        """The receive rule for a batch: its latest stamp, or each stamp if that one is refused."""
        stamps = [item.event.hlc for item in batch if isinstance(item, StoredEvent)]
        if not stamps:
            return
        try:
            self.clock.observe(Timestamp.parse(max(stamps)), wall_ms())
        except CflowError:
            for stamp in stamps:
                self.observe(stamp)

    async def _ordered_subscription(
        self, subject: str, stream: str, cb: Callable[[Msg], Awaitable[None]],
        config: Callable[[], ConsumerConfig], *, with_info: bool = False,
    ) -> tuple[Any, Any]:
        """An ordered push consumer (and its info), retried through an election.

        The server places an ordered (R1) consumer on a random replica of the
        stream; one that is paused or cut off never answers, so a try that times
        out is abandoned (it expires on its own) and a new consumer placed, each
        with a fresh config and inbox.

        Raises:
            NotFound: the stream does not exist.
            Unavailable: no consumer could be made within ``retry_s``.
        """
        attempts = Attempts(self.retry_s, self.request_timeout_s)
        while True:
            js = self.nc.jetstream(timeout=min(CONSUMER_CREATE_S, attempts.timeout()))
            sub = None
            try:
                with nats_errors(subject):
                    sub = await js.subscribe(subject, cb=cb, ordered_consumer=True,
                                             config=config(), stream=stream)
                    info = await sub.consumer_info() if with_info else None
                return sub, info
            except asyncio.CancelledError:
                if sub is not None:  # cancelled while asking for its info
                    await _unsubscribe(sub)
                raise
            except Unavailable as exc:
                if sub is not None:
                    await _unsubscribe(sub)
                if not retryable(exc):
                    raise
                if not await attempts.pause():
                    raise await self._explain(stream, exc, attempts.waited_s()) from exc

    async def _ordered_subscription_again(
        self, subject: str, stream: str, cb: Callable[[Msg], Awaitable[None]],
        config: Callable[[], ConsumerConfig],
        prepare: Callable[[], Awaitable[object]] | None = None,
    ) -> Any:
        """:meth:`_ordered_subscription` after a reconnect, tried until made: the
        connection is back but JetStream may still be recovering (a restarted server).
        ``prepare`` is awaited before each try.

        Raises:
            NotFound: the stream is gone.
        """
        while True:
            try:
                if prepare is not None:
                    await prepare()
                sub, _ = await self._ordered_subscription(subject, stream, cb, config)
                return sub
            except NotFound:
                raise
            except CflowError as exc:
                log.warning("%s: no new consumer after a reconnect (%s); trying again",
                            subject, exc)
                await asyncio.sleep(1.0)

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
            first = await self._fetch(self.stream, seq=start_seq, next_by_subj=subject)
        except NotFound:
            return out
        if first is None:
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
        raw = await self._fetch(names.kv_stream(bucket), last_by_subj=names.kv_subject(bucket, key))
        return None if raw is None else _entry_from_raw(bucket, raw)

    def kv_entry(self, bucket: str, msg: Msg) -> KvEntry:
        """A message from :meth:`kv_subscription` as an entry; its timestamp feeds the clock."""
        entry = kv_entry_from_msg(bucket, msg)
        self.server_clock.observe(entry.time_ms)
        return entry

    async def kv_put(self, bucket: str, key: str, value: bytes, *,
                     expected_revision: int | None = None, ttl_s: float | None = None,
                     msg_id: str | None = None) -> int:
        """Put a key (compare-and-set with ``expected_revision``; 0: must not exist).

        Every put carries a Msg-Id (a fresh one unless given), so a retry through
        an election is deduplicated and a put whose ack was lost is recognised
        when read back.

        Raises:
            ConcurrencyConflict: the key is not at ``expected_revision``.
            Unavailable: not stored within ``retry_s``; the text says why.
        """
        out = build_kv_put(bucket, key, value, expected_revision=expected_revision,
                           ttl_s=ttl_s, msg_id=msg_id or ev.new_id())
        return await self._kv_write(bucket, key, out, expected_revision)

    async def kv_delete(self, bucket: str, key: str, *, expected_revision: int | None = None,
                        purge: bool = False) -> int:
        """Delete (or purge) a key, compare-and-set with ``expected_revision``.

        Raises:
            ConcurrencyConflict: the key is not at ``expected_revision``.
            Unavailable: not stored within ``retry_s``; the text says why.
        """
        out = build_kv_delete(bucket, key, expected_revision=expected_revision, purge=purge,
                              msg_id=ev.new_id())
        return await self._kv_write(bucket, key, out, expected_revision)

    async def _kv_write(self, bucket: str, key: str, out: Outgoing,
                        expected: int | None) -> int:
        return await self.send(out, stream=names.kv_stream(bucket), expected=expected)

    async def send(self, out: Outgoing, *, stream: str, expected: int | None = None) -> int:
        """Publish one built message to ``stream``, through an election; returns its sequence.

        For writes that are not events of this log (messages, KV entries); with
        ``expected`` the subject must be at that sequence. A
        message without a Msg-Id gets a fresh one, so a retry is deduplicated and
        a try whose ack was lost is recognised when read back (by Msg-Id: the
        message sits right after ``expected`` on its subject, or is its last).

        Raises:
            ConcurrencyConflict: the subject is not at ``expected``.
            NotFound: ``stream`` does not exist.
            Unavailable: not stored within ``retry_s``; the text says why.
        """
        extra = {} if MSG_ID in out.headers else {MSG_ID: ev.new_id()}
        if expected is not None:
            extra[EXPECTED_LAST_SUBJECT_SEQ] = str(expected)
        if extra:
            out = Outgoing(out.subject, {**out.headers, **extra}, out.payload)
        mid = out.headers[MSG_ID]
        attempts = Attempts(self.retry_s, self.request_timeout_s)
        uncertain = False
        while True:
            try:
                seq, _ = await publish(self.js, out, expected=expected,
                                       timeout=attempts.timeout())
                return seq
            except Unavailable as exc:
                if not retryable(exc):
                    raise
                uncertain = uncertain or getattr(exc, "reason", None) != "no-responders"
                await self._exists_once(stream, exc, attempts)
                if uncertain:
                    with contextlib.suppress(Unavailable):
                        found = await self._sent_at(stream, out.subject, mid, expected, 0.0,
                                                    EXPLAIN_TIMEOUT_S)
                        if found is not None:
                            return found
                if not await attempts.pause():
                    raise await self._explain(stream, exc, attempts.waited_s()) from exc
            except ConcurrencyConflict:
                if uncertain:
                    found = await self._sent_at(stream, out.subject, mid, expected, None)
                    if found is not None:
                        return found
                raise

    async def _sent_at(self, stream: str, subject: str, msg_id: str, expected: int | None,
                       retry_s: float | None,
                       timeout: float | None = None) -> int | None:  # noqa: ASYNC109
        """Sequence of the message with ``msg_id`` if it was stored where it could be."""
        if expected is None:
            raw = await self._fetch(stream, last_by_subj=subject, retry_s=retry_s,
                                    timeout=timeout)
        else:
            raw = await self._fetch(stream, seq=expected + 1, next_by_subj=subject,
                                    retry_s=retry_s, timeout=timeout)
        if raw is not None and raw.headers.get(MSG_ID) == msg_id:
            return raw.seq
        return None

    @contextlib.asynccontextmanager
    async def kv_subscription(
        self, bucket: str, *, last_per_subject: bool = False
    ) -> AsyncIterator[tuple[asyncio.Queue[Msg], Any]]:
        """An ordered push consumer on a KV bucket, feeding a queue; unsubscribed on exit.

        Delivers new messages only, or with ``last_per_subject`` the current entry of
        every key first. A key removed by its TTL arrives as a message with a
        ``Nats-Marker-Reason`` header (the server's marker). After a reconnect a new
        consumer is placed after the last message queued (see :meth:`follow`), so an
        entry pushed as the connection dropped is not lost; the queue never repeats.
        A memory-storage bucket that a restarted server forgot is created again,
        and the watch then follows it from its first message (its sequences start
        over).
        """
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        subject = f"$KV.{bucket}.>"
        stream = names.kv_stream(bucket)
        generation = 1
        # The stream sequence of the last message queued, or of the last one stored
        # before a "new only" watch began (it starts after that one).
        last: int | None = None
        # A memory bucket may be created again or emptied by a restart: then its
        # sequences start over, and ``created`` tells which life ``last`` counts in.
        ephemeral = ephemeral_bucket(self.swarm, stream) is not None
        info = await self._bucket_info(stream) if ephemeral or not last_per_subject else {}
        created = info.get("created")
        if not last_per_subject:
            last = int(info["state"]["last_seq"])

        def receiver(gen: int) -> Callable[[Msg], Awaitable[None]]:
            async def on_msg(msg: Msg) -> None:
                nonlocal last
                seq = int(msg.metadata.sequence.stream)
                if gen == generation and (last is None or seq > last):  # not an older sub's
                    last = seq
                    queue.put_nowait(msg)
            return on_msg

        def config() -> ConsumerConfig:
            if last is None:
                return ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)
            return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                  opt_start_seq=last + 1)

        sub, _ = await self._ordered_subscription(subject, stream, receiver(generation), config)

        async def same_stream() -> None:
            nonlocal last, created
            info = await self._bucket_info(stream)
            now = info.get("created")
            # Created again since (a single server forgot it), or emptied with its
            # sequences starting over (a whole cluster restarted): all of it is new.
            if now != created or (last is not None and int(info["state"]["last_seq"]) < last):
                created, last = now, 0

        async def resubscribe() -> None:
            nonlocal sub, generation
            generation += 1
            await _unsubscribe(sub)
            sub = await self._ordered_subscription_again(subject, stream, receiver(generation),
                                                         config, same_stream if ephemeral else None)

        resubscribing: asyncio.Task[None] | None = None

        def reconnected() -> None:
            nonlocal resubscribing
            if resubscribing is not None:
                resubscribing.cancel()
            resubscribing = asyncio.ensure_future(resubscribe())

        try:
            with on_reconnect(self.nc, reconnected):
                yield queue, sub
        finally:
            if resubscribing is not None:
                await stop_tasks([resubscribing])
            await _unsubscribe(sub)

    @contextlib.asynccontextmanager
    async def kv_entries(
        self, bucket: str, *, last_per_subject: bool = False
    ) -> AsyncIterator[AsyncIterator[KvEntry]]:
        """Like :meth:`kv_subscription`, as typed entries (markers: operation ``MARKER``).

        ``async with log.kv_entries(bucket) as entries: async for entry in entries: ...``
        """
        async with self.kv_subscription(bucket, last_per_subject=last_per_subject) as (queue, _):

            async def entries() -> AsyncIterator[KvEntry]:
                while True:
                    yield self.kv_entry(bucket, await queue.get())

            yield entries()

    async def kv_keys(self, bucket: str) -> list[KvEntry]:
        """Last entry of every key in a bucket (live or not)."""
        info = await self._bucket_info(names.kv_stream(bucket))
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
                    out.append(self.kv_entry(bucket, msg))
                    if msg.metadata.num_pending == 0:
                        return out
            except TimeoutError:
                raise Unavailable(f"timed out listing bucket {bucket}") from None


def require_positive(value: float, what: str) -> float:
    if value <= 0:
        raise InvalidInput(f"{what} must be > 0")
    return value


def _event_id(raw: RawMessage) -> str | None:
    """The id of the event stored in ``raw``, or None if it is not a cflow event."""
    try:
        return ev.decode(raw.data, raw.subject).id
    except MalformedEvent:
        return None
