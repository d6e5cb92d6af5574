"""Pause / resume / stop, budgets and circuit breakers against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from cflow import events as ev
from cflow.control import ControlView
from cflow.errors import LimitExceeded, Paused
from cflow.leases import Lease
from cflow.swarm import Swarm
from support import maintained

pytestmark = pytest.mark.integration


@pytest.fixture
async def admin(nats_url: str, swarm_name: str) -> AsyncIterator[Swarm]:
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="alice") as s:
        yield s


@contextlib.asynccontextmanager
async def maintainer(nats_url: str, swarm_name: str) -> AsyncIterator[Swarm]:
    """A long-lived process: task maintenance, which runs the control maintenance too."""
    async with maintained(nats_url, swarm_name, "maintainer") as s:
        await s.control.ensure()
        yield s


async def view_until(swarm: Swarm, ok: Callable[[ControlView], bool],
                     within: float = 10.0) -> ControlView:
    """Await this process's control cache reaching a state (pushed by the KV watch)."""
    async def wait() -> ControlView:
        async for view in swarm.control.watch():
            if ok(view):
                return view
        raise AssertionError("watch ended")

    return await asyncio.wait_for(wait(), within)


async def control_events(swarm: Swarm) -> list[ev.Event]:
    from cflow.streams import StoredEvent, names

    items = await swarm.log.read(names.events_filter(swarm.name, "control"))
    return [i.event for i in items if isinstance(i, StoredEvent)]


async def control_events_until(swarm: Swarm, kind: type[ev.EventData],
                               within: float = 10.0) -> list[ev.EventData]:
    """The data of the control events of type ``kind``, once there is one (followed
    from the stream, so each event is awaited, not polled for)."""
    from cflow.streams import StoredEvent, names

    caught_up = asyncio.Event()
    found: list[ev.EventData] = []
    events = swarm.log.follow(names.events_filter(swarm.name, "control"), caught_up=caught_up)
    try:
        async with asyncio.timeout(within):
            async for item in events:
                if isinstance(item, StoredEvent) and isinstance(item.event.data, kind):
                    found.append(item.event.data)
                if found and caught_up.is_set():
                    return found
    finally:
        await events.aclose()
    raise AssertionError("the follow ended")


async def test_pause_stops_claims_across_claimers_and_resume_restarts_them(
        nats_url: str, swarm_name: str, admin: Swarm) -> None:
    async with contextlib.AsyncExitStack() as stack:
        claimers = [await stack.enter_async_context(
            Swarm.connect(nats_url, swarm=swarm_name, agent=f"w{i}")) for i in range(3)]
        for c in claimers:
            await c.tasks.ensure_board()
            await c.control.ensure()
        # Claimers idle in a push-woken wait before the pause...
        waiting = [asyncio.create_task(c.tasks.claim(wait=20)) for c in claimers]
        await asyncio.sleep(0.1)  # let them reach their wait; nothing to await on here
        await admin.control.pause(reason="deploying")
        for c in claimers:
            await view_until(c, lambda v: v.mode == "paused")
        # ...learn it at once (well within one heartbeat interval) and refuse to claim.
        loop = asyncio.get_running_loop()
        started = loop.time()
        done, _ = await asyncio.wait(waiting, timeout=5)
        assert len(done) == 3
        for t in waiting:
            with pytest.raises(Paused, match="deploying"):
                t.result()
        assert loop.time() - started < 1.0
        tasks = [await admin.tasks.create(f"t{i}") for i in range(3)]
        for c in claimers:
            with pytest.raises(Paused, match="paused by alice: deploying"):
                await c.tasks.claim(wait=0.5)
            with pytest.raises(Paused):
                await c.tasks.claim(tasks[0].task_id)
        assert all(s.status == "ready" for s in await admin.tasks.list())

        await admin.control.resume(reason="done")
        for c in claimers:
            await view_until(c, lambda v: v.mode == "running")
        leases = await asyncio.gather(*(c.tasks.claim(wait=5) for c in claimers))
        assert sorted(lease.task_id for lease in leases if lease) == sorted(
            t.task_id for t in tasks)
        for lease in leases:
            assert lease is not None
            await lease.complete("ok")

    events = await control_events(admin)
    assert [(e.type, e.actor) for e in events] == [("SwarmPaused", "alice"),
                                                   ("SwarmResumed", "alice")]
    assert isinstance(events[0].data, ev.SwarmPaused) and events[0].data.reason == "deploying"


