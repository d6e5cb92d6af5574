"""One keep-alive loop for everything held with a server-side TTL.

Task leases (:class:`cflow.leases.Lease`), agent presence (:meth:`cflow.agents.Agent.present`)
and path reservations (:meth:`cflow.reservations.ReservationService.keep_alive`) are all
a key that the server removes when its TTL passes unless the holder renews it. They
share this loop, and so they share its promise: the holder is told it lost the thing
*before* anyone else can take it over.

Theory of operation
-------------------
The timing is the pure :class:`~cflow.lease_policy.LeasePolicy` and the holder's state
the pure :class:`~cflow.lease_policy.HolderClock` (monotonic clock only):

- renew every ``TTL / 3`` (or the interval the caller asks for);
- a renewal that fails for a transient reason (NATS unreachable, a timeout) is retried
  with a short, growing backoff, never later than the deadline;
- every renewal that succeeds moves the holder's deadline to ``sent + TTL - margin``;
  the server stored that renewal after it was sent, so its TTL runs out later;
- when the deadline passes without a successful renewal (the process was cut off,
  paused, or a renewal hangs on a dead connection: each attempt is abandoned at the
  deadline), or a renewal is refused, the thing is *lost*: ``held.lost`` is set,
  ``held.lost_reason`` says why, the loop ends and ``on_lost`` is called once.

What is held is anything with the three attributes of :class:`Held` (a :class:`Lease`
is one; :class:`Holding` is the plain one). A renewal records its own outcome on the
holder's clock (:func:`renewal` wraps an operation that does not); the loop records a
renewal that it abandoned at the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from cflow.background import stop_tasks
from cflow.errors import CflowError
from cflow.lease_policy import HolderClock, LeasePolicy

log = logging.getLogger("cflow.keepalive")

T = TypeVar("T")
MIN_ATTEMPT_S = 0.05  # the shortest time a renewal attempt is given


class Held(Protocol):
    """Something held with a TTL, as its holder sees it."""

    clock: HolderClock  # the deadline and the failures in a row (replaced on every change)
    lost: asyncio.Event  # set once it is lost; never cleared
    lost_reason: str | None


class Holding:
    """The plain :class:`Held`: one tenure of a presence key, a reservation, ..."""

    def __init__(self, policy: LeasePolicy, sent_mono: float) -> None:
        """``sent_mono``: when the write that created (or last renewed) it was sent."""
        self.clock = HolderClock.start(policy, sent_mono)
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None

    def __repr__(self) -> str:
        state = f"lost: {self.lost_reason}" if self.lost.is_set() else "held"
        return f"Holding({state}, deadline={self.clock.deadline:.3f})"

    @property
    def deadline(self) -> float:
        """Monotonic time at which the holder gives up without a successful renewal."""
        return self.clock.deadline


def mark_lost(held: Held, reason: str) -> None:
    """Set ``held`` lost (the first reason wins)."""
    if not held.lost.is_set():
        held.lost_reason = reason
        held.lost.set()


def check_deadline(held: Held, now_mono: float | None = None) -> bool:
    """Mark ``held`` lost if its deadline passed; True if it is lost (now or before)."""
    held.clock = held.clock.check(time.monotonic() if now_mono is None else now_mono)
    if held.clock.lost is not None:
        mark_lost(held, held.clock.lost)
    return held.lost.is_set()


async def renewal(held: Held, op: Callable[[], Awaitable[T]], *,
                  refused: tuple[type[BaseException], ...] = ()) -> T:
    """Run one renewal ``op`` and record its outcome on ``held.clock``.

    Raises:
        whatever ``op`` raises: one of ``refused`` (``held`` is then lost with the
        error's ``reason``), or a transient ``CflowError`` (``held`` is lost only if
        its deadline passed meanwhile).
    """
    sent = time.monotonic()
    try:
        result = await op()
    except refused as exc:
        reason = str(getattr(exc, "reason", "") or exc or "refused")
        held.clock = held.clock.after("refused", sent_mono=sent, now_mono=time.monotonic(),
                                      reason=reason)
        mark_lost(held, reason)
        raise
    except CflowError:
        held.clock = held.clock.after("failed", sent_mono=sent, now_mono=time.monotonic())
        check_deadline(held)
        raise
    held.clock = held.clock.after("renewed", sent_mono=sent, now_mono=time.monotonic())
    return result


async def keep_renewing(held: Held, renew: Callable[[], Awaitable[object]], *, name: str,
                        interval_s: float | None = None) -> None:
    """Renew ``held`` until it is lost, then return (a renewal error never escapes).

    ``renew`` makes one renewal and records its outcome on ``held.clock`` (see
    :func:`renewal`); a refusal marks ``held`` lost. ``interval_s`` defaults to the
    policy's heartbeat interval (TTL / 3). Woken early when ``held`` is marked lost
    elsewhere (a refused write of the holder's own).
    """
    period = interval_s or held.clock.policy.heartbeat_interval_s
    next_at = time.monotonic() + period
    while not held.lost.is_set():
        wake = min(next_at, held.clock.deadline)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(held.lost.wait(), max(0.0, wake - time.monotonic()))
        if held.lost.is_set() or check_deadline(held):
            break
        sent = time.monotonic()
        # A renewal hanging on a dead connection must not outlive the deadline.
        attempt = asyncio.timeout(max(MIN_ATTEMPT_S, held.clock.deadline - sent))
        try:
            async with attempt:
                await renew()
        except (CflowError, TimeoutError) as exc:
            if held.lost.is_set():
                break  # refused
            if attempt.expired():
                held.clock = held.clock.after("failed", sent_mono=sent,
                                              now_mono=time.monotonic())
            if check_deadline(held):
                break
            log.warning("renewal of %s failed: %s", name, exc or "timed out")
            next_at = held.clock.next_attempt(time.monotonic())
            continue
        next_at = sent + period
    log.info("%s lost: %s", name, held.lost_reason)


@contextlib.asynccontextmanager
async def kept_alive(held: Held, renew: Callable[[], Awaitable[object]], *, name: str,
                     interval_s: float | None = None,
                     on_lost: Callable[[], None] | None = None) -> AsyncIterator[Held]:
    """Run :func:`keep_renewing` in the background while the block runs.

    ``on_lost`` is called once, when ``held`` is lost (not when the block ends first).
    """
    async def run() -> None:
        await keep_renewing(held, renew, name=name, interval_s=interval_s)
        if on_lost is not None:
            on_lost()

    task = asyncio.create_task(run(), name=name)
    try:
        yield held
    finally:
        await stop_tasks([task])


async def regain(op: Callable[[], Awaitable[T]], policy: LeasePolicy, *, name: str,
                 attempt_s: float | None = None) -> tuple[float, T]:
    """Retry ``op`` (a write that takes the thing again) until it succeeds.

    Each attempt is given ``attempt_s`` (default: the heartbeat interval); failures
    back off as renewals do. Returns when the successful attempt was sent (the start
    of the new tenure, for :class:`Holding`) and its result.
    """
    limit = attempt_s or policy.heartbeat_interval_s
    failures = 0
    while True:
        sent = time.monotonic()
        try:
            async with asyncio.timeout(limit):
                return sent, await op()
        except (CflowError, TimeoutError) as exc:
            failures += 1
            log.warning("taking %s again failed: %s", name, exc or "timed out")
        await asyncio.sleep(policy.retry_delay_s(failures))  # a backoff is a timer by nature


__all__ = [
    "Held",
    "Holding",
    "check_deadline",
    "keep_renewing",
    "kept_alive",
    "mark_lost",
    "regain",
    "renewal",
]
