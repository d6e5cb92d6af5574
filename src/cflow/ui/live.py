"""Live updates: one follower of the swarm's events, fanned out to every open page.

The console follows the events stream with an ordered push consumer (the same
``EventLog.follow`` the projector uses), starting after the last stored
sequence: NATS pushes each event as it is stored, nothing polls. Each open
page holds one server-sent-events connection with a small queue; the hub puts
the newest sequence (and whether the swarm's control state moved) in every
queue. A slow page only ever has "the newest sequence" waiting, never a
backlog, and the page re-reads the projection at that sequence
(read-your-writes through the query service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cflow.errors import Unavailable

if TYPE_CHECKING:
    from cflow.swarm import Swarm

log = logging.getLogger(__name__)
START_TIMEOUT_S = 10.0

# Types whose event changes the banner (pause, resume, stop, budgets, breakers).
CONTROL_TYPES = frozenset({"SwarmPaused", "SwarmResumed", "SwarmStopped", "BudgetSet",
                           "BudgetExceeded", "BreakerOpened", "BreakerClosed"})


@dataclass
class Update:
    seq: int
    control: bool = False
    types: frozenset[str] = frozenset()


class LiveHub:
    """Follows the swarm's events and tells every subscriber the newest sequence."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.seq = 0
        self._subscribers: set[asyncio.Queue[Update]] = set()
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        """Follow from the newest event on; return once caught up.

        Raises:
            Unavailable: NATS did not answer within :data:`START_TIMEOUT_S`.
        """
        import nats.errors

        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                self.seq = await self.swarm.log.stream_last_seq()
                self._task = asyncio.create_task(self._follow(self.seq + 1))
                await self.ready.wait()
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            await self.stop()
            raise Unavailable(f"the console could not follow the swarm's events within "
                              f"{START_TIMEOUT_S:g} s ({type(exc).__name__}); is NATS "
                              "reachable?") from None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _follow(self, start: int) -> None:
        while True:
            caught_up = asyncio.Event()
            waiter = asyncio.create_task(caught_up.wait())
            waiter.add_done_callback(self._caught_up)
            try:
                async for item in self.swarm.log.follow(start_seq=start, caught_up=caught_up):
                    start = item.seq + 1
                    etype = getattr(getattr(item, "event", None), "type", "")
                    self._publish(item.seq, etype)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("console follower stopped (%s); restarting", exc)
                self.ready.set()
                await asyncio.sleep(1.0)
            finally:
                waiter.cancel()  # one waiter per follow, never one left behind per restart

    def _caught_up(self, waiter: asyncio.Task[bool]) -> None:
        if not waiter.cancelled():
            self.ready.set()

    def _publish(self, seq: int, etype: str) -> None:
        self.seq = max(self.seq, seq)
        for queue in list(self._subscribers):
            merged = Update(seq, etype in CONTROL_TYPES, frozenset({etype}))
            while not queue.empty():  # keep only the newest, merged
                old = queue.get_nowait()
                merged = Update(max(old.seq, seq), old.control or merged.control,
                                old.types | merged.types)
            queue.put_nowait(merged)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Update]]:
        queue: asyncio.Queue[Update] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)


__all__ = ["CONTROL_TYPES", "LiveHub", "Update"]
