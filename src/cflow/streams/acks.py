"""JetStream publish acks through one inbox per connection, without nats-py's
per-request machinery.

``js.publish`` in nats-py 2.16 costs, per write, a random token from the OS, a
``wait_for`` (one more event-loop hop before the writer resumes), a JSON parse
into a ``PubAck`` dataclass and two subject validations. On the claim path that
is a measurable share of a cycle (three awaited writes per claim + complete),
and at 16 agent processes on two cores the client's CPU is what limits claims
per second. :class:`AckMux` keeps one wildcard subscription per connection,
names each request by a counter, resolves its future straight from the
subscription callback and decodes the ack with msgspec. Errors are the nats-py
ones (``TimeoutError``, ``NoRespondersError``, ``APIError``), so
:func:`cflow.streams.errors.translate` maps them as before.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from typing import TYPE_CHECKING

import msgspec
import nats.errors
import nats.js.errors

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg


class _ApiError(msgspec.Struct):
    code: int | None = None
    err_code: int | None = None
    description: str | None = None


class PubAck(msgspec.Struct):
    """The parts of a JetStream publish answer the writers use."""

    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_ack_decoder = msgspec.json.Decoder(PubAck)


def decode_ack(reply: Msg) -> tuple[int, bool]:
    """(sequence, duplicate) of a publish answer; the nats-py error it stands for otherwise.

    Raises:
        nats.js.errors.NoStreamResponseError: no stream listens on the subject (503).
        nats.js.errors.APIError: the server refused the write (its error code inside).
    """
    if reply.headers and reply.headers.get("Status") == "503":
        raise nats.js.errors.NoStreamResponseError
    try:
        ack = _ack_decoder.decode(reply.data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise nats.js.errors.APIError(description=f"bad publish answer: {reply.data[:80]!r}"
                                      ) from None
    if ack.error is not None:
        raise nats.js.errors.APIError.from_error({
            "code": ack.error.code, "err_code": ack.error.err_code,
            "description": ack.error.description})
    return ack.seq, ack.duplicate


class AckMux:
    """One wildcard inbox on a connection; each request waits on its own future."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.prefix: str | None = None
        self.waiting: dict[str, asyncio.Future[Msg]] = {}
        self._tokens = itertools.count(1)
        self._subscribing: asyncio.Lock = asyncio.Lock()

    async def _inbox(self) -> str:
        if self.prefix is None:
            async with self._subscribing:
                if self.prefix is None:
                    prefix = f"{self.nc.new_inbox()}."
                    await self.nc.subscribe(f"{prefix}*", cb=self._answered)
                    self.prefix = prefix
        return self.prefix

    async def _answered(self, msg: Msg) -> None:
        assert self.prefix is not None
        future = self.waiting.pop(msg.subject[len(self.prefix):], None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def request(self, subject: str, payload: bytes, headers: dict[str, str],
                      timeout: float) -> Msg:  # noqa: ASYNC109 - a request's own bound
        """Publish with a reply subject of this inbox and wait for the answer.

        Raises:
            nats.errors.TimeoutError: no answer within ``timeout``.
            nats.errors.Error, OSError: the publish itself failed.
        """
        prefix = self.prefix or await self._inbox()
        token = str(next(self._tokens))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self.waiting[token] = future
        try:
            await self.nc.publish(subject, payload, reply=prefix + token, headers=headers)
            timer = loop.call_later(timeout, _expire, future)
            try:
                return await future
            finally:
                timer.cancel()
        finally:
            self.waiting.pop(token, None)


def _expire(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


_muxes: weakref.WeakKeyDictionary[NATS, AckMux] = weakref.WeakKeyDictionary()


def ack_mux(nc: NATS) -> AckMux:
    """The connection's mux (made on first use; it lives as long as the connection)."""
    mux = _muxes.get(nc)
    if mux is None:
        mux = _muxes[nc] = AckMux(nc)
    return mux


async def js_publish(nc: NATS, subject: str, payload: bytes, headers: dict[str, str],
                     timeout: float) -> tuple[int, bool]:  # noqa: ASYNC109
    """One awaited JetStream publish: (sequence, duplicate). nats-py errors as nats-py's."""
    reply = await ack_mux(nc).request(subject, payload, headers, timeout)
    return decode_ack(reply)
