"""The task-event feed: one follower per process, fanned out to the board, control and
reservations; and the one definition of "task ended"."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from cflow import events as ev
from cflow.background import stop_tasks
from cflow.feed import TaskFeed
from cflow.streams import BadMessage, StoredEvent, names
from cflow.swarm import Swarm
from cflow.tasks import TERMINAL, TRANSITIONS, TaskState, apply, ends_task

# --------------------------------------------------------------------- pure

_EXAMPLES: dict[str, list[ev.EventData]] = {
    "TaskCreated": [ev.TaskCreated(title="t"), ev.TaskCreated(title="t", depends_on=("d",))],
    "TaskReady": [ev.TaskReady()],
    "TaskBlocked": [ev.TaskBlocked(reason="r", blocked_by="d")],
    "TaskClaimed": [ev.TaskClaimed(owner="w", attempt=1, lease_ttl_s=30.0)],
    "TaskCompleted": [ev.TaskCompleted(epoch=0)],
    "TaskFailed": [ev.TaskFailed(epoch=0, error="e", final=True),
                   ev.TaskFailed(epoch=0, error="e", final=False, retry_after_ms=0)],
    "TaskReleased": [ev.TaskReleased(epoch=0)],
    "TaskLeaseExpired": [ev.TaskLeaseExpired(epoch=0, owner="w", reason="lease expired")],
    "TaskRequeued": [ev.TaskRequeued(attempt=1, retry_after_ms=0)],
    "TaskCancelled": [ev.TaskCancelled(reason="r")],
}
_CLAIM = ev.TaskClaimed(owner="w", attempt=1, lease_ttl_s=30.0)
_PATHS: dict[str | None, list[ev.EventData]] = {
    None: [],
    "pending": [ev.TaskCreated(title="t", depends_on=("d",))],
    "ready": [ev.TaskCreated(title="t")],
    "blocked": [ev.TaskCreated(title="t", depends_on=("d",)),
                ev.TaskBlocked(reason="r", blocked_by="d")],
    "claimed": [ev.TaskCreated(title="t"), _CLAIM],
    "expired": [ev.TaskCreated(title="t"), _CLAIM,
                ev.TaskLeaseExpired(epoch=2, owner="w", reason="lease expired")],
}


def _event(data: ev.EventData, seq: int) -> ev.Event:
    return ev.make_event(data, swarm="s", entity_id="t1", hlc=f"{seq:032d}", actor="w")


def _fold(status: str | None, *, gate: bool = False) -> tuple[TaskState | None, int]:
    """A task in ``status`` (None: absent), folded from real events; and its last seq."""
    state: TaskState | None = None
    seq = 0
    path = [ev.TaskCreated(title="g", kind="gate")] if gate else _PATHS[status]
    for data in path:
        seq += 1
        state = apply(state, _event(data, seq), seq, 1000 * seq)
    return state, seq


@pytest.mark.parametrize(("status", "event_type"), sorted(TRANSITIONS, key=str))
def test_ends_task_is_exactly_a_step_into_a_terminal_status(status: str | None,
                                                            event_type: str) -> None:
    for data in _EXAMPLES[event_type]:
        if (status, data) == ("expired", ev.TaskFailed(epoch=0, error="e", final=False,
                                                         retry_after_ms=0)):
            continue  # never written: the reaper's failure after the last attempt is final
        # A ready task is completed or failed without a claim only as a gate (a human).
        state, seq = _fold(status, gate=status == "ready"
                           and isinstance(data, ev.TaskCompleted | ev.TaskFailed))
        if state is not None and getattr(data, "epoch", None) == 0 and state.epoch:
            data = msgspec.structs.replace(data, epoch=state.epoch)  # type: ignore[type-var]
        after = apply(state, _event(data, seq + 1), seq + 1, 1000 * (seq + 1))
        assert ends_task(data) is (after.status in TERMINAL), (status, data)


# ------------------------------------------------------------ against a server


class Recorder:
    """One subscriber of a feed: what it got, in order, and a way to await progress."""

    def __init__(self, feed: TaskFeed, name: str, *, start_seq: int = 1,
                 gate: asyncio.Event | None = None) -> None:
        self.feed = feed
        self.name = name
        self.start_seq = start_seq
        self.gate = gate  # held closed: the subscriber is stuck in I/O on each event
        self.seqs: list[int] = []
        self.caught_up = asyncio.Event()
        self.moved = asyncio.Condition()

    async def run(self) -> None:
        async with self.feed.subscribe(self.name, start_seq=self.start_seq,
                                       caught_up=self.caught_up) as events:
            async for item in events:
                self.seqs.append(item.seq)
                async with self.moved:
                    self.moved.notify_all()
                if self.gate is not None:
                    await self.gate.wait()

    async def reaches(self, seq: int, within: float = 10.0) -> None:
        async with self.moved:
            await asyncio.wait_for(self.moved.wait_for(
                lambda: bool(self.seqs) and self.seqs[-1] >= seq), within)


async def _released(swarm: Swarm, reservation_id: str) -> str:
    subject = names.event_subject(swarm.name, "reservation", reservation_id)
    agen = swarm.log.follow(subject)
    try:
        async for item in agen:
            if getattr(item, "event", None) is not None and item.event.type == "PathsReleased":
                return str(item.event.data.reason)
    finally:
        await agen.aclose()
    raise AssertionError("unreachable")


@pytest.mark.integration
async def test_one_follower_per_process_for_board_control_and_reservations(
        nats_url: str, swarm_name: str, swarm: Swarm) -> None:
    task_events = names.events_filter(swarm_name, "task")
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="m") as m:
        following = 0  # task-event followers of `m` open now
        follow = m.log.follow

        async def counted(filter_subject: str | None = None, **kw: Any
                          ) -> AsyncIterator[StoredEvent | BadMessage]:
            nonlocal following
            mine = filter_subject == task_events
            following += mine
            agen = follow(filter_subject, **kw)
            try:
                async for item in agen:
                    yield item
            finally:
                following -= mine
                await agen.aclose()

        m.log.follow = counted  # type: ignore[assignment]
        maint = asyncio.create_task(m.tasks.maintain())
        try:
            await m.tasks.ensure_board()
            await m.control.ensure()
            t = await swarm.tasks.create("x")
            lease = await swarm.tasks.claim(t.task_id)
            assert lease is not None
            held = await swarm.reservations.reserve(["a/*"], task_id=t.task_id)
            await lease.complete("ok")
            # m's reservation maintenance saw the completion on m's feed ...
            assert await asyncio.wait_for(_released(swarm, held.id), 10) == "task completed"
            assert m.feed.caught_up.is_set()
            # ... and its board, control and reservations share one follower (a
            # subscriber that came after the feed passed its start read the missed
            # range with a short-lived reader, closed since).
            assert following == 1
        finally:
            await stop_tasks([maint])


@pytest.mark.integration
async def test_fan_out_in_order_with_a_stalled_and_a_late_subscriber(swarm: Swarm) -> None:
    created = [await swarm.tasks.create(f"t{i}") for i in range(3)]
    history = await swarm.log.last_seq("task", created[-1].task_id)
    stall = asyncio.Event()
    fast = Recorder(swarm.feed, "fast")
    stalled = Recorder(swarm.feed, "stalled", gate=stall)
    late = Recorder(swarm.feed, "late")
    runners = [asyncio.create_task(stalled.run()), asyncio.create_task(fast.run())]
    try:
        await asyncio.wait_for(fast.caught_up.wait(), 10)
        assert swarm.feed.caught_up.is_set() and fast.seqs[-1] == history
        assert len(stalled.seqs) == 1 and not stalled.caught_up.is_set()  # stuck; nobody waits
        news = await swarm.tasks.create("news")
        news_seq = await swarm.log.last_seq("task", news.task_id)
        await fast.reaches(news_seq)
        assert swarm.feed.live(news_seq) and not swarm.feed.live(history)
        # A subscriber from the start, after the feed passed it: history, then the rest.
        runners.append(asyncio.create_task(late.run()))
        await asyncio.wait_for(late.caught_up.wait(), 10)
        await late.reaches(news_seq)
        assert late.seqs == fast.seqs
        stall.set()
        await stalled.reaches(news_seq)
        assert stalled.seqs == fast.seqs == sorted(set(fast.seqs))
        assert stalled.caught_up.is_set()
    finally:
        await stop_tasks(runners)


@pytest.mark.integration
async def test_a_subscriber_from_a_later_sequence_gets_only_what_follows(swarm: Swarm) -> None:
    await swarm.tasks.create("old")
    start = await swarm.log.stream_last_seq() + 1
    from_now = Recorder(swarm.feed, "from now", start_seq=start)
    runner = asyncio.create_task(from_now.run())
    try:
        await asyncio.wait_for(from_now.caught_up.wait(), 10)
        new = await swarm.tasks.create("new")
        new_seq = await swarm.log.last_seq("task", new.task_id)
        await from_now.reaches(new_seq)
        assert from_now.seqs == [new_seq]
    finally:
        await stop_tasks([runner])


@pytest.mark.integration
async def test_a_late_subscriber_catches_up_when_the_stream_ends_with_other_events(
        nats_url: str, swarm_name: str, swarm: Swarm) -> None:
    # The first subscriber starts after a non-task event (an agent registering), so
    # the range a later subscriber must replay ends with no task event at its end.
    old = await swarm.tasks.create("old")
    await swarm.agents.register("someone", ["py"])
    start = await swarm.log.stream_last_seq() + 1
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="fresh") as fresh:
        first = Recorder(fresh.feed, "first", start_seq=start)
        everything = Recorder(fresh.feed, "everything")
        runners = [asyncio.create_task(first.run())]
        try:
            await asyncio.wait_for(first.caught_up.wait(), 10)
            runners.append(asyncio.create_task(everything.run()))
            # Caught up on history without waiting for news.
            await asyncio.wait_for(everything.caught_up.wait(), 10)
            assert everything.seqs == [await swarm.log.last_seq("task", old.task_id)]
            new = await swarm.tasks.create("new")
            await everything.reaches(await swarm.log.last_seq("task", new.task_id))
            assert len(everything.seqs) == 2 and first.seqs == everything.seqs[1:]
        finally:
            await stop_tasks(runners)
