"""Issue 14: the claim path keeps its promises under skew, outages and foreign writers.

Each test reproduces one numbered case of the issue against a real nats-server;
faults are injected where they bite (a skewed wall clock during one
participant's writes, a maintenance write failing for two seconds, a
maintenance hook that raises) and the invariants are read back from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cflow import events as ev
from cflow.errors import LeaseLost, NotHolder, Unavailable
from cflow.hlc import Timestamp
from cflow.leases import maintenance_status
from cflow.metrics import maintenance_lines
from cflow.streams import client as streams_client
from cflow.swarm import Swarm
from support import maintained, until

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def skewed_wall_clock(monkeypatch: pytest.MonkeyPatch, offset_s: float) -> Iterator[None]:
    """This process's wall clock off by ``offset_s`` while the block runs."""
    real = streams_client.wall_ms
    with monkeypatch.context() as m:
        m.setattr(streams_client, "wall_ms", lambda: real() + int(offset_s * 1000))
        yield


async def _history(swarm: Swarm, task_id: str) -> list[ev.Event]:
    return [item.event for item in await swarm.tasks.history(task_id)]


# ------------------------------------------------------------- 2: client clocks


@pytest.mark.parametrize("offset_s", [-600.0, -120.0, 600.0])
async def test_a_skewed_holder_is_neither_reaped_nor_hides_its_task(
        nats_url: str, swarm_name: str, swarm: Swarm, monkeypatch: pytest.MonkeyPatch,
        offset_s: float) -> None:
    """Case 2: a claimer minutes off keeps a healthy claim; its retry hides nothing."""
    t = await swarm.tasks.create("skewed", lease_ttl_s=2, start_to_close_s=60,
                                 backoff_initial_s=1.0)
    async with maintained(nats_url, swarm_name) as reaper:
        with skewed_wall_clock(monkeypatch, offset_s):
            lease = await swarm.tasks.claim(t.task_id, agent="skewed")
            assert lease is not None
            async with lease.keep_alive(interval_s=0.3):
                # Two TTLs of a healthy holder with a maintainer watching.
                await asyncio.sleep(4.0)  # the claim must survive this long: time is the input
                assert not lease.lost.is_set(), lease.lost_reason
            failed = await lease.fail("flaky", retry=True)
        assert failed.status == "ready"
        # Claimable again about one backoff (1 s) after the failure, by server time.
        started = time.monotonic()
        again = await reaper.tasks.claim(agent="other", wait=10.0)
        assert again is not None and again.task_id == t.task_id
        assert time.monotonic() - started < 3.0
    history = await _history(swarm, t.task_id)
    assert not [e for e in history if e.type == "TaskLeaseExpired"]
    # The HLC still orders the task's events, although the claimer's clock was off.
    stamps = [Timestamp.parse(e.hlc) for e in history if e.entity_kind == "task"]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)


async def test_a_lagging_claimer_still_stamps_after_the_creation(
        swarm: Swarm, monkeypatch: pytest.MonkeyPatch) -> None:
    t = await swarm.tasks.create("ordered")
    with skewed_wall_clock(monkeypatch, -120.0):
        lease = await swarm.tasks.claim(t.task_id, agent="behind")
    assert lease is not None
    created, claimed = (e for e in await _history(swarm, t.task_id) if e.entity_kind == "task")
    assert Timestamp.parse(claimed.hlc) > Timestamp.parse(created.hlc)


# ----------------------------------------------------------- 3: transient errors


class FlakyAppends:
    """Make one participant's appends fail (as in an outage) for ``outage_s``
    starting with the first append of a type in ``trigger``."""

    def __init__(self, swarm: Swarm, trigger: set[str], outage_s: float) -> None:
        self.real = swarm.log.append
        self.trigger = trigger
        self.outage_s = outage_s
        self.until: float | None = None
        self.refused: list[str] = []
        swarm.log.append = self.append  # type: ignore[method-assign]

    async def append(self, data: ev.EventData, *args: Any, **kwargs: Any) -> Any:
        name = type(data).__name__
        if self.until is None and name in self.trigger:
            self.until = time.monotonic() + self.outage_s
        if self.until is not None and time.monotonic() < self.until:
            self.refused.append(name)
            raise Unavailable("injected outage")
        return await self.real(data, *args, **kwargs)


async def test_maintenance_retries_a_requeue_that_failed(nats_url: str, swarm_name: str,
                                                         swarm: Swarm) -> None:
    """Case 3: an outage right after TaskLeaseExpired must not strand the task."""
    t = await swarm.tasks.create("reaped", lease_ttl_s=1, max_attempts=3)
    lease = await swarm.tasks.claim(t.task_id, agent="dies")
    assert lease is not None  # and never renewed
    async with maintained(nats_url, swarm_name) as reaper:
        flaky = FlakyAppends(reaper, {"TaskRequeued"}, outage_s=2.0)
        state = await until(reaper, t.task_id, lambda s: s.status == "ready", within=15)
    assert state.attempt == 1 and flaky.refused  # the requeue failed first, then was stored


