"""Chaos on the claim path: a partitioned holder, and the server killed -9 under load.

The invariants are checked on what really ran (the execution recorder, from the
executor's side) and on the event log (the record of truth):

- no two executions of one task overlap by more than TTL + 1 s (a holder cut off
  from NATS stops its work within one TTL of its last successful renewal);
- every task completes exactly once, and never from a holder that was fenced off;
- no task is lost when the server dies mid-claim or mid-complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cflow import events as ev
from cflow.errors import CflowError
from cflow.leases import claim_lease_key
from cflow.streams import names
from cflow.streams.client import KvEntry
from cflow.swarm import Swarm
from cflow.worker import Outcome, TaskContext
from faults import (
    ExecutionLog,
    Proxy,
    RestartableServer,
    WorkerProcess,
    by_task,
    completions,
    fleet,
    of_type,
    proxies,
    task_events,
    timeline,
)
from support import maintained, until
from test_worker import UntilStopped, running_worker

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

TTL_S = 3.0
RUN_S = 10.0


async def wait_completed(s: Swarm, ids: list[str], within: float) -> None:
    """Until every task is completed, read from the log (survives server restarts)."""
    pending = set(ids)
    deadline = time.monotonic() + within
    while pending:
        for task_id in list(pending):
            try:
                if (await s.tasks.get(task_id)).status == "completed":
                    pending.discard(task_id)
            except CflowError:
                break  # the server is restarting: look again
        if not pending:
            return
        if time.monotonic() > deadline:
            states = []
            for task_id in sorted(pending):
                try:
                    st = await s.tasks.get(task_id)
                    states.append(f"{task_id}: {st.status} owner={st.owner} epoch={st.epoch}")
                except CflowError as exc:
                    states.append(f"{task_id}: {exc}")
            raise AssertionError(f"not completed within {within} s:\n  " + "\n  ".join(states))
        await asyncio.sleep(0.25)  # several processes write; the log is read, not followed


async def test_partitioned_holder_stops_and_another_worker_takes_over(
        nats_url: str, swarm_name: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    """Black-hole one holder's connection mid-task: it must stop within one TTL.

    Three `cfctl worker` processes, each through its own proxy; two tasks of
    10 s with a 3 s lease, so one worker is idle and can take over.
    """
    log = ExecutionLog(tmp_path)
    with proxies(nats_url, 3) as (p1, p2, p3):
        by_proxy = {f"pw{i}": p for i, p in enumerate((p1, p2, p3), start=1)}
        workers = [WorkerProcess(name, {**cli_env, "CFLOW_URL": proxy.url},
                                 log.command(RUN_S), tmp_path, drain_grace=1.0)
                   for name, proxy in by_proxy.items()]
        with fleet(workers, log):
            async with Swarm.connect(nats_url, swarm=swarm_name, agent="chaos") as s:
                await asyncio.gather(*(w.wait_ready() for w in workers))
                ids = [(await s.tasks.create(
                    f"long {k}", body=log.body(RUN_S), lease_ttl_s=TTL_S, max_attempts=5,
                    backoff_initial_s=0.1, backoff_max_s=0.2)).task_id for k in range(2)]
                first = await log.wait(
                    lambda runs: len({r.task_id for r in runs}) == 2 and runs, 20,
                    "both tasks running")
                victim_run = first[0]
                victim = victim_run.agent
                # Let a renewal or two succeed, then cut the holder off without a word.
                await asyncio.sleep(max(0.0, victim_run.start + 1.2 - time.monotonic()))
                by_proxy[victim].blackhole()
                partitioned_at = time.monotonic()
                await wait_completed(s, ids, within=RUN_S * 2 + TTL_S + 5)
                # The victim's own execution has ended by now (stopped, or ran out).
                await log.wait(lambda runs: all(r.end is not None for r in runs
                                                if r.agent == victim), RUN_S,
                               "the partitioned holder's execution ended")
                # Heal: whatever the victim still had to say reaches the server now,
                # and must be refused.
                by_proxy[victim].heal()
                await asyncio.sleep(2.0)  # let a late completion arrive, if one would
                items = await task_events(s.log)
    runs = log.by_task()
    victim_task = victim_run.task_id
    done = completions(items)
    history = by_task(items)
    ended = [r for r in runs[victim_task] if r.agent == victim]
    stopped_after = max((r.end or 0) for r in ended) - partitioned_at
    overlap = log.max_overlap()
    print(f"\npartitioned holder {victim}: its execution ended {stopped_after:.1f} s after the "
          f"partition; max overlap of two executions of one task {overlap:.1f} s "
          f"(limit {TTL_S + 1:g} s)")
    assert done == dict.fromkeys(ids, 1), {t: timeline(history[t]) for t in ids}
    for task_id in ids:
        [completed] = of_type(history[task_id], ev.TaskCompleted)
        claim = next(i for i in history[task_id] if i.seq == completed.event.data.epoch)  # type: ignore[attr-defined]
        assert completed.event.actor == claim.event.actor, timeline(history[task_id])
    [victim_done] = of_type(history[victim_task], ev.TaskCompleted)
    assert victim_done.event.actor != victim, (
        f"completion of {victim_task} accepted from the partitioned holder {victim}")
    assert len(runs[victim_task]) >= 2, "nobody took over the partitioned holder's task"
    assert stopped_after <= TTL_S + 1.0, (
        f"the partitioned holder ran on {stopped_after:.1f} s after its last chance to renew")
    assert overlap <= TTL_S + 1.0, log.overlaps()[:3]


async def test_server_kill9_and_restart_mid_claim_and_complete(
        swarm_name: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    """kill -9 the only nats-server twice while three workers drain a small DAG.

    The first outage is a blip (1 s); the second outlasts the lease TTL, so
    holders lose their leases while the server is gone, completions fail, and
    expiry, requeue and readiness of dependents must all happen after the restart.
    """
    n_roots, n_dependents = 16, 8
    log = ExecutionLog(tmp_path)
    with RestartableServer(tmp_path / "nats") as server:
        env = {**cli_env, "CFLOW_URL": server.url}
        workers = [WorkerProcess(f"rw{i}", env, log.command(0.3), tmp_path, concurrency=2,
                                 drain_grace=1.0) for i in range(1, 4)]
        async with Swarm.connect(server.url, swarm=swarm_name, agent="chaos") as s:
            retry = {"lease_ttl_s": TTL_S, "max_attempts": 20, "backoff_initial_s": 0.1,
                     "backoff_max_s": 0.5}
            roots = [(await s.tasks.create(
                f"root {k}", body=log.body(0.2 if k % 3 else 2.0), **retry)).task_id
                for k in range(n_roots)]
            dependents = [(await s.tasks.create(
                f"dependent {k}", body=log.body(1.0), depends_on=[roots[-1 - k]], **retry)
                ).task_id for k in range(n_dependents)]
            ids = roots + dependents
            kills: list[float] = []
            restarts: list[float] = []
            with fleet(workers, log):
                for at_least, outage_s in ((n_roots // 4, 1.0), (n_roots // 2, TTL_S + 1.0)):
                    await log.wait(lambda runs, n=at_least: sum(
                        1 for r in runs if r.how == "exit-0") >= n and any(
                        r.end is None for r in runs), 20,
                        f"{at_least} executions done and one running")
                    if outage_s > TTL_S:
                        # One execution surely outlives the outage and its lease.
                        long = (await s.tasks.create("long", body=log.body(TTL_S + 2),
                                                     priority=10, **retry)).task_id
                        ids.append(long)
                        await log.wait(lambda runs, t=long: any(r.task_id == t for r in runs),
                                       25, "the long task runs")
                    server.kill9()  # mid-claim, mid-heartbeat, mid-complete: whatever runs
                    kills.append(time.monotonic())
                    await asyncio.sleep(outage_s)
                    await asyncio.to_thread(server.restart)
                    restarts.append(time.monotonic())
                await wait_completed(s, ids, within=30)
                items = await task_events(s.log)
                alive = [w.name for w in workers if w.alive]
    done = completions(items)
    history = by_task(items)
    expiries = sum(len(of_type(v, ev.TaskLeaseExpired)) for v in history.values())
    running = [sum(1 for r in log.executions() if r.start < at < r.until()) for at in kills]
    assert all(running), f"a kill hit no running execution: {running}"
    resumed = [min((r.start for r in log.executions() if r.start > at), default=float("nan"))
               - at for at in restarts]
    print(f"\nserver killed -9 {server.kills} times with {running} executions running; "
          f"first execution after each restart: {', '.join(f'{x:.1f} s' for x in resumed)}: "
          f"{len(done)} of {len(ids)} completed, {expiries} expiries, "
          f"{len(log.executions())} executions, max overlap {log.max_overlap():.1f} s")
    assert set(done) == set(ids), "a task was lost"
    assert max(done.values()) == 1, {t: timeline(history[t]) for t, n in done.items() if n > 1}
    assert len(alive) == 3, "a worker died of the outage"
    assert log.max_overlap() <= TTL_S + 1.0, log.overlaps()[:3]


async def test_outage_right_after_an_expiry_is_repaired(
        nats_url: str, swarm_name: str, cli_env: dict[str, str],
        tmp_path: Path) -> None:
    """A 2 s outage of every maintainer right after an expiry was stored (issue 14 #3).

    The follow-up write (the requeue) is then due while no maintainer can write;
    once NATS is back it must still happen, without a new event to trigger it,
    and so must the dependent's readiness after the requeued task completes.
    (Today nats-py buffers the writes over the reconnect and the append retries,
    so this passes; it guards the supervised maintenance loop.)
    """
    log = ExecutionLog(tmp_path)
    with proxies(nats_url, 2) as ps:
        workers = [WorkerProcess(f"ow{i}", {**cli_env, "CFLOW_URL": p.url}, log.command(0.3),
                                 tmp_path, drain_grace=1.0) for i, p in enumerate(ps, start=1)]
        async with Swarm.connect(nats_url, swarm=swarm_name, agent="chaos") as s:
            retry = {"lease_ttl_s": TTL_S, "backoff_initial_s": 0.1, "backoff_max_s": 0.2}
            first = await s.tasks.create("first", body=log.body(0.5), **retry)
            then = await s.tasks.create("then", body=log.body(0.2),
                                        depends_on=[first.task_id], **retry)
            ghost = await s.tasks.claim(first.task_id, agent="ghost")
            assert ghost is not None
            with fleet(workers, log):
                # The ghost renews until both maintainers are up and slowed down, then
                # dies: its lease runs out a TTL later and a maintainer expires it.
                # (Had it died at once, a loaded machine could start the second worker
                # after the first had already expired, requeued and run the task:
                # "expired" was then never seen and the wait below timed out.)
                async with ghost.keep_alive():
                    await asyncio.gather(*(w.wait_ready() for w in workers))
                    for p in ps:  # room to cut in right after the write is stored
                        p.delay(300)
                try:
                    # Until the ghost's claim is over ("expired" itself lasts only until
                    # the requeue, one slowed round trip: a loaded test process may miss it).
                    await until(s, first.task_id,
                                lambda st: (st.status, st.epoch) != ("claimed", ghost.epoch),
                                within=TTL_S + 15)
                    for p in ps:
                        p.down()
                    await asyncio.sleep(2.0)
                    for p in ps:
                        p.heal()
                    await wait_completed(s, [first.task_id, then.task_id], within=20)
                finally:
                    items = await task_events(s.log)
                    history = by_task(items)
                    print("\nafter a 2 s outage right after the expiry:\n"
                          + "\n".join(timeline(v) for v in history.values()))
                    for w in workers:  # what each maintainer did (and when) if it failed
                        print(f"--- {w.name}\n{w.log_path.read_text(errors='replace')[-3000:]}")
    done = completions(items)
    assert done == {first.task_id: 1, then.task_id: 1}
    assert [i.event.data.epoch for i in of_type(history[first.task_id], ev.TaskLeaseExpired)
            ] == [ghost.epoch], timeline(history[first.task_id])  # type: ignore[attr-defined]


async def test_claims_resume_promptly_after_a_server_restart(
        swarm_name: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    """Idle workers, the server killed -9 and back: new work is claimed within seconds."""
    log = ExecutionLog(tmp_path)
    with RestartableServer(tmp_path / "nats") as server:
        env = {**cli_env, "CFLOW_URL": server.url}
        workers = [WorkerProcess(f"iw{i}", env, log.command(0.1), tmp_path, drain_grace=1.0)
                   for i in (1, 2)]
        async with Swarm.connect(server.url, swarm=swarm_name, agent="chaos") as s:
            with fleet(workers, log):
                await asyncio.gather(*(w.wait_ready() for w in workers))
                server.kill9()
                await asyncio.sleep(1.0)
                await asyncio.to_thread(server.restart)
                restarted = time.monotonic()
                task = await s.tasks.create("after the restart", lease_ttl_s=TTL_S)
                created = time.monotonic()
                [run] = await log.wait(lambda runs: runs, 30, "the new task runs")
    print(f"\nafter a restart: task created in {created - restarted:.1f} s, "
          f"run {run.start - created:.1f} s later")
    assert run.task_id == task.task_id
    # Measured 0.0-0.1 s, and 4.8 s in about one run of four on a loaded machine
    # (the workers' first look after the reconnect met JetStream still recovering);
    # before offers and reconnect wake-ups it was up to 19 s.
    assert run.start - created <= 2 * TTL_S, (
        f"a ready task waited {run.start - created:.1f} s for one of two idle workers: "
        + " | ".join(w.output()[-800:] for w in workers))


async def _entry(entries: AsyncIterator[KvEntry], key: str, operation: str,
                 within: float) -> KvEntry:
    """The next entry of a bucket watch with ``key`` and ``operation``."""
    async def find() -> KvEntry:
        async for entry in entries:
            if entry.key == key and entry.operation == operation:
                return entry
        raise AssertionError("the watch ended")
    return await asyncio.wait_for(find(), within)


@pytest.mark.parametrize("how", ["stop", "kill9"])
async def test_leases_and_presence_come_back_after_a_server_restart(
        swarm_name: str, tmp_path: Path, how: str) -> None:
    """Leases and presence live in memory storage, which a restarted server forgets.

    Holders renewing across the restart keep their claims (they write their
    leases back into the bucket created again), a holder that died just before
    the restart loses its task only a whole TTL after the server is back (never
    at once because the bucket came back empty), nobody claims a task twice,
    presence comes back, and the bucket watches (the reaper's marker loop, the
    presence observer) follow the new bucket: a lease written after the restart
    and left to expire is reaped on its marker.
    """
    ttl = 5.0  # room for the restart within the holders' own deadline on a loaded machine
    with RestartableServer(tmp_path / "nats") as server:
        async with Swarm.connect(server.url, swarm=swarm_name, agent="chaos") as s, \
                maintained(server.url, swarm_name) as reaper:
            leases, presence = s.log.bucket(names.LEASES), s.log.bucket(names.PRESENCE)
            for bucket in (leases, presence):
                info = await s.log.stream_info(names.kv_stream(bucket))
                assert info["config"]["storage"] == "memory", bucket
            kept = [await s.tasks.create(f"kept {i}", lease_ttl_s=ttl) for i in range(3)]
            dead_task = await s.tasks.create("holder dies before the restart", lease_ttl_s=ttl)
            later_task = await s.tasks.create("holder dies after the restart", lease_ttl_s=ttl)
            holders = [await s.tasks.claim(t.task_id, agent=f"holder{i}")
                       for i, t in enumerate(kept)]
            agent = await s.agents.register("present")
            async with contextlib.AsyncExitStack() as stack:
                for lease in holders:
                    assert lease is not None
                    await stack.enter_async_context(lease.keep_alive(interval_s=0.5))
                await stack.enter_async_context(agent.present(ttl_s=ttl))
                lease_watch = await stack.enter_async_context(s.log.kv_entries(leases))
                presence_watch = await stack.enter_async_context(s.log.kv_entries(presence))
                dead = await s.tasks.claim(dead_task.task_id, agent="dead")  # never renewed
                assert dead is not None
                if how == "stop":
                    server.stop()
                else:
                    server.kill9()
                await asyncio.to_thread(server.restart)
                back = time.monotonic()
                # Presence and every live holder's lease are written again, and the
                # watches opened before the restart see it.
                await _entry(presence_watch, "present", "PUT", within=ttl)
                for lease in holders:
                    assert lease is not None
                    await _entry(lease_watch, claim_lease_key(lease.task), "PUT", within=ttl)
                assert (await s.agents.get("present")).present
                state = await until(reaper, dead_task.task_id,
                                    lambda st: st.epoch != dead.epoch or st.status != "claimed",
                                    within=4 * ttl)
                dead_reaped_after = time.monotonic() - back
                # A claim leased in the new bucket and left to expire: reaped on its marker.
                later = await s.tasks.claim(later_task.task_id, agent="later")
                assert later is not None
                await _entry(lease_watch, claim_lease_key(later.task), "MARKER", within=3 * ttl)
                await until(reaper, later_task.task_id,
                            lambda st: st.epoch != later.epoch or st.status != "claimed",
                            within=ttl)
                for lease in holders:
                    assert lease is not None
                    assert not lease.lost.is_set(), lease.lost_reason
                    assert (await lease.heartbeat()) == "ok"
            items = await task_events(s.log)
    history = by_task(items)
    print(f"\nserver {how}: the dead holder's task reaped {dead_reaped_after:.1f} s after "
          f"the server was back (TTL {ttl:.0f} s)")
    for lease in holders:
        assert lease is not None
        claims = of_type(history[lease.task_id], ev.TaskClaimed)
        assert [c.seq for c in claims] == [lease.epoch], timeline(history[lease.task_id])
        assert not of_type(history[lease.task_id], ev.TaskLeaseExpired)
    assert dead_reaped_after >= ttl, (
        f"a lease lost with the restart was reaped {dead_reaped_after:.1f} s after it")
    assert state.status in ("ready", "expired"), timeline(history[dead_task.task_id])
    for task_id in (dead_task.task_id, later_task.task_id):
        claims = of_type(history[task_id], ev.TaskClaimed)
        expiries = of_type(history[task_id], ev.TaskLeaseExpired)
        assert len(claims) == 1 and len(expiries) == 1, timeline(history[task_id])


async def test_a_claim_that_comes_back_after_its_deadline_runs_nothing(
        nats_url: str, swarm_name: str, tmp_path: Path) -> None:
    """A claim whose answer arrives after the holder's own deadline starts no work.

    Found by tests/soak_cluster.py: a worker on a slow link (1 s each way) got
    its claim back after the lease had expired and another worker had taken
    the task; it started the execution anyway and only stopped it once its
    status write (before the keep-alive began) came back, 2 s later: two
    executions of one task at once. Here every round trip of the worker takes
    longer than the lease allows, so no claim it makes may run.
    """
    from cflow.worker import Worker, WorkerOptions
    from cflow.worker.subprocess_exec import SubprocessExecutor

    ran = tmp_path / "ran"
    events: list[tuple[str, str]] = []
    lost = asyncio.Event()

    def on_event(kind: str, text: str) -> None:
        events.append((kind, text))
        if kind == "lost":
            lost.set()

    with proxies(nats_url, 1) as (proxy,):
        async with Swarm.connect(proxy.url, swarm=swarm_name, agent="slow") as ws, \
                Swarm.connect(nats_url, swarm=swarm_name, agent="chaos") as s:
            worker = Worker(ws, SubprocessExecutor(f"echo $CFLOW_EPOCH >> {ran}; sleep 5"),
                            WorkerOptions(name="slow", url=proxy.url), on_event=on_event)
            run = asyncio.create_task(worker.run())
            try:
                await asyncio.wait_for(worker.started.wait(), 10)
                # TTL 1 s: the holder's deadline is 0.75 s after the claim was sent,
                # the claim's own round trip takes 1 s.
                proxy.delay(500)
                task = await s.tasks.create("slow claim", lease_ttl_s=1.0)
                await asyncio.wait_for(lost.wait(), 20)
                proxy.heal()
            finally:
                proxy.heal()
                worker.drain()
                await asyncio.wait_for(run, 20)
    claimed = [text for kind, text in events if kind == "claimed"]
    assert claimed and claimed[0].startswith(task.task_id), events
    assert not ran.exists(), (
        f"work started on a lease past its deadline (epochs {ran.read_text().split()}): {events}")


class CutOffAtStart(UntilStopped):
    """An executor whose work cuts its worker off from NATS (black-holes the worker's
    proxy) the moment it starts, then works until it is stopped."""

    name = "cut-off"

    def __init__(self, proxy: Proxy) -> None:
        super().__init__()
        self.proxy = proxy

    async def run(self, ctx: TaskContext) -> Outcome:
        # Synchronously, before the worker's first write after the claim (its
        # "busy" status) can have its answer: that write hangs in the partition.
        self.proxy.blackhole()
        return await super().run(ctx)


async def test_a_holder_cut_off_as_its_work_starts_stops_within_a_ttl(
        nats_url: str, swarm_name: str) -> None:
    """The partition begins the moment the work does, while the worker still writes its
    status: the holder's deadline must stop the work all the same.

    (The worker used to enter the lease's keep-alive only after its "busy" status
    write returned, and that write retries for some 12 s through an outage: the
    work ran unwatched past its deadline, while the task could be reclaimed.)
    """
    ttl = 2.0
    with proxies(nats_url, 1) as [proxy]:
        exe = CutOffAtStart(proxy)
        given_up = asyncio.Event()  # the worker is done with the task ("lost")

        def on_event(kind: str, _: str) -> None:
            if kind == "lost":
                given_up.set()

        async with Swarm.connect(nats_url, swarm=swarm_name, agent="tester") as s, \
                running_worker(proxy.url, swarm_name, exe, name="cut-off",
                               on_event=on_event) as w:
            try:
                await s.tasks.create("cut off as it starts", lease_ttl_s=ttl)
                await asyncio.wait_for(exe.started.wait(), 20)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(exe.stopped.wait(), ttl + 2.0)
                # Its slot is free again while the partition lasts: nothing it does
                # after the lease is lost (its status writes) may wait on NATS.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(given_up.wait(), 2.0)
                slot_freed = given_up.is_set() and w.stats.lost == 1
            finally:
                proxy.heal()
            ran = exe.ran_s
    assert slot_freed, "the worker still held the lost task's slot 2 s after its work stopped"
    assert ran is not None and ran <= ttl, (
        f"the cut-off holder's work ran on for {ran or f'more than {ttl + 2:g}'} s "
        f"(lease TTL {ttl:g} s)")
