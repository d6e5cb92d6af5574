"""The task-event feed: one follower of a swarm's task events per process, fanned out.

Theory of operation
-------------------
The claim path's board, control's maintenance (breakers, attempts and spend
budgets) and the reservations' maintenance (release when a task ends) all fold the
swarm's task events (``cf.<swarm>.evt.task.*``). A :class:`TaskFeed` is the one
ordered push consumer (:meth:`EventLog.follow`) a process runs for them; the
:class:`~cflow.swarm.Swarm` owns it and hands it to the services.

- **Fan-out.** Each subscriber has its own queue and consumes it in its own task:
  the feed only appends to queues, so a subscriber doing I/O per event (releasing
  reservations, opening a breaker) never stalls the board or another subscriber.
- **Order, no gaps.** A subscriber gets every task event from its ``start_seq``
  once, in stream order. One that subscribes after the feed has passed its
  ``start_seq`` first reads the missed range with a short-lived reader of its own,
  then goes on with what the feed delivered meanwhile (deduplicated by sequence).
- **One caught-up signal.** The feed is *caught up* once it has delivered what
  was stored when it started following (:attr:`TaskFeed.caught_up`,
  :attr:`TaskFeed.caught_up_seq`). An event after that point is *live*
  (:meth:`TaskFeed.live`): it happened while this process was watching, so a
  maintainer may act on it as news (history is only folded). Each subscription
  also says when *it* has processed everything up to that point (its
  ``caught_up`` event), which is what "the board is current" means.
- **Failure.** If following fails (no stream, NATS gone for good), every current
  subscriber's iteration raises the error; the next subscription starts the feed
  again after the last delivered sequence.

What "the task ended" means is :func:`cflow.tasks.ends_task`, for every subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from types import TracebackType

from cflow.background import stop_tasks
from cflow.streams import BadMessage, EventLog, StoredEvent, names

log = logging.getLogger("cflow.feed")

_Delivery = StoredEvent | BadMessage | BaseException | None  # None: look at caught-up again


class TaskFeed:
    """The swarm's task events, followed once and delivered to every subscriber."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.filter = names.events_filter(log.swarm, "task")
        self.caught_up = asyncio.Event()  # the feed delivered what was stored when it started
        self.caught_up_seq: int | None = None  # the last sequence stored at that point
        self.position = 0  # the last sequence delivered (0: none yet)
        self._subscriptions: set[TaskSubscription] = set()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (f"TaskFeed({self.filter}, position={self.position}, "
                f"subscribers={len(self._subscriptions)})")

    def live(self, seq: int) -> bool:
        """Whether the event at ``seq`` came after the feed caught up (news, not history)."""
        return self.caught_up_seq is not None and seq > self.caught_up_seq

    def subscribe(self, name: str, *, start_seq: int = 1,
                  caught_up: asyncio.Event | None = None) -> TaskSubscription:
        """A subscription to every task event from ``start_seq`` (use ``async with``).

        ``caught_up`` (optional, else the subscription's own) is set once the
        subscriber has processed everything stored when the feed caught up.
        """
        return TaskSubscription(self, name, max(1, start_seq), caught_up)

    def _attach(self, sub: TaskSubscription) -> None:
        self._subscriptions.add(sub)
        if self._task is None or self._task.done():
            if self._task is None and not self._others(sub):
                # Nobody needs what lies before the first subscriber's start.
                self.position = max(self.position, sub.next_seq - 1)
                sub.replay_to = 0
            self._task = asyncio.get_running_loop().create_task(
                self._follow(), name=f"task-feed-{self.log.swarm}")

    def _others(self, sub: TaskSubscription) -> bool:
        return any(other is not sub for other in self._subscriptions)

    def _detach(self, sub: TaskSubscription) -> None:
        self._subscriptions.discard(sub)

    def _deliver(self, item: _Delivery) -> None:
        for sub in self._subscriptions:
            sub.queue.put_nowait(item)

    async def _follow(self) -> None:
        reached = asyncio.Event()
        watcher = asyncio.create_task(self._on_caught_up(reached), name="task-feed-caught-up")
        try:
            async for item in self.log.follow(self.filter, start_seq=self.position + 1,
                                              caught_up=reached):
                if reached.is_set() and self.caught_up_seq is None:
                    # ``follow`` sets it just before yielding the last stored item.
                    self._mark_caught_up(item.seq)
                self.position = item.seq
                self._deliver(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every subscriber learns it; the next one restarts us
            log.warning("task feed of %s stopped: %s", self.log.swarm, exc)
            self._deliver(exc)
        finally:
            watcher.cancel()

    async def _on_caught_up(self, reached: asyncio.Event) -> None:
        await reached.wait()
        if self.caught_up_seq is None:  # nothing (more) was stored: caught up as it stands
            self._mark_caught_up(self.position)
            self._deliver(None)

    def _mark_caught_up(self, seq: int) -> None:
        self.caught_up_seq = seq
        self.caught_up.set()

    async def aclose(self) -> None:
        """Stop following (subscribers' iterations then wait for nothing more)."""
        await stop_tasks([self._task])
        self._task = None


class TaskSubscription:
    """One subscriber's view of the feed: ``async with feed.subscribe(...) as events``,
    then ``async for event in events`` (each a :class:`StoredEvent`, in stream order)."""

    def __init__(self, feed: TaskFeed, name: str, start_seq: int,
                 caught_up: asyncio.Event | None) -> None:
        self.feed = feed
        self.name = name
        self.next_seq = start_seq  # the first sequence not handed out yet
        self.caught_up = caught_up if caught_up is not None else asyncio.Event()
        self.queue: asyncio.Queue[_Delivery] = asyncio.Queue()
        self.replay_to = 0  # read up to here from the log, not from the feed
        self._replay: AsyncGenerator[StoredEvent | BadMessage, None] | None = None
        self._replay_done = asyncio.Event()  # the replay handed out the last stored event

    def __repr__(self) -> str:
        return f"TaskSubscription({self.name}, next_seq={self.next_seq})"

    async def __aenter__(self) -> TaskSubscription:
        # Synchronous up to the attach: what the feed delivered so far is replayed,
        # what it delivers from now on is queued, and nothing falls in between.
        if self.next_seq <= self.feed.position:
            self.replay_to = self.feed.position
        self.feed._attach(self)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.feed._detach(self)
        await self._close_replay()

    def __aiter__(self) -> TaskSubscription:
        return self

    async def __anext__(self) -> StoredEvent:
        while True:
            item: StoredEvent | BadMessage
            if self.next_seq <= self.replay_to:
                replayed = await self._replayed()
                if replayed is None:  # no more task events up to replay_to
                    self.next_seq = self.replay_to + 1
                    continue
                item = replayed
            else:
                self._check_caught_up()
                got = await self.queue.get()
                if got is None:
                    continue
                if isinstance(got, BaseException):
                    raise got
                item = got
            if item.seq < self.next_seq:
                continue  # replayed already, or before this subscriber's start
            self.next_seq = item.seq + 1
            if isinstance(item, StoredEvent):
                return item

    def _check_caught_up(self) -> None:
        point = self.feed.caught_up_seq
        if point is not None and self.next_seq > max(point, self.replay_to):
            self.caught_up.set()

    async def _replayed(self) -> StoredEvent | BadMessage | None:
        """The next event of the range the feed had passed when we subscribed, or
        None when the log holds no more task events in that range (it may end with
        events of other kinds: then no item reaches ``replay_to``)."""
        if self._replay is None:
            self._replay_done = asyncio.Event()
            self._replay = self.feed.log.follow(self.feed.filter, start_seq=self.next_seq,
                                                caught_up=self._replay_done)
        elif self._replay_done.is_set():  # the last stored one was handed out already
            await self._close_replay()
            return None
        step = asyncio.ensure_future(anext(self._replay))
        done = asyncio.ensure_future(self._replay_done.wait())
        try:
            await asyncio.wait({step, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            done.cancel()
            if not step.done():  # nothing was stored (set at once, nothing to yield)
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
        if step.cancelled():
            await self._close_replay()
            return None
        item = step.result()
        if item.seq >= self.replay_to:
            await self._close_replay()
        return item

    async def _close_replay(self) -> None:
        if self._replay is not None:
            replay, self._replay = self._replay, None
            with contextlib.suppress(Exception):
                await replay.aclose()


__all__ = ["TaskFeed", "TaskSubscription"]