async def test_maintenance_retries_readiness_after_a_completion(nats_url: str, swarm_name: str,
                                                                swarm: Swarm) -> None:
    """Case 3: an outage right after TaskCompleted must not leave the dependent pending."""
    a = await swarm.tasks.create("a")
    b = await swarm.tasks.create("b", depends_on=[a.task_id])
    assert b.status == "pending"
    async with maintained(nats_url, swarm_name) as maintainer:
        flaky = FlakyAppends(maintainer, {"TaskReady"}, outage_s=2.0)
        lease = await maintainer.tasks.claim(a.task_id, agent="w")
        assert lease is not None
        # The holder's own evaluation fails in the outage: the completion is still
        # reported as stored, and the maintainer makes the dependent ready later.
        done = await lease.complete("ok")
        assert done.status == "completed"
        state = await until(maintainer, b.task_id, lambda s: s.status == "ready", within=15)
    assert state.status == "ready" and flaky.refused


# -------------------------------------------------------- 4: supervised maintenance


async def test_status_gathers_every_maintainer_and_stops_once_answers_stall(
        nats_url: str, swarm_name: str, swarm: Swarm) -> None:
    """`cfctl status` asks an unknown number of maintainers: it ends a short stall
    after the last answer, or at once when none listens, not at its outer limit,
    and misses none."""
    async with asyncio.timeout(30):  # nobody listens yet: the server says so at once
        assert await maintenance_status(swarm, within_s=600) == []
    async with maintained(nats_url, swarm_name, "m1"), maintained(nats_url, swarm_name, "m2"):
        for _ in range(50):  # each maintainer subscribes once its loop has started
            if {r["agent"] for r in await maintenance_status(swarm)} == {"m1", "m2"}:
                break
        async with asyncio.timeout(30):  # far below the outer limit: the stall ended it
            seen = await maintenance_status(swarm, within_s=600)
        assert [r["agent"] for r in seen] == ["m1", "m2"]
        assert all(r["running"] for r in seen)


async def test_a_failing_maintenance_hook_is_restarted_and_reaping_goes_on(
        nats_url: str, swarm_name: str, swarm: Swarm) -> None:
    """Case 4: one maintenance hook raising no longer ends maintenance."""
    calls = 0

    async def broken_hook() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("hook bug")

    async with Swarm.connect(nats_url, swarm=swarm_name, agent="maint") as m:
        m.maintenance_hooks.append(broken_hook)
        maint = asyncio.create_task(m.tasks.maintain())
        try:
            t = await swarm.tasks.create("orphan", lease_ttl_s=1)
            assert await swarm.tasks.claim(t.task_id, agent="gone") is not None
            state = await until(m, t.task_id, lambda s: s.status == "ready" and s.attempt == 1)
            assert state.status == "ready"
            assert calls >= 2  # restarted with backoff
            assert not maint.done()
            health = m.tasks.health.to_dict()
            assert health["running"] and health["failures"] >= 2
            assert "hook bug" in str(health["last_error"])
            # Visible from another process: `cfctl status` asks every maintainer.
            [seen] = [r for r in await maintenance_status(swarm) if r["agent"] == "maint"]
            assert seen["running"] and seen["failures"] >= 2 and seen["reaped"] == 1
            assert "hook bug" in seen["last_error"]
            # ... and in this process's metrics.
            text = maintenance_lines(swarm_name, m.maintenance_health())
            assert f'cflow_maintenance_reaped_total{{swarm="{swarm_name}"}} 1' in text
        finally:
            maint.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maint


# ------------------------------------------------------ 6, 7: fencing by identity


async def test_a_fenced_holders_fail_is_refused_and_kept_as_a_note(
        nats_url: str, swarm_name: str, swarm: Swarm) -> None:
    """Case 6: the reaper's final TaskFailed and the holder's late fail do not collide."""
    t = await swarm.tasks.create("once", lease_ttl_s=1, max_attempts=1)
    lease = await swarm.tasks.claim(t.task_id, agent="slow")
    assert lease is not None
    async with maintained(nats_url, swarm_name) as reaper:
        await until(reaper, t.task_id, lambda s: s.status == "failed")
    with pytest.raises(LeaseLost):
        await lease.fail("late error", cost_usd=0.5)
    history = await swarm.tasks.history(t.task_id)
    fails = [x.event for x in history if x.event.type == "TaskFailed"]
    assert len(fails) == 1 and fails[0].actor == "reaper"
    notes = [x.event.data for x in history if x.event.type == "TaskNoted"]
    assert any("late error" in n.text and "0.5" in n.text for n in notes)  # type: ignore[union-attr]


