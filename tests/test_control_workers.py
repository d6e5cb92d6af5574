"""Pause and emergency stop as workers (the real runtime, subprocess executor) see them."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cflow.streams import StoredEvent, names
from cflow.swarm import Swarm
from cflow.worker import Worker, WorkerOptions
from cflow.worker.subprocess_exec import SubprocessExecutor

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def workers(nats_url: str, swarm_name: str, command: str, n: int
                  ) -> AsyncIterator[tuple[list[Worker], list[asyncio.Task[object]]]]:
    async with contextlib.AsyncExitStack() as stack:
        ws: list[Worker] = []
        runs: list[asyncio.Task[object]] = []
        for i in range(n):
            s = await stack.enter_async_context(
                Swarm.connect(nats_url, swarm=swarm_name, agent=f"w{i}"))
            w = Worker(s, SubprocessExecutor(command, kill_grace_s=0.5),
                       WorkerOptions(name=f"w{i}", url=nats_url, claim_wait_s=30,
                                     drain_grace_s=5))
            ws.append(w)
            runs.append(asyncio.create_task(w.run()))  # type: ignore[arg-type]
        try:
            await asyncio.wait_for(asyncio.gather(*(w.started.wait() for w in ws)), 15)
            yield ws, runs
        finally:
            for w in ws:
                w.abort()
            _, pending = await asyncio.wait(runs, timeout=20)
            for t in pending:
                t.cancel()


async def claims_after(swarm: Swarm, seq: int) -> list[str]:
    items = await swarm.log.read(names.events_filter(swarm.name, "task"), start_seq=seq + 1)
    return [i.event.entity_id for i in items
            if isinstance(i, StoredEvent) and i.event.type == "TaskClaimed"]


async def test_pause_holds_workers_and_resume_lets_them_work(nats_url: str,
                                                           swarm_name: str) -> None:
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="alice") as admin, \
            workers(nats_url, swarm_name, "echo done", 3) as (ws, _):
        await admin.control.pause(reason="maintenance window")
        for w in ws:
            assert await w.swarm.control.wait_mode("paused", timeout_s=5)
        mark = await admin.log.stream_last_seq()
        tasks = [await admin.tasks.create(f"job {i}") for i in range(4)]
        # One heartbeat interval of a default lease is 10 s; nothing is claimed well
        # within it (the workers' claims are refused by the guard).
        await asyncio.sleep(1.5)  # proving an absence: a bounded wait is the only way
        assert await claims_after(admin, mark) == []
        await admin.control.resume(reason="window over")
        admin_board = await admin.tasks.ensure_board()

        def all_done() -> bool:
            return all((s := admin_board.get(t.task_id)) is not None
                       and s.status == "completed" for t in tasks)

        async with admin.tasks._changed:
            await asyncio.wait_for(admin.tasks._changed.wait_for(all_done), 15)
        assert sorted(await claims_after(admin, mark)) == sorted(t.task_id for t in tasks)


async def test_stop_now_kills_running_subprocesses_and_workers_exit(
        nats_url: str, swarm_name: str, tmp_path: Path) -> None:
    command = f"echo $$ > {tmp_path}/$CFLOW_TASK_ID.pid; exec sleep 60"
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="alice") as admin, \
            workers(nats_url, swarm_name, command, 2) as (_, runs):
        tasks = [await admin.tasks.create(f"long job {i}", lease_ttl_s=3) for i in range(2)]
        pidfiles = [tmp_path / f"{t.task_id}.pid" for t in tasks]
        async with asyncio.timeout(15):
            while not all(p.exists() and p.read_text().strip() for p in pidfiles):
                await asyncio.sleep(0.05)  # a subprocess writing a file is not an event
        pids = [int(p.read_text()) for p in pidfiles]
        for pid in pids:
            os.kill(pid, 0)  # alive

        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await admin.control.stop(now=True, reason="emergency")
        assert sorted(result["cancelled"]) == sorted(t.task_id for t in tasks)
        # Every worker exits by itself: heartbeat (1 s) sees the cancel, the process
        # group is killed, the stop flag drains the worker.
        await asyncio.wait_for(asyncio.gather(*runs), 15)
        elapsed = loop.time() - started
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert elapsed < 10
        for t in tasks:
            state = await admin.tasks.get(t.task_id)
            assert state.status == "cancelled"
            last = (await admin.tasks.history(t.task_id))[-1].event
            assert (last.type, last.actor) == ("TaskCancelled", "alice")
