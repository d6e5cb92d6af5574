"""The claim path against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from cflow import events as ev
from cflow.errors import AlreadyClaimed, DependencyError, InvalidState, LeaseLost, NotFound
from cflow.lease_policy import Verdict
from cflow.swarm import Swarm
from support import maintained, until

pytestmark = pytest.mark.integration


def reaper(nats_url: str, swarm_name: str) -> contextlib.AbstractAsyncContextManager[Swarm]:
    """Another process-like participant running maintenance (reaper + readiness)."""
    return maintained(nats_url, swarm_name, "reaper")


async def test_create_get_and_idempotency_key(swarm: Swarm) -> None:
    a = await swarm.tasks.create("write docs", priority=3, capabilities=["docs"],
                                 idempotency_key="k1", labels={"area": "docs"})
    b = await swarm.tasks.create("write docs again", idempotency_key="k1")
    assert a.task_id == b.task_id and b.title == "write docs"
    assert a.status == "ready" and a.capabilities == ("docs",) and a.labels == {"area": "docs"}
    with pytest.raises(NotFound):
        await swarm.tasks.get("nope")


async def test_unknown_dependency_is_refused(swarm: Swarm) -> None:
    with pytest.raises(DependencyError, match="unknown dependency"):
        await swarm.tasks.create("b", depends_on=["does-not-exist"])


async def test_claim_complete_and_fencing(swarm: Swarm) -> None:
    t = await swarm.tasks.create("t")
    lease = await swarm.tasks.claim(agent="w1")
    assert lease is not None and lease.task_id == t.task_id and lease.attempt == 1
    with pytest.raises(LeaseLost):
        await swarm.tasks.complete(t.task_id, lease.epoch + 1, "forged")
    done = await lease.complete("ok")
    assert done.status == "completed" and done.result == "ok" and done.owner == "w1"
    # A retried completion is deduplicated by its Msg-Id: same outcome, first result kept.
    again = await lease.complete("retry")
    assert again.status == "completed" and again.result == "ok"
    with pytest.raises(LeaseLost, match="already completed"):
        await lease.fail("after the fact")
    assert await swarm.tasks.claim(agent="w2") is None
    with pytest.raises(AlreadyClaimed):
        await swarm.tasks.claim(t.task_id, agent="w2")


async def test_64_concurrent_claimers_exactly_one_winner(nats_url: str, swarm_name: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        swarms = [await stack.enter_async_context(
            Swarm.connect(nats_url, swarm=swarm_name, agent=f"c{i}")) for i in range(4)]
        for _ in range(100):
            t = await swarms[0].tasks.create("contended")

            async def one(i: int, task_id: str = t.task_id) -> bool:
                try:
                    await swarms[i % 4].tasks.claim(task_id, agent=f"claimer-{i}")
                except AlreadyClaimed:
                    return False
                return True

            wins = await asyncio.gather(*(one(i) for i in range(64)))
            assert sum(wins) == 1
        events = await swarms[0].log.read(f"cf.{swarm_name}.evt.task.*")
        claims = [x for x in events if x.event.type == "TaskClaimed"]  # type: ignore[union-attr]
        assert len(claims) == 100


async def test_expired_lease_is_reaped_once_and_late_holder_is_fenced(
    nats_url: str, swarm_name: str, swarm: Swarm
) -> None:
    t = await swarm.tasks.create("slow", lease_ttl_s=1, max_attempts=3, backoff_initial_s=0)
    lease = await swarm.tasks.claim(agent="sleepy")
    assert lease is not None
    async with reaper(nats_url, swarm_name) as r1, reaper(nats_url, swarm_name) as r2:
        state = await until(r1, t.task_id, lambda s: s.status == "ready" and s.attempt == 1)
        assert state is not None
        second = await r2.tasks.claim(agent="fresh", wait=5)
        assert second is not None and second.attempt == 2 and second.epoch > lease.epoch
        with pytest.raises(LeaseLost, match="lease expired"):
            await lease.complete("late result")
        await second.complete("fresh result")
    final = await swarm.tasks.get(t.task_id)
    assert final.status == "completed" and final.result == "fresh result"
    history = [x.event.type for x in await swarm.tasks.history(t.task_id)]
    assert history.count("TaskLeaseExpired") == 1 and history.count("TaskRequeued") == 1


async def test_keep_alive_holds_the_lease_past_its_ttl(nats_url: str, swarm_name: str,
                                                       swarm: Swarm) -> None:
    t = await swarm.tasks.create("long", lease_ttl_s=1)
    lease = await swarm.tasks.claim(agent="worker")
    assert lease is not None
    async with reaper(nats_url, swarm_name), lease.keep_alive(interval_s=0.3):
        # Three TTLs pass with heartbeats; a marker would have been reaped at once.
        for _ in range(10):
            assert await lease.heartbeat() == "ok"
            await asyncio.sleep(0.3)
        assert not lease.lost.is_set()
    assert (await lease.complete("done")).status == "completed"
    assert t.task_id == lease.task_id


async def test_cancel_reaches_the_holder_through_heartbeat(swarm: Swarm) -> None:
    t = await swarm.tasks.create("doomed")
    lease = await swarm.tasks.claim(agent="w")
    assert lease is not None
    cancelled = await swarm.tasks.cancel(t.task_id, reason="not needed")
    assert cancelled.status == "cancelled"
    assert await lease.heartbeat() == "cancelled"
    assert lease.lost.is_set() and lease.lost_reason == "cancelled"
    with pytest.raises(LeaseLost, match="cancelled"):
        await lease.complete("too late")
    with pytest.raises(InvalidState, match="already cancelled"):
        await swarm.tasks.cancel(t.task_id)


async def test_retry_backoff_then_failed_and_dependents_blocked(swarm: Swarm) -> None:
    t = await swarm.tasks.create("flaky", max_attempts=2, backoff_initial_s=0.3)
    child = await swarm.tasks.create("child", depends_on=[t.task_id])
    assert child.status == "pending"
    lease = await swarm.tasks.claim(agent="w")
    assert lease is not None
    retried = await lease.fail("boom")
    assert retried.status == "ready" and retried.not_before_ms > 0
    # Backing off: not claimable before not_before; a waiting claim is woken by the timer.
    assert await swarm.tasks.claim(agent="w") is None
    loop = asyncio.get_running_loop()
    started = loop.time()
    second = await swarm.tasks.claim(agent="w", wait=5)
    assert second is not None and second.attempt == 2
    assert loop.time() - started >= 0.2
    final = await second.fail("boom again")
    assert final.status == "failed"
    blocked = await until(swarm, child.task_id, lambda s: s.status == "blocked")
    assert blocked.reason == f"dependency {t.task_id} failed"  # type: ignore[union-attr]


async def test_no_retry_fails_for_good(swarm: Swarm) -> None:
    await swarm.tasks.create("fatal", max_attempts=5)
    lease = await swarm.tasks.claim(agent="w")
    assert lease is not None
    assert (await lease.fail("bad input", retry=False)).status == "failed"


async def test_dag_of_50_completes_in_dependency_order(swarm: Swarm) -> None:
    ids: list[str] = []
    for i in range(50):
        deps = [ids[j] for j in (i - 1, i // 2) if 0 <= j < i]
        ids.append((await swarm.tasks.create(f"n{i}", depends_on=sorted(set(deps)))).task_id)
    order: list[str] = []
    while len(order) < 50:
        lease = await swarm.tasks.claim(agent="w", wait=5)
        assert lease is not None
        order.append(lease.task_id)
        await lease.complete()
    position = {tid: i for i, tid in enumerate(order)}
    for i, tid in enumerate(ids):
        for j in (i - 1, i // 2):
            if 0 <= j < i:
                assert position[ids[j]] < position[tid]


async def test_idle_claim_wait_is_woken_by_a_push(nats_url: str, swarm_name: str,
                                                  swarm: Swarm) -> None:
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="producer") as producer:
        await swarm.tasks.ensure_board()
        waiter = asyncio.create_task(swarm.tasks.claim(agent="idle", wait=30))
        await asyncio.sleep(0)  # let the waiter park on the board
        assert not waiter.done()
        created = await producer.tasks.create("wake up")
        lease = await asyncio.wait_for(waiter, 10)
        # The waiter was parked for 30 s; only the subscription push can explain a
        # return well before that, and it returns the task that was just created.
        assert lease is not None and lease.task_id == created.task_id
        assert swarm.tasks._version > 0


async def test_start_to_close_timeout_is_enforced(nats_url: str, swarm_name: str,
                                                  swarm: Swarm) -> None:
    t = await swarm.tasks.create("bounded", start_to_close_s=1, lease_ttl_s=30,
                                 backoff_initial_s=0)
    lease = await swarm.tasks.claim(agent="w")
    assert lease is not None
    async with reaper(nats_url, swarm_name) as r:
        await until(r, t.task_id, lambda s: s.status == "ready" and s.attempt == 1)
    history = await swarm.tasks.history(t.task_id)
    expired = [x.event.data for x in history if x.event.type == "TaskLeaseExpired"]
    assert len(expired) == 1 and expired[0].reason == "start-to-close timeout"  # type: ignore[union-attr]


async def test_claimed_but_never_leased_is_recovered(nats_url: str, swarm_name: str,
                                                     swarm: Swarm) -> None:
    t = await swarm.tasks.create("orphan", lease_ttl_s=1, backoff_initial_s=0)
    # The holder died between the two writes: TaskClaimed is there, the lease never was.
    await swarm.log.append(ev.TaskClaimed(owner="ghost", attempt=1, lease_ttl_s=1),
                           t.task_id, expected=t.seq)
    async with reaper(nats_url, swarm_name) as r:
        # The claim never ran: its attempt is given back (issue 14 #10).
        state = await until(r, t.task_id, lambda s: s.status == "ready" and s.attempt == 0)
    history = await swarm.tasks.history(t.task_id)
    reasons = [x.event.data.reason for x in history if x.event.type == "TaskLeaseExpired"]  # type: ignore[union-attr]
    assert reasons == ["claimed but never leased"] and state is not None


async def test_a_claim_stored_after_its_lease_expired_is_reaped(
        nats_url: str, swarm_name: str, swarm: Swarm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by tests/soak_cluster.py (seed 12): the claim and its lease go out together
    to two streams; the leases stream stored the lease at once while the events stream
    (electing a leader) stored the TaskClaimed seconds later. The lease had expired by
    then, so its holder started nothing and left the claim to the reapers, which judged
    the claim's own expiry marker (older than the claim) "never leased", failed to
    fence the key (the marker holds it) and gave up: the task stayed claimed until
    the marker's own TTL (5 minutes) ran out.
    """
    t = await swarm.tasks.create("stalled claim", lease_ttl_s=1, backoff_initial_s=0)
    async with reaper(nats_url, swarm_name) as r, \
            Swarm.connect(nats_url, swarm=swarm_name, agent="late") as late:
        append = late.log.append

        async def stalled_claims(data: ev.EventData, *args: object, **kwargs: object
                                 ) -> object:
            if isinstance(data, ev.TaskClaimed):
                await asyncio.sleep(3.0)  # the events stream has no leader for a while
            return await append(data, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(late.log, "append", stalled_claims)
        lease = await late.tasks.claim(t.task_id, agent="late")
        assert lease is not None  # past its holder's deadline: the holder starts nothing
        claimed = await r.tasks.get(t.task_id)
        view = await r.tasks.lease_view(claimed)
        assert claimed.status == "claimed" and view is not None and view.op == "MARKER"
        assert view.stored_ms < (claimed.claimed_ms or 0)  # expired before the claim was stored
        # Requeued within TTL plus the reap margin (and some slack), as any dead claim.
        state = await until(r, t.task_id, lambda s: s.status == "ready", within=6.0)
    assert state.attempt == 1
    history = await swarm.tasks.history(t.task_id)
    reasons = [x.event.data.reason for x in history
               if isinstance(x.event.data, ev.TaskLeaseExpired)]
    assert reasons == ["lease expired"]



async def test_a_standing_lease_judged_lapsed_is_taken_before_the_claim_is_expired(
        swarm: Swarm) -> None:
    """A reaper that judges a claim lapsed from a lease still standing (its reply late,
    or its estimate of server time ahead) must not expire the claim behind the holder's
    back: the holder would renew on untouched and work on beside the next holder.
    The expiry takes the key at the revision judged: refused if the holder renewed
    since, and otherwise the holder's next renewal is refused."""
    t = await swarm.tasks.create("judged from a stale view", lease_ttl_s=30)
    lease = await swarm.tasks.claim(t.task_id, agent="holder")
    assert lease is not None
    claimed = await swarm.tasks.get(t.task_id)
    stale = await swarm.tasks.lease_view(claimed)
    assert stale is not None and stale.op == "PUT"
    await lease.heartbeat()  # the holder renewed after that view was read
    assert not await swarm.tasks.reap(t.task_id, lease.epoch, Verdict.EXPIRED, stale)
    assert (await swarm.tasks.get(t.task_id)).status == "claimed"
    # Judged from the current revision (a clock ahead): expired, and the holder is told.
    current = await swarm.tasks.lease_view(claimed)
    assert current is not None and current.revision > stale.revision
    assert await swarm.tasks.reap(t.task_id, lease.epoch, Verdict.EXPIRED, current)
    with pytest.raises(LeaseLost):
        await lease.heartbeat()
    assert lease.lost.is_set()

async def test_the_projector_is_a_reaper_too(nats_url: str, swarm_name: str, swarm: Swarm,
                                             tmp_path: object) -> None:
    from pathlib import Path

    from cflow.projections.projector import run_projector

    t = await swarm.tasks.create("abandoned", lease_ttl_s=1, backoff_initial_s=0)
    assert await swarm.tasks.claim(agent="gone") is not None
    stop = asyncio.Event()
    projector = asyncio.create_task(
        run_projector(nats_url, swarm_name, Path(str(tmp_path)) / "p.duckdb", stop,
                      serve_queries=False))
    try:
        state = await until(swarm, t.task_id, lambda s: s.status == "ready" and s.attempt == 1)
        assert state is not None
        history = await swarm.tasks.history(t.task_id)
        reapers = {x.event.actor for x in history if x.event.type == "TaskLeaseExpired"}
        assert len(reapers) == 1 and next(iter(reapers)).startswith("projector-")
    finally:
        stop.set()
        await asyncio.wait_for(projector, 30)
