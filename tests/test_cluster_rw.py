"""A three-node cluster behaves like one server (issue 21).

Reads right after a write see it although a follower answers or lags; writes
retry through an election; finished results are not dropped; errors during an
election say what is happening.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cflow import events as ev
from cflow.errors import CflowError, LeaseLost, NotFound, Unavailable
from cflow.server import EmbeddedServer, ensure_swarm_when_placeable
from cflow.streams import connect, names
from cflow.streams.client import api_request
from cflow.streams.definitions import swarm_resources
from test_cluster import Cluster, all_current, stream_info, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
OP_S = 4.0  # one create-and-read or claim-and-heartbeat; an answer takes milliseconds


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        c.start()
        yield c
    finally:
        for s in c.servers:
            if s.proc is not None and s.proc.poll() is None:
                os.kill(s.proc.pid, signal.SIGCONT)
        c.stop()


async def lead_all(nc: Any, swarm: str, leader: str) -> None:
    """Move the leader of every stream of ``swarm`` to server ``leader``; wait until current."""
    for spec in swarm_resources(swarm):
        async def placed(name: str = spec.name) -> bool:
            info = await stream_info(nc, name)
            if (info.get("cluster") or {}).get("leader") == leader:
                return all_current(info)
            with contextlib.suppress(CflowError):
                await api_request(nc, f"$JS.API.STREAM.LEADER.STEPDOWN.{name}",
                                  {"placement": {"preferred": leader}})
            return False

        await wait_until(placed, 30, f"{spec.name} led by {leader}")


@contextlib.asynccontextmanager
async def paused(server: EmbeddedServer) -> AsyncIterator[None]:
    """SIGSTOP a server (a replica that stops applying), SIGCONT on the way out."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


async def r3_swarm(cluster: Cluster, swarm: str) -> tuple[EmbeddedServer, EmbeddedServer,
                                                         EmbeddedServer]:
    """An R3 swarm whose streams the meta leader leads: (leader, follower, other follower).

    With every leader on one server, pausing another one never stalls the API.
    """
    admin = await connect(cluster.urls)
    try:
        await ensure_swarm_when_placeable(admin, swarm, 3)
        meta = await wait_until(lambda: _async(cluster.meta_leader()), 20, "a meta leader")
        await lead_all(admin, swarm, meta)
    finally:
        await admin.close()
    leader = cluster.by_name(meta)
    follower, other = (s for s in cluster.servers if s is not leader)
    return leader, follower, other


async def _async(value: Any) -> Any:
    return value


async def lagging_phases(cluster: Cluster, swarm: str) -> AsyncIterator[tuple[str, str]]:
    """(phase, url to talk to) while a replica lags, in two shapes.

    1. One follower is paused; the client talks to the other one: a request that
       any replica may answer can reach the paused one (a timeout) or a follower
       that has not applied the commit the leader just acked (a stale answer).
    2. That follower resumes after a burst of writes it missed; the client talks
       to it while it catches up.
    """
    leader, follower, other = await r3_swarm(cluster, swarm)
    async with paused(other):
        yield "follower paused", follower.url
        nc = await connect(leader.url)
        try:
            from cflow.streams import EventLog

            log = EventLog(nc, swarm)
            await log.append_many([(log.event(ev.AgentStatusChanged(status="idle"), f"burst{i}"),
                                    None) for i in range(3000)])
        finally:
            await nc.close()
    yield "follower catching up", other.url


async def warm_up(s: Any) -> None:
    """The subscriptions a facade sets up once (each retried on its own), outside the timing."""
    await s.tasks.ensure_board()
    await s.control.ensure()


async def test_create_then_read_through_a_lagging_replica(cluster: Cluster) -> None:
    """A client reads back each task it just created, whichever replica it talks to."""
    from cflow.swarm import Swarm

    failures: Counter[str] = Counter()
    first_traceback: list[str] = []
    async with asyncio.timeout(55):
        async for phase, url in lagging_phases(cluster, "rw"):
            async with Swarm.connect(url, swarm="rw", agent="w", ensure=False) as s:
                await warm_up(s)
                for i in range(40):
                    try:
                        async with asyncio.timeout(OP_S):
                            task = await s.tasks.create(f"{phase} {i}")
                            got = await s.tasks.get(task.task_id)
                    except CflowError as exc:
                        failures[f"{phase}: {type(exc).__name__}: {exc.message[:40]}"] += 1
                        first_traceback.append(traceback.format_exc())
                        continue
                    except TimeoutError:
                        failures[f"{phase}: no answer within {OP_S} s"] += 1
                        first_traceback.append(traceback.format_exc())
                        continue
                    assert got.task_id == task.task_id
    print(f"\ncreate-then-read with a lagging replica: {dict(failures)}")
    if first_traceback:
        print(first_traceback[0])
    assert not failures


