"""The claim path's messages on nats-py's own connection, without its per-message hops.

A claim + complete is about ten small messages, and at 16 agent processes on two
cores the client's CPU per message decides claims per second. nats-py spends
two event-loop iterations per message that the message does not need:

* **Out:** ``Client.publish`` appends the command to a buffer and wakes the
  flusher task, which writes it on the next iteration. :func:`publish` queues
  the command in a per-connection outbox that one ``loop.call_soon`` writes at
  the start of the next iteration, so what one iteration sends still shares a
  ``send`` (a claim's lease and event) without the flusher task's step. It
  hands the command to ``Client.publish`` instead when nats-py has something
  queued already (so the order on the wire is the order of the calls), when
  not connected (nats-py buffers it for the reconnect), for a payload over the
  server's limit, and for headers nats-py would refuse: those behave as before.
* **In:** a subscription with a callback queues each message for a task of its
  own, which runs the callback on the next iteration. :func:`deliver_directly`
  replaces that queue with one that calls a plain function as the message is
  parsed, for subscriptions whose handler only resolves a future or fills a
  queue (the ack inbox, the offer inbox).

Measured on this 2-core VM, one process awaiting JetStream publishes through
the ack inbox: 73-94 µs of user CPU per publish instead of 115-127 µs
(``bench`` section ``claims``, figures ``claims.floor``).

Both lean on nats-py 2.x internals (``_transport``, ``_pending``,
``_max_payload``, ``Subscription._pending_queue``, ``_pending_size``);
:func:`available` says whether they are there, and every caller falls back to
the public API when they are not. ``tests/test_fastpath.py`` fails if the
bypass stops applying, so an upgrade that renames them is noticed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # nats-py's own check
_UNSAFE_VALUE = re.compile(r"[\r\n]")


def available(nc: NATS) -> bool:
    """Whether ``nc`` has the internals :func:`publish` writes through."""
    return all(hasattr(nc, name) for name in ("_transport", "_pending", "_max_payload",
                                              "stats"))


def command(subject: str, payload: bytes, reply: str = "",
            headers: dict[str, str] | None = None) -> bytes | None:
    """The ``PUB``/``HPUB`` bytes nats-py would send, or None for headers it would
    change or refuse (a key outside its pattern, a line break in a value)."""
    if not headers:
        return b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(payload),
                                             payload)
    lines = [b"NATS/1.0\r\n"]
    for key, value in headers.items():
        if not _HEADER_KEY.fullmatch(key) or _UNSAFE_VALUE.search(value) \
                or value != value.strip():
            return None
        lines.append(b"%s: %s\r\n" % (key.encode(), value.encode()))
    lines.append(b"\r\n")
    head = b"".join(lines)
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (subject.encode(), reply.encode(), len(head),
                                               len(head) + len(payload), head, payload)


class _Outbox:
    """This iteration's commands for one connection, written together by one
    ``call_soon`` at the start of the next (as nats-py's flusher would, without
    its task): a claim's lease and event share one ``send``."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.parts: list[bytes] = []

    def add(self, data: bytes) -> None:
        if not self.parts:
            asyncio.get_running_loop().call_soon(self.flush)
        self.parts.append(data)

    def flush(self) -> None:
        parts, self.parts = self.parts, []
        nc = self.nc
        if nc.is_connected and nc._transport is not None:
            if nc._pending:  # queued by nats-py after ours: ours go first
                nc._pending[:0] = parts
                nc._pending_data_size += sum(map(len, parts))
            else:
                nc._transport.writelines(parts)
        elif not nc.is_closed:  # reconnecting: nats-py sends its buffer once back
            nc._pending[:0] = parts
            nc._pending_data_size += sum(map(len, parts))
        # closed: lost, as a publish on a closed connection is (a request times out)


_outboxes: weakref.WeakKeyDictionary[Any, _Outbox] = weakref.WeakKeyDictionary()


def publish_now(nc: NATS, subject: str, payload: bytes, reply: str = "",
                headers: dict[str, str] | None = None) -> bool:
    """Queue the message for this iteration's write; False when ``nc.publish`` must
    send it (anything nats-py queued itself goes out after what is queued here)."""
    if not nc.is_connected or nc._pending or nc._transport is None or not subject:
        return False
    if len(payload) > nc._max_payload:
        return False  # nats-py raises MaxPayloadError: let it
    data = command(subject, payload, reply, headers)
    if data is None:
        return False
    outbox = _outboxes.get(nc)
    if outbox is None:
        outbox = _outboxes[nc] = _Outbox(nc)
    outbox.add(data)
    nc.stats["out_msgs"] += 1
    nc.stats["out_bytes"] += len(payload)
    return True


async def publish(nc: NATS, subject: str, payload: bytes = b"", *, reply: str = "",
                  headers: dict[str, str] | None = None) -> None:
    """``nc.publish`` with the same errors, written at once when nothing is queued.

    Raises:
        nats.errors.Error, OSError: as ``nc.publish`` (only on its path).
    """
    if not publish_now(nc, subject, payload, reply, headers):
        await nc.publish(subject, payload, reply=reply, headers=headers)


class _Direct:
    """A subscription's pending queue that hands each message to a function at once.

    nats-py's reader calls ``put_nowait`` while it parses; its per-subscription
    task waits on ``get`` for ever (cancelled when the subscription ends).
    """

    def __init__(self, sub: Subscription, deliver: Callable[[Msg], Any]) -> None:
        self.sub = sub
        self.deliver = deliver

    def put_nowait(self, msg: Msg) -> None:
        self.sub._pending_size -= len(msg.data)  # nats-py counted it as queued
        try:
            self.deliver(msg)
        except Exception:  # never into nats-py's read loop
            log.exception("handling a message on %s failed", msg.subject)

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def task_done(self) -> None:
        return None

    async def join(self) -> None:
        return None

    async def get(self) -> Msg:
        await asyncio.get_running_loop().create_future()  # nothing is ever queued
        raise AssertionError("unreachable")


def deliver_directly(sub: Subscription, deliver: Callable[[Msg], Any]) -> bool:
    """Have ``deliver`` called with each of ``sub``'s messages as it is parsed.

    Call it right after subscribing, before anything can arrive. ``deliver``
    runs inside nats-py's reader: it must not block or await (resolving a
    future, filling a queue). Returns False (and changes nothing) when ``sub``
    lacks the internals; its callback then goes on handling the messages.
    """
    queue = getattr(sub, "_pending_queue", None)
    if not isinstance(queue, asyncio.Queue) or not queue.empty() \
            or not hasattr(sub, "_pending_size"):
        return False
    sub._pending_queue = _Direct(sub, deliver)  # type: ignore[assignment]
    return True


__all__ = ["available", "command", "deliver_directly", "publish", "publish_now"]
