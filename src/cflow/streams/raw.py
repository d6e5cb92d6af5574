"""A replay reader that speaks the NATS protocol itself: the stream in bulk, parsed cheaply.

nats-py parses every delivered message in Python into a ``Msg`` with its
headers and metadata; in a rebuild that was about 40% of the time. A replay
needs none of it: only ``(stream seq, subject, data, server time)`` in order.
:func:`replay_batches` opens its own connection (an :class:`asyncio.Protocol`)
and parses ``MSG``/``HMSG`` frames straight from the received bytes
(``bytes.find`` + a compiled pattern per frame, the payload sliced out once).

Theory of operation (the ordered consumer, as nats-py's, on our own socket):

* An ephemeral push consumer: ack none, flow control on, idle heartbeats,
  memory storage, one replica, starting at ``last + 1`` on our own inbox.
* Each delivery's reply subject ``$JS.ACK.<stream>.<consumer>.<delivered>.
  <sseq>.<cseq>.<ts>.<pending>`` (or the 12-token form with a domain) gives the
  stream and consumer sequences. The consumer sequence must be exactly one past
  the previous one; a heartbeat's ``Nats-Last-Consumer`` must equal the last
  seen. Otherwise a message was lost on the way (slow consumer, reconnect):
  the consumer is dropped and a new one starts at the last stream sequence
  kept + 1. A delivery at or below the last kept sequence is dropped. So the
  sequence handed out never skips and never repeats.
* Flow control requests and stalled heartbeats are answered once the reader
  has taken what was buffered before them (as nats-py answers once its
  callback has seen them): the server never runs further ahead than its
  flow-control window, so memory stays bounded while DuckDB is busy.
* No heartbeat and no message for two heartbeat intervals, a dropped socket,
  or a ``-ERR``: reconnect (to the next server of the connection's pool after
  a failed try) and start a new consumer after the last kept sequence,
  retrying for ``retry_s`` (a replay: 30 s; a live follower: for ever).

Only plain connections (optionally user/password or a token) are spoken here;
for TLS, credentials files or nkeys :func:`raw_capable` says no and the caller
uses nats-py's ordered consumer (``EventLog.follow_raw_batches``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import secrets
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from cflow.errors import CflowError, InvalidInput, NotFound, Unavailable
from cflow.streams import names

if TYPE_CHECKING:
    from cflow.streams.client import BadMessage, EventLog, StoredEvent

logger = logging.getLogger(__name__)
RawDelivery = tuple[int, str, bytes, int]  # (stream seq, subject, data, server time ms)

HEARTBEAT_S = 2.0
FILL_WAIT_S = 0.02  # the longest wait for more of a backlog before a batch is taken
STREAM_NOT_FOUND = 10059
WARN_EVERY_S = 30.0  # a reader that cannot reach its server says so again this often

_FRAME = re.compile(rb"(H?MSG) (\S+) (\d+) (?:(\S+) )?(?:(\d+) )?(\d+)\r\n")
_STATUS_100 = b"NATS/1.0 100"
API_SID = b"1"  # the subscription JetStream API replies come in on


def raw_capable(nc: Any) -> bool:
    """Whether :func:`replay_batches` can speak to ``nc``'s server as ``nc`` does
    (plain TCP, no credentials file, no nkey)."""
    opts = getattr(nc, "options", {}) or {}
    if any(opts.get(k) for k in ("tls", "user_credentials", "nkeys_seed", "nkeys_seed_str",
                                 "signature_cb", "user_jwt_cb")):
        return False
    url = getattr(nc, "connected_url", None)
    return url is not None and (url.scheme or "nats") == "nats"


def _addresses(nc: Any) -> list[tuple[str, int]]:
    """The server ``nc`` is connected to first, then the rest of its pool (a cluster)."""
    out: list[tuple[str, int]] = []
    for url in [nc.connected_url, *getattr(nc, "servers", [])]:
        if url is not None and url.hostname:
            address = (url.hostname, int(url.port or 4222))
            if address not in out:
                out.append(address)
    return out or [("127.0.0.1", 4222)]


def _auth(nc: Any) -> dict[str, Any]:
    url = nc.connected_url
    opts = nc.options or {}
    fields: dict[str, Any] = {}
    user = url.username or opts.get("user")
    password = url.password or opts.get("password")
    token = opts.get("token")
    if user and password is None and not token:
        token, user = user, None  # nats://TOKEN@host
    if user:
        fields.update(user=user, **({"pass": password} if password is not None else {}))
    if token:
        fields["auth_token"] = token
    return fields


class _Wire(asyncio.Protocol):
    """One connection: frames in, deliveries out (the ordered-consumer checks per frame)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.info: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.pong: asyncio.Future[None] | None = None
        self.replies: dict[bytes, asyncio.Future[bytes]] = {}
        self.error: BaseException | None = None
        self.wake = asyncio.Event()
        # the current consumer
        self.sid = b""
        self.expected_cseq = 1
        self.last = 0  # last stream sequence kept
        self.out: list[RawDelivery] = []
        self.caught_up = False  # the server said nothing is pending after the last one
        self.gap = False
        self.deferred: list[bytes] = []  # flow-control answers held until the reader drained
        self.hold = 0  # answer flow control only below this many unread deliveries
        self.last_activity = loop.time()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("NATS closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        buf = self.buf + data if self.buf else data
        pos = self._parse(buf)
        self.buf = buf[pos:]
        if self.out or self.gap or self.error is not None:
            self.wake.set()

    # -- parsing

    def _parse(self, buf: bytes) -> int:
        pos = 0
        size = len(buf)
        match = _FRAME.match
        find = buf.find
        out = self.out
        while pos < size:
            if buf.startswith(b"MSG ", pos) or buf.startswith(b"HMSG ", pos):
                m = match(buf, pos)
                if m is None:
                    if find(b"\r\n", pos) < 0:
                        break  # the control line is not complete yet
                    self._fail(CflowError("unparsable NATS frame"))
                    return size
                start = m.end()
                total = int(m.group(6))
                if start + total + 2 > size:
                    break  # the payload is not complete yet
                pos = start + total + 2
                sid = m.group(3)
                if sid != self.sid:
                    if sid == API_SID:
                        self._api_reply(m.group(2), buf[start:start + total])
                    continue  # an abandoned consumer's delivery
                reply = m.group(4)
                if m.group(1) == b"MSG":
                    hlen = 0
                elif m.group(5) is None:  # HMSG without a reply subject
                    hlen, reply = int(reply or b"0"), None
                else:
                    hlen = int(m.group(5))
                if hlen and buf.startswith(_STATUS_100, start):
                    self._control(reply, buf[start:start + hlen])
                    continue
                if reply is None or self.gap:
                    continue
                tokens = reply.split(b".")
                if len(tokens) == 9:
                    sseq, cseq, ts, pending = tokens[5], tokens[6], tokens[7], tokens[8]
                else:
                    sseq, cseq, ts, pending = tokens[7], tokens[8], tokens[9], tokens[10]
                if int(cseq) != self.expected_cseq:
                    self.gap = True  # a delivery was lost on the way: start over after last
                    continue
                self.expected_cseq += 1
                seq = int(sseq)
                if seq <= self.last:
                    continue
                self.last = seq
                out.append((seq, m.group(2).decode(), buf[start + hlen:start + total],
                            int(ts) // 1_000_000))
                self.caught_up = pending == b"0"
                continue
            end = find(b"\r\n", pos)
            if end < 0:
                break
            line = buf[pos:end]
            pos = end + 2
            if line == b"PING":
                self._send(b"PONG\r\n")
            elif line == b"PONG":
                if self.pong is not None and not self.pong.done():
                    self.pong.set_result(None)
            elif line.startswith(b"INFO "):
                if not self.info.done():
                    self.info.set_result(json.loads(line[5:]))
            elif line.startswith(b"-ERR"):
                self._fail(Unavailable(f"NATS refused the replay connection: "
                                       f"{line[5:].decode(errors='replace')}",
                                       reason="disconnected"))
        return pos

    def _api_reply(self, subject: bytes, body: bytes) -> None:
        fut = self.replies.pop(subject, None)
        if fut is not None and not fut.done():
            fut.set_result(body)

    def _control(self, reply: bytes | None, headers: bytes) -> None:
        """A flow-control request or an idle heartbeat of the current consumer."""
        if self.gap:
            return
        text = headers.decode(errors="replace")
        fields = {}
        for line in text.split("\r\n")[1:]:
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        last_consumer = fields.get("Nats-Last-Consumer")
        if last_consumer is not None and int(last_consumer) != self.expected_cseq - 1:
            self.gap = True
            self.wake.set()
            return
        answer = reply if reply else fields.get("Nats-Consumer-Stalled", "").encode() or None
        if answer:
            if len(self.out) > self.hold:
                self.deferred.append(answer)
            else:
                self._send(b"PUB " + answer + b" 0\r\n\r\n")

    def drained(self) -> None:
        """The reader took its batch: answer the flow control held for it."""
        if self.deferred and len(self.out) <= self.hold:
            answers, self.deferred = self.deferred, []
            self._send(b"".join(b"PUB " + a + b" 0\r\n\r\n" for a in answers))

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        for fut in [*self.replies.values(), self.info, self.pong]:
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionResetError(str(exc)))
        self.replies.clear()
        self.wake.set()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class ReplayReader:
    """Reads ``stream`` (``subject``) from a start sequence over its own connection."""

    def __init__(self, nc: Any, stream: str, subject: str, *, start_seq: int = 1,
                 max_batch: int = 20_000, retry_s: float = 30.0,
                 heartbeat_s: float = HEARTBEAT_S) -> None:
        self.addresses, self.auth = _addresses(nc), _auth(nc)
        self.turn = 0  # which address the next connection tries
        self.stream = stream
        self.subject = subject
        self.max_batch = max_batch
        self.retry_s = retry_s
        self.heartbeat_s = heartbeat_s
        self.last = start_seq - 1
        self.wire: _Wire | None = None
        self.consumer: str | None = None
        self.inbox = f"_INBOX.{secrets.token_hex(11)}"  # what permissions let replies use
        self.counter = 0
        self.pending_at_start = 0
        self.caught_up = False  # the last batch ended with nothing pending on the server
        self.resets = 0  # consumers started again after a gap or a dropped connection
        self._said: tuple[str, float] | None = None  # the outage's last warning, and when

    async def _connect(self) -> _Wire:
        loop = asyncio.get_running_loop()
        host, port = self.addresses[self.turn % len(self.addresses)]
        self.turn += 1  # a failed server is not tried twice in a row
        _, wire = await asyncio.wait_for(
            loop.create_connection(lambda: _Wire(loop), host, port), 5.0)
        self.turn -= 1  # connected: stay with this one
        try:
            await asyncio.wait_for(wire.info, 5.0)
            connect = {"verbose": False, "pedantic": False, "headers": True,
                       "no_responders": True, "protocol": 1, "lang": "python-cflow-raw",
                       "version": "1", "name": "cflow:replay", **self.auth}
            wire.pong = loop.create_future()
            wire._send(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n"
                       + f"SUB {self.inbox}.api.* 1\r\n".encode())
            await asyncio.wait_for(wire.pong, 5.0)
        except BaseException:
            wire.close()
            raise
        return wire

    async def _api(self, wire: _Wire, subject: str, body: dict[str, Any]) -> dict[str, Any]:
        self.counter += 1
        reply = f"{self.inbox}.api.{self.counter}"
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        wire.replies[reply.encode()] = fut
        data = json.dumps(body).encode()
        wire._send(f"PUB {subject} {reply} {len(data)}\r\n".encode() + data + b"\r\n")
        got = await asyncio.wait_for(fut, 5.0)
        if got.startswith(b"NATS/1.0"):  # a status only: 503 is "no responders"
            head, _, got = got.partition(b"\r\n\r\n")
            if not got:
                raise Unavailable(f"no JetStream responder for {subject} ("
                                  f"{head.decode(errors='replace').splitlines()[0]})",
                                  reason="no-responders")
        try:
            answer: dict[str, Any] = json.loads(got)
        except ValueError as exc:
            raise Unavailable(f"JetStream answered {subject} with something other than "
                              "JSON", reason="not-ready") from exc
        return answer

    async def _start_consumer(self, wire: _Wire) -> None:
        """A new ordered consumer after ``self.last`` on a new deliver subject."""
        self.counter += 1
        sid = str(self.counter + 1).encode()
        deliver = f"{self.inbox}.d{self.counter}"
        wire.sid, wire.expected_cseq, wire.last, wire.gap = sid, 1, self.last, False
        wire.out.clear()
        wire.deferred.clear()
        wire.caught_up = False
        wire.hold = self.max_batch
        wire._send(f"SUB {deliver} {sid.decode()}\r\n".encode())
        start = self.last + 1
        config: dict[str, Any] = {
            "deliver_subject": deliver, "ack_policy": "none", "max_deliver": 1,
            "flow_control": True, "idle_heartbeat": int(self.heartbeat_s * 1e9),
            "mem_storage": True, "num_replicas": 1, "filter_subject": self.subject,
            "inactive_threshold": int(5e9), "replay_policy": "instant",
        }
        if start > 1:
            config.update(deliver_policy="by_start_sequence", opt_start_seq=start)
        else:
            config["deliver_policy"] = "all"
        answer = await self._api(wire, f"$JS.API.CONSUMER.CREATE.{self.stream}",
                                 {"stream_name": self.stream, "config": config})
        error = answer.get("error")
        if error:
            if error.get("err_code") == STREAM_NOT_FOUND:
                raise NotFound("stream", f"{self.stream} (run `cfctl init`)")
            raise Unavailable(f"cannot start a replay consumer on {self.stream}: "
                              f"{error.get('description')}", reason="not-ready")
        self.consumer = answer.get("name") or (answer.get("config") or {}).get("name")
        self.pending_at_start = int(answer.get("num_pending") or 0)

    async def _drop_consumer(self, wire: _Wire) -> None:
        name, self.consumer = self.consumer, None
        if name and wire.error is None:
            wire._send(f"UNSUB {wire.sid.decode()}\r\n".encode())
            with contextlib.suppress(Exception):
                await self._api(wire, f"$JS.API.CONSUMER.DELETE.{self.stream}.{name}", {})

    async def _restart(self) -> _Wire:
        """A working connection with a fresh consumer after ``self.last`` (retried)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_s
        delay = 0.05
        while True:
            wire = self.wire
            try:
                if wire is None or wire.error is not None:
                    if wire is not None:
                        wire.close()
                    self.wire = None
                    wire = self.wire = await self._connect()
                else:
                    await self._drop_consumer(wire)
                await self._start_consumer(wire)
                if self._said is not None:
                    logger.warning("reading %s again", self.stream)
                    self._said = None
                return wire
            except (OSError, TimeoutError, ConnectionError, Unavailable) as exc:
                if self.wire is not None:
                    self.wire.close()
                    self.wire = None
                self._warn(_reason(exc), loop.time())
                if loop.time() + delay > deadline:
                    if isinstance(exc, Unavailable):
                        raise
                    raise Unavailable(f"cannot read {self.stream} for a replay: "
                                      f"{type(exc).__name__}", reason="disconnected") from exc
                await asyncio.sleep(delay)  # nothing to await: the server is away
                delay = min(delay * 2, 1.0)

    def _warn(self, reason: str, now: float) -> None:
        """Say why reading stopped once, and again only when the reason changes or
        every WARN_EVERY_S: a server away for minutes is not a line per retry."""
        if self._said is None or self._said[0] != reason or now - self._said[1] >= WARN_EVERY_S:
            logger.warning("reading %s: %s; trying again", self.stream, reason)
            self._said = (reason, now)

    async def start(self) -> int:
        """Connect and start the consumer now; how many messages it has to deliver."""
        if self.wire is None:
            self.wire = await self._restart()
        return self.pending_at_start

    async def next_batch(self) -> list[RawDelivery]:
        """The next deliveries in order (at most ``max_batch``), after a reset if one was needed."""
        loop = asyncio.get_running_loop()
        wire = self.wire if self.wire is not None else await self._restart()
        deadline: float | None = None
        while True:
            if wire.error is not None or wire.gap:
                self.resets += 1
                wire = await self._restart()
                deadline = None
                continue
            out = wire.out
            if out and (len(out) >= self.max_batch or wire.caught_up
                        or (deadline is not None and loop.time() >= deadline)):
                break
            if out and deadline is None:
                deadline = loop.time() + FILL_WAIT_S
            wire.wake.clear()
            wait = self.heartbeat_s * 2 if deadline is None else max(0.0, deadline - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wire.wake.wait(), wait)
            if not out and loop.time() - wire.last_activity > self.heartbeat_s * 2:
                wire._fail(Unavailable("the replay consumer went silent (missed heartbeats)",
                                       reason="timeout"))
        batch = out[:self.max_batch]
        del out[:self.max_batch]
        self.last = batch[-1][0]
        self.caught_up = wire.caught_up and not out
        wire.drained()
        return batch

    async def close(self) -> None:
        wire, self.wire = self.wire, None
        if wire is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._drop_consumer(wire), 2.0)
            wire.close()


async def replay_batches(nc: Any, stream: str, subject: str, *, start_seq: int = 1,
                         until_seq: int, max_batch: int = 20_000
                         ) -> AsyncGenerator[list[RawDelivery], None]:
    """Sequences ``start_seq..until_seq`` of ``stream`` (those on ``subject``), in order,
    in batches of at most ``max_batch`` ``(seq, subject, data, time_ms)``.

    Stops after the batch holding ``until_seq`` (or the last one below it).

    Raises:
        NotFound: the stream does not exist.
        Unavailable: the server could not be read for ``retry_s``.
    """
    reader = ReplayReader(nc, stream, subject, start_seq=start_seq, max_batch=max_batch)
    try:
        while reader.last < until_seq:
            batch = await reader.next_batch()
            if batch[-1][0] > until_seq:
                batch = [item for item in batch if item[0] <= until_seq]
                reader.last = until_seq
            if batch:
                yield batch
            if reader.caught_up:
                return  # nothing more on ``subject`` (until_seq is on another subject)
    finally:
        await reader.close()


def _reason(exc: BaseException) -> str:
    """Why a connection attempt failed, in words (not asyncio's address tuple)."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text or type(exc).__name__


READERS = ("raw", "nats-py")


async def replay_source(log: EventLog, *, until_seq: int, start_seq: int = 1,
                        max_batch: int = 20_000, reader: str = "raw"
                        ) -> AsyncGenerator[list[RawDelivery], None]:
    """A swarm's events ``start_seq..until_seq`` for a replay, undecoded, in batches.

    ``reader="raw"`` (the default) reads with :func:`replay_batches` when the
    connection allows it (:func:`raw_capable`), otherwise, and with
    ``reader="nats-py"``, with nats-py's ordered consumer
    (``EventLog.follow_raw_batches``): the same sequence either way.
    """
    if reader not in READERS:
        raise InvalidInput(f"unknown replay reader {reader!r} (one of {', '.join(READERS)})")
    if until_seq < start_seq:
        return
    if reader == "raw" and raw_capable(log.nc):
        batches = replay_batches(log.nc, log.stream, names.events_filter(log.swarm),
                                 start_seq=start_seq, until_seq=until_seq, max_batch=max_batch)
    else:
        batches = log.follow_raw_batches(start_seq=start_seq, max_batch=max_batch)
    try:
        async for batch in batches:
            if batch[-1][0] > until_seq:
                batch = [item for item in batch if item[0] <= until_seq]
            if batch:
                yield batch
            if batch and batch[-1][0] >= until_seq:
                return
    finally:
        await batches.aclose()



async def follow_batches(log: EventLog, *, start_seq: int = 1,
                         caught_up: asyncio.Event | None = None, max_batch: int = 5000,
                         reader: str = "raw"
                         ) -> AsyncGenerator[list[StoredEvent | BadMessage], None]:
    """``EventLog.follow_batches`` (decoded, the HLC receive rule per batch, ``caught_up``
    set with the batch holding the last stored event) read by :class:`ReplayReader`
    when ``reader="raw"`` and the connection allows it; otherwise nats-py's."""
    from cflow.streams.client import decode_delivery

    if reader not in READERS:
        raise InvalidInput(f"unknown reader {reader!r} (one of {', '.join(READERS)})")
    if reader != "raw" or not raw_capable(log.nc):
        batches = log.follow_batches(start_seq=start_seq, caught_up=caught_up,
                                     max_batch=max_batch)
        try:
            async for batch in batches:
                yield batch
        finally:
            await batches.aclose()
        return
    # A live follower outlasts any server outage, as nats-py's reconnects do.
    follower = ReplayReader(log.nc, log.stream, names.events_filter(log.swarm),
                            start_seq=start_seq, max_batch=max_batch, retry_s=math.inf)
    try:
        pending = await follower.start()
        if caught_up is not None and pending == 0:
            caught_up.set()  # nothing stored after start_seq - 1
        while True:
            raw = await follower.next_batch()
            batch = [decode_delivery(*item) for item in raw]
            log.server_clock.observe(max(item[3] for item in raw))
            log._observe_batch(batch)
            if caught_up is not None and follower.caught_up:
                caught_up.set()
            yield batch
    finally:
        await follower.close()


__all__ = ["READERS", "RawDelivery", "ReplayReader", "follow_batches", "raw_capable",
           "replay_batches", "replay_source"]