async def test_claim_then_heartbeat_through_a_lagging_replica(cluster: Cluster) -> None:
    """Claim then heartbeat at once: never "not a claim", never "lease expired"."""
    from cflow.swarm import Swarm

    failures: Counter[str] = Counter()
    first_traceback: list[str] = []
    async with asyncio.timeout(55):
        async for phase, url in lagging_phases(cluster, "hb"):
            async with Swarm.connect(url, swarm="hb", agent="w", ensure=False) as s:
                await warm_up(s)
                for i in range(25):
                    try:
                        async with asyncio.timeout(OP_S):
                            task = await s.tasks.create(f"{phase} {i}", lease_ttl_s=30.0)
                            lease = await s.tasks.claim(task.task_id)
                            assert lease is not None
                            await lease.heartbeat()
                            await lease.complete("ok")
                    except LeaseLost as exc:
                        failures[f"{phase}: LeaseLost: {exc.reason}"] += 1
                    except CflowError as exc:
                        failures[f"{phase}: {type(exc).__name__}: {exc.message[:40]}"] += 1
                        first_traceback.append(traceback.format_exc())
                    except TimeoutError:
                        failures[f"{phase}: no answer within {OP_S} s"] += 1
                        first_traceback.append(traceback.format_exc())
    print(f"\nclaim-then-heartbeat with a lagging replica: {dict(failures)}")
    if first_traceback:
        print(first_traceback[0])
    assert not failures


async def test_an_election_is_named_and_waited_out(cluster: Cluster) -> None:
    """Leader and one follower gone: the survivor cannot elect; say so, within the bound."""
    from cflow.streams import EventLog

    leader, follower, other = await r3_swarm(cluster, "el")
    nc = await connect(follower.url)
    try:
        log = EventLog(nc, "el")
        log.retry_s = 3.0
        await log.append(ev.TaskCreated(title="before"), "t0", expected=0)
        leader.kill()
        other.kill()
        loop = asyncio.get_running_loop()
        for attempt in (
            lambda: log.append(ev.TaskCreated(title="during"), "t1", expected=0),
            lambda: log.last_seq("task", "t0"),
            lambda: log.kv_put(log.bucket(names.LEASES), "t0", b"{}", expected_revision=0),
            lambda: log.append_many([(log.event(ev.TaskReady(), "t2"), None)]),
        ):
            started = loop.time()
            with pytest.raises(Unavailable) as info:
                await attempt()
            waited = loop.time() - started
            text = str(info.value)
            assert "cfctl init" not in text
            assert "no leader" in text
            assert "election in progress" in text
            assert re.search(r"retried for [34] s", text), text
            assert "\n" not in text
            assert info.value.reason == "no-leader"
            assert 2.5 < waited < 10
        # `cfctl status` says the same.
        from cflow.status import stream_status

        status = await stream_status(nc, names.events_stream("el"))
        assert status["exists"]
        assert status["election"]
        assert "election in progress" in status["summary"]
    finally:
        await nc.close()


async def test_a_missing_stream_still_says_run_cfctl_init(cluster: Cluster) -> None:
    from cflow.streams import EventLog

    nc = await connect(cluster.urls)
    try:
        admin = await connect(cluster.urls)
        try:
            await ensure_swarm_when_placeable(admin, "exists", 3)  # the meta leader is up
        finally:
            await admin.close()
        log = EventLog(nc, "never")
        log.retry_s = 1.0
        with pytest.raises(NotFound) as info:
            await log.append(ev.TaskCreated(title="x"), "t", expected=0)
        assert "cfctl init" in str(info.value)
        assert names.events_stream("never") in str(info.value)
    finally:
        await nc.close()