async def test_stop_now_cancels_every_claimed_task(nats_url: str, swarm_name: str,
                                                  admin: Swarm) -> None:
    for i in range(4):
        await admin.tasks.create(f"job {i}", lease_ttl_s=3)
    async with contextlib.AsyncExitStack() as stack:
        claimers = [await stack.enter_async_context(
            Swarm.connect(nats_url, swarm=swarm_name, agent=f"w{i}")) for i in range(3)]
        leases: list[Lease] = []
        for c in claimers:
            lease = await c.tasks.claim()
            assert lease is not None
            leases.append(lease)
            await stack.enter_async_context(lease.keep_alive(interval_s=0.3))
            await c.control.ensure()
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await admin.control.stop(now=True, reason="runaway spend")
        assert sorted(result["cancelled"]) == sorted(lease.task_id for lease in leases)
        # Holders learn it at their next heartbeat: seconds, not minutes.
        await asyncio.wait_for(asyncio.gather(*(lease.lost.wait() for lease in leases)), 5)
        assert all(lease.cancelled for lease in leases)
        assert loop.time() - started < 2.0
        for c in claimers:
            await asyncio.wait_for(c.control.stopped.wait(), 5)
            with pytest.raises(Paused, match="stopped by alice: runaway spend"):
                await c.tasks.claim()
    for lease in leases:
        history = await admin.tasks.history(lease.task_id)
        last = history[-1].event
        assert last.type == "TaskCancelled" and last.actor == "alice"
        assert "swarm stopped by alice: runaway spend" in last.data.reason  # type: ignore[union-attr]
    statuses = sorted(s.status for s in await admin.tasks.list())
    assert statuses == ["cancelled"] * 3 + ["ready"]  # unclaimed work is kept, not dropped
    events = await control_events(admin)
    assert [(e.type, e.actor) for e in events] == [("SwarmStopped", "alice")]
    await admin.control.resume(reason="fixed")
    await view_until(admin, lambda v: v.mode == "running")
    assert await admin.tasks.claim() is not None


async def test_runaway_subtasks_hit_depth_and_count_budgets(admin: Swarm) -> None:
    root = await admin.tasks.create("root: plan the refactor")
    other = await admin.tasks.create("unrelated work")
    await admin.control.set_budget(root.task_id, {"max_children": 3, "max_depth": 2})

    # Agents that keep creating sub-tasks of their sub-tasks: depth runs out first.
    async def runaway(parent: str, fan_out: int, levels: int) -> None:
        frontier = [parent]
        for level in range(levels):
            below = []
            for p in frontier:
                for i in range(fan_out):
                    child = await admin.tasks.create(f"level {level} #{i}", parent_id=p)
                    below.append(child.task_id)
            frontier = below

    with pytest.raises(LimitExceeded, match="max_depth") as depth_err:
        await runaway(root.task_id, 1, 10)
    chain = [s.task_id for s in sorted(await admin.tasks.list(), key=lambda s: s.depth)
             if s.task_id != other.task_id]
    assert len(chain) == 3  # root, depth 1, depth 2; depth 3 refused
    assert depth_err.value.paused == root.task_id
    view = await view_until(admin, lambda v: v.scope(root.task_id).mode == "paused")
    assert "max_depth" in view.scope(root.task_id).reason

    # The subtree is paused: its tasks are skipped; other work goes on.
    with pytest.raises(Paused, match=f"scope {root.task_id}"):
        await admin.tasks.claim(chain[2])
    lease = await admin.tasks.claim()
    assert lease is not None and lease.task_id == other.task_id
    await lease.complete()
    assert await admin.tasks.claim() is None

    await admin.control.resume(root.task_id, reason="looked at it")
    await view_until(admin, lambda v: v.scope(root.task_id).mode == "running")
    with pytest.raises(LimitExceeded, match="max_children"):
        await runaway(root.task_id, 10, 1)
    children = [s for s in await admin.tasks.list() if s.parent_id == root.task_id]
    assert len(children) == 3  # the one from the chain + 2 of the fan-out
    await view_until(admin, lambda v: v.scope(root.task_id).mode == "paused")

    events = await control_events(admin)
    exceeded = [e.data for e in events if isinstance(e.data, ev.BudgetExceeded)]
    assert [(x.scope, x.budget, x.limit, x.value) for x in exceeded] == [
        (root.task_id, "max_depth", 2, 3), (root.task_id, "max_children", 3, 4)]
    paused = [e for e in events if e.type == "SwarmPaused"]
    assert len(paused) == 2 and all(e.actor.startswith("budget:") for e in paused)
    assert "max_children" in paused[-1].data.reason  # type: ignore[union-attr]


