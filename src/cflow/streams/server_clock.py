"""The server's current time, estimated from the timestamps it puts on messages (pure).

Theory of operation
-------------------
Every stored JetStream message carries the time the server stored it, and a
``STREAM.INFO`` reply carries the time the server answered. Each such stamp
``t`` was read off the server's clock *before* we received it, so at local
monotonic time ``m`` (when we received it) the server's clock read at least
``t``, and at any later monotonic time ``m'`` at least ``t + (m' - m)``. The
estimate is the largest of these lower bounds: it never runs ahead of the
server (up to the drift between the two clocks' rates), and no wall clock of
this process enters it.

A lower bound can be stale: replaying an hour-old message says only that the
server is at least an hour old. A *probe* (a request answered with the server's
current time) gives a tight bound; after one, a message stamp that raises the
estimate is at least as fresh as the probe and counts as fresh evidence too.
``fresh(within_s)`` tells the caller whether to probe again.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class ServerClock:
    """Lower-bound estimate of one server's clock in ms since the epoch."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._base_ms: int | None = None  # server ms at local monotonic _base_at
        self._base_at = 0.0
        self._fresh_at: float | None = None  # last probe, or raise after a probe

    def now_ms(self) -> int:
        """The estimate now; 0 before any server timestamp was seen."""
        if self._base_ms is None:
            return 0
        return self._base_ms + int((self._monotonic() - self._base_at) * 1000)

    def observe(self, server_ms: int, *, probe: bool = False) -> None:
        """Feed one server timestamp received just now.

        ``probe``: it is the server's time at answering (not a stored message's).
        """
        if server_ms <= 0:
            return
        at = self._monotonic()
        raised = server_ms > self.now_ms()
        if raised:
            self._base_ms, self._base_at = server_ms, at
        if probe or (raised and self._fresh_at is not None):
            self._fresh_at = at

    def fresh(self, within_s: float) -> bool:
        """Whether a probe (or a stamp that beat it) was received within ``within_s``."""
        return self._fresh_at is not None and self._monotonic() - self._fresh_at <= within_s