class CountingExecutor:
    """Finishes each task at once and remembers every result it produced."""

    name = "counting"

    def __init__(self, produced: list[tuple[str, int]]) -> None:
        self.produced = produced

    async def check(self) -> None:
        return None

    async def run(self, ctx: Any) -> Any:
        from cflow.worker.executor import Outcome

        await asyncio.sleep(0.02)
        self.produced.append((ctx.task_id, ctx.epoch))
        return Outcome(ok=True, output=f"{ctx.task_id}@{ctx.epoch}".encode())


async def test_a_leader_killed_while_workers_drain_drops_no_result(cluster: Cluster) -> None:
    """kill -9 the events leader while 4 workers drain 200 tasks: every result is kept.

    Each result an executor produced is stored as the task's completion, or
    refused by fencing (LeaseLost); none is dropped on a timeout or an
    in-process duplicate during the election.
    """
    from cflow.streams import EventLog
    from cflow.swarm import Swarm
    from cflow.worker.runtime import Worker, WorkerOptions

    swarm, n_tasks = "drain", 200
    admin = await connect(cluster.urls)
    produced: list[tuple[str, int]] = []
    notes: Counter[str] = Counter()
    dropped: list[str] = []
    completed = asyncio.Event()
    done_count = [0]

    def on_event(kind: str, text: str) -> None:
        notes[kind] += 1
        if kind == "record-error":
            dropped.append(text)
        if kind == "completed":
            done_count[0] += 1
            if done_count[0] >= 40:
                completed.set()

    async def work(i: int, stop: asyncio.Event) -> Any:
        urls = cluster.urls.split(",")
        url = ",".join(urls[i % 3:] + urls[:i % 3])
        async with Swarm.connect(url, swarm=swarm, agent=f"w{i}", ensure=False) as s:
            worker = Worker(s, CountingExecutor(produced),
                            WorkerOptions(name=f"w{i}", url=url, claim_wait_s=2.0),
                            on_event=on_event)
            run = asyncio.create_task(worker.run())
            await stop.wait()
            worker.drain()
            return await run

    stop = asyncio.Event()
    workers: list[asyncio.Task[Any]] = []
    try:
        await ensure_swarm_when_placeable(admin, swarm, 3)
        await wait_until(lambda: _all_current(admin, swarm), 20, "R3 replicas current")
        async with Swarm.connect(cluster.urls, swarm=swarm, agent="producer",
                                 ensure=False) as s:
            for k in range(n_tasks):
                await s.tasks.create(f"job {k}", lease_ttl_s=30.0)
        async with asyncio.timeout(55):
            workers = [asyncio.create_task(work(i, stop)) for i in range(4)]
            await completed.wait()
            info = await wait_until(lambda: stream_info(admin, names.events_stream(swarm)), 10,
                                    "events stream info")
            cluster.by_name(info["cluster"]["leader"]).kill()
            log = EventLog(admin, swarm)

            async def all_completed() -> bool:
                stored = await completions(log)
                return len(stored) >= n_tasks

            await wait_until(all_completed, 45, f"{n_tasks} tasks completed")
            stop.set()
            stats = await asyncio.gather(*workers)
        stored = await completions(log)
    finally:
        stop.set()
        for t in workers:
            t.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await admin.close()
    refused = sum(st.lost for st in stats)
    print(f"\nleader killed while draining: {len(produced)} results produced, "
          f"{sum(len(v) for v in stored.values())} completions stored, {refused} refused, "
          f"{len(dropped)} dropped; worker notes {dict(notes)}")
    assert dropped == []
    assert all(len(v) == 1 for v in stored.values()), "a task completed twice"
    assert len(stored) == n_tasks
    kept = {(task, epoch) for task, epochs in stored.items() for epoch in epochs}
    assert len(produced) - len(kept & set(produced)) == refused


async def completions(log: Any) -> dict[str, list[int]]:
    """Task id -> epochs of its stored completions, from the log itself."""
    out: dict[str, list[int]] = {}
    for item in await log.read(names.events_filter(log.swarm, "task")):
        data = getattr(item, "event", None) and item.event.data
        if isinstance(data, ev.TaskCompleted):
            out.setdefault(item.event.entity_id, []).append(data.epoch)
    return out


async def _all_current(nc: Any, swarm: str) -> bool:
    return all([all_current(await stream_info(nc, spec.name))
                for spec in swarm_resources(swarm)])