async def test_only_the_holder_of_record_may_write_with_its_epoch(swarm: Swarm) -> None:
    """Case 7: the epoch is public (task_find shows it); it is not a credential."""
    t = await swarm.tasks.create("mine")
    lease = await swarm.tasks.claim(t.task_id, agent="alice")
    assert lease is not None
    for write in (
        swarm.tasks.complete(t.task_id, lease.epoch, "stolen", agent="bob"),
        swarm.tasks.fail(t.task_id, lease.epoch, "sabotage", agent="bob"),
        swarm.tasks.release(t.task_id, lease.epoch, agent="bob"),
        swarm.tasks.heartbeat(t.task_id, lease.epoch, agent="bob"),
        swarm.tasks.note(t.task_id, "as alice", epoch=lease.epoch, actor="bob"),
    ):
        with pytest.raises(NotHolder, match="held by alice, not by bob"):
            await write
    state = await swarm.tasks.get(t.task_id)
    assert state.status == "claimed" and state.owner == "alice"
    done = await lease.complete("mine")
    assert done.status == "completed" and done.result == "mine"


async def test_a_retried_completion_is_the_same_write(swarm: Swarm) -> None:
    """A holder retrying its completion (after a timeout) is recognised, not refused."""
    t = await swarm.tasks.create("twice")
    lease = await swarm.tasks.claim(t.task_id, agent="w")
    assert lease is not None
    first = await lease.complete("ok")
    again = await lease.complete("ok")
    assert first.status == again.status == "completed" and again.result == "ok"
    completions = [e for e in await _history(swarm, t.task_id) if e.type == "TaskCompleted"]
    assert len(completions) == 1


# --------------------------------------------- a leases bucket emptied under holders


async def test_an_emptied_leases_bucket_keeps_live_holders_and_reaps_dead_ones(
        nats_url: str, swarm_name: str, swarm: Swarm) -> None:
    """Leases are soft state: if the bucket loses its keys (a purge, a re-created
    stream), a holder still working writes its lease again and keeps its claim,
    and a dead holder's task comes back only after a whole TTL of grace."""
    from cflow.streams import names
    from cflow.streams.client import api_request

    alive_task = await swarm.tasks.create("holder survives", lease_ttl_s=3)
    dead_task = await swarm.tasks.create("holder died", lease_ttl_s=3)
    alive = await swarm.tasks.claim(alive_task.task_id, agent="alive")
    dead = await swarm.tasks.claim(dead_task.task_id, agent="dead")  # never renewed
    assert alive is not None and dead is not None
    stream = names.kv_stream(swarm.log.bucket(names.LEASES))
    await api_request(swarm.nc, f"$JS.API.STREAM.PURGE.{stream}", {})
    emptied = time.monotonic()
    async with maintained(nats_url, swarm_name) as reaper:
        async with alive.keep_alive(interval_s=1.0):
            state = await until(reaper, dead_task.task_id, lambda st: st.status == "ready")
            reaped_after = time.monotonic() - emptied
            assert not alive.lost.is_set(), alive.lost_reason
        kept = await swarm.tasks.get(alive_task.task_id)
    assert kept.status == "claimed" and kept.epoch == alive.epoch and kept.owner == "alive"
    assert state.attempt == 0  # its lease vanished without a trace: refunded, not burnt
    assert reaped_after >= 3.0, f"a missing lease was reaped {reaped_after:.1f} s after the purge"


async def test_a_retried_failure_whose_first_try_was_stored_still_offers_the_task(
        swarm: Swarm) -> None:
    """A holder retrying its failure after a lost ack finds the first try stored (a
    duplicate); the offer that try never sent is sent now, not left to a sweep."""
    t = await swarm.tasks.create("retry me", max_attempts=3, backoff_initial_s=0.0)
    lease = await swarm.tasks.claim(t.task_id, agent="w")
    assert lease is not None
    # The first try as stored before its ack was lost: the same write, nothing after it.
    msg_id = f"fail-{t.task_id}-{lease.epoch}"
    await swarm.log.append(
        ev.TaskFailed(epoch=lease.epoch, error="boom", final=False, retry_after_ms=0),
        t.task_id, expected=lease.epoch, actor="w", msg_id=msg_id, after_hlc=lease.task.hlc,
        event_id=ev.intent_id(swarm.name, msg_id))
    again = await lease.fail("boom")
    assert again.status == "ready"
    taken = await swarm.tasks.claim(agent="rescuer", wait=1.0)
    assert taken is not None and taken.task_id == t.task_id
    failures = [e for e in await _history(swarm, t.task_id) if e.type == "TaskFailed"]
    assert len(failures) == 1


async def test_a_made_up_epoch_is_named_as_such(swarm: Swarm) -> None:
    """A result with an epoch that was never a claim of the task says so, not that the
    task 'moved on' with whatever event followed that sequence."""
    t = await swarm.tasks.create("done once")
    lease = await swarm.tasks.claim(t.task_id, agent="w")
    assert lease is not None
    await lease.complete("ok")
    with pytest.raises(LeaseLost, match="epoch is not a claim of this task"):
        await swarm.tasks.complete(t.task_id, 1, "again", agent="w")
    with pytest.raises(LeaseLost, match="already completed"):
        await swarm.tasks.complete(t.task_id, lease.epoch, "again", agent="w")