async def test_swarm_depth_budget_pauses_the_offending_tree(admin: Swarm) -> None:
    await admin.control.set_budget("swarm", {"max_depth": 1})
    top = await admin.tasks.create("top")
    child = await admin.tasks.create("child", parent_id=top.task_id)
    with pytest.raises(LimitExceeded, match="budget max_depth of the swarm"):
        await admin.tasks.create("grandchild", parent_id=child.task_id)
    view = await view_until(admin, lambda v: v.scope(top.task_id).mode == "paused")
    assert view.mode == "running"  # the swarm goes on; only the tree is paused


async def test_spend_budget_pauses_the_swarm(nats_url: str, swarm_name: str,
                                             admin: Swarm) -> None:
    await admin.control.set_budget("swarm", {"max_spend_usd": 1.0})
    async with maintainer(nats_url, swarm_name):
        for i in range(2):
            await admin.tasks.create(f"costly {i}")
            lease = await admin.tasks.claim(wait=5)
            assert lease is not None
            await lease.complete("done", cost_usd=0.6)
        view = await view_until(admin, lambda v: v.mode == "paused")
        # The pause (KV) is written before its BudgetExceeded event is appended:
        # awaited while the maintainer that writes both still runs.
        exceeded = await control_events_until(admin, ev.BudgetExceeded)
    assert "max_spend_usd" in view.swarm.reason
    assert len(exceeded) == 1 and exceeded[0].scope == "swarm"
    assert exceeded[0].value == pytest.approx(1.2)


async def test_attempts_budget_per_window(nats_url: str, swarm_name: str,
                                          admin: Swarm) -> None:
    """The attempts counter is shared: once the window holds max_attempts claims, the
    next claim is refused before it is written (and the swarm paused)."""
    await admin.control.set_budget("swarm", {"max_attempts": 2, "window_s": 60})
    async with maintainer(nats_url, swarm_name):
        for i in range(3):
            await admin.tasks.create(f"t{i}")
        for n in (1, 2):
            lease = await admin.tasks.claim(wait=5)
            assert lease is not None
            await lease.release("again")
            await view_until(admin, lambda v, n=n: len(v.attempts("swarm").claims) == n)
        with pytest.raises(Paused, match="max_attempts of the swarm exceeded: 3 > 2"):
            await admin.tasks.claim()
        view = await view_until(admin, lambda v: v.mode == "paused")
    assert "max_attempts" in view.swarm.reason
    from cflow.streams import StoredEvent, names

    items = await admin.log.read(names.events_filter(admin.name, "task"))
    claims = [i for i in items if isinstance(i, StoredEvent) and i.event.type == "TaskClaimed"]
    assert len(claims) == 2  # the refused claim wrote nothing
    with pytest.raises(Paused, match="max_attempts"):
        await admin.tasks.claim()


async def test_breaker_opens_on_repeated_failures_and_closes_after_cool_down(
        nats_url: str, swarm_name: str, admin: Swarm) -> None:
    await admin.control.set_budget("swarm", {"breaker_failures": 3, "breaker_cooldown_s": 1})
    async with maintainer(nats_url, swarm_name):
        for i in range(3):
            await admin.tasks.create(f"flaky {i}", capabilities=["gpu"], max_attempts=1)
            # wait: the board may fold the fresh task a moment after create returns
            lease = await admin.tasks.claim(capabilities=["gpu"], wait=5)
            assert lease is not None
            await lease.fail("CUDA out of memory", retry=False)
        await view_until(admin, lambda v: bool(v.open_breakers(ev_now())))
        gpu = await admin.tasks.create("gpu job", capabilities=["gpu"])
        plain = await admin.tasks.create("plain job")
        with pytest.raises(Paused, match="capability gpu"):
            await admin.tasks.claim(gpu.task_id, capabilities=["gpu"])
        lease = await admin.tasks.claim(capabilities=["gpu"])
        assert lease is not None and lease.task_id == plain.task_id  # skipped, not refused
        await lease.complete()
        # After the cool-down the waiting claimer is woken and gets the gpu task.
        loop = asyncio.get_running_loop()
        started = loop.time()
        lease = await admin.tasks.claim(capabilities=["gpu"], wait=5)
        assert lease is not None and lease.task_id == gpu.task_id
        assert 0.3 < loop.time() - started < 3.0
        await lease.complete()
        await view_until(admin, lambda v: all(b.state == "closed"
                                              for b in v.breakers.values()))
    events = await control_events(admin)
    types = [e.type for e in events]
    assert types == ["BudgetSet", "BreakerOpened", "BreakerClosed"]
    opened = events[1].data
    assert isinstance(opened, ev.BreakerOpened)
    assert (opened.scope, opened.failures, opened.cool_down_s) == ("gpu", 3, 1)


async def test_stop_now_by_a_human_cancels_through_the_task_service(admin: Swarm) -> None:
    task = await admin.tasks.create("job", lease_ttl_s=3)
    lease = await admin.tasks.claim(task.task_id, agent="w")
    assert lease is not None
    result = await admin.control.stop(now=True, reason="drill", actor="bob")
    assert result["cancelled"] == [task.task_id]
    last = (await admin.tasks.history(task.task_id))[-1].event
    assert (last.type, last.actor) == ("TaskCancelled", "bob")
    assert last.data.reason == "swarm stopped by bob: drill"  # type: ignore[union-attr]
    assert await lease.heartbeat() == "cancelled"  # the holder learns it at once
    assert lease.cancelled and lease.lost.is_set()


def ev_now() -> int:
    from cflow.streams.client import wall_ms

    return wall_ms()


async def test_a_claim_racing_stop_now_is_cancelled_by_maintenance(
        nats_url: str, swarm_name: str, admin: Swarm) -> None:
    task = await admin.tasks.create("raced", lease_ttl_s=3)
    async with maintainer(nats_url, swarm_name) as m, \
            Swarm.connect(nats_url, swarm=swarm_name, agent="late") as late:
        await late.tasks.ensure_board()
        late.tasks.claim_guards.clear()  # as if its cache had not seen the stop yet
        await admin.control.stop(now=True, reason="halt")
        await view_until(m, lambda v: v.mode == "stopped")
        lease = await late.tasks.claim()
        assert lease is not None and lease.task_id == task.task_id
        async with lease.keep_alive(interval_s=0.3):
            await asyncio.wait_for(lease.lost.wait(), 10)
        assert lease.cancelled
    state = await admin.tasks.get(task.task_id)
    assert state.status == "cancelled" and state.reason == "swarm stopped by alice: halt"
