"""Issue 21's run, scaled to one machine: a 3-node cluster under load, a stream leader
killed every ``--every`` seconds; counts what a single server never shows.

``uv run python -m bench.cluster_faults [--seconds 180] [--tasks 1000] [--workers 6]``

Counted:

- ``create-read not found``: a task created and read back at once was not found;
- ``create failed``: a create that raised (after the log's own retries);
- ``heartbeat not a claim``: a holder told "epoch is not a claim of this task";
- ``never leased expiries``: ``TaskLeaseExpired`` "claimed but never leased" in the log;
- ``results dropped``: results an executor produced that were neither stored as the
  task's completion nor refused by fencing (the worker gave up recording them);
- ``results refused``: refused by fencing (LeaseLost), which is allowed.

Every server started is stopped at the end, killed ones included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.servers import start_cluster, wait_jetstream_ready
from cflow import events as ev
from cflow.errors import CflowError, NotFound
from cflow.server import EmbeddedServer, ensure_swarm_when_placeable
from cflow.streams import EventLog, connect, names
from cflow.streams.client import api_request


class Executor:
    name = "bench"

    def __init__(self, produced: list[tuple[str, int]]) -> None:
        self.produced = produced

    async def check(self) -> None:
        return None

    async def run(self, ctx: Any) -> Any:
        from cflow.worker.executor import Outcome

        await asyncio.sleep(random.uniform(0.05, 0.3))
        self.produced.append((ctx.task_id, ctx.epoch))
        return Outcome(ok=True, output=f"{ctx.task_id}@{ctx.epoch}".encode())


async def run(seconds: float, n_tasks: int, n_workers: int, every: float, base: Path
              ) -> dict[str, Any]:
    from cflow.swarm import Swarm
    from cflow.worker.runtime import Worker, WorkerOptions

    servers = start_cluster(base)
    by_name = {s.opts.server_name: s for s in servers}
    urls = [s.url for s in servers]
    counts: Counter[str] = Counter()
    produced: list[tuple[str, int]] = []
    worker_notes: Counter[str] = Counter()
    stop = asyncio.Event()
    kills: list[str] = []
    swarm = "faults"

    def on_event(kind: str, text: str) -> None:
        worker_notes[kind] += 1
        if kind == "lost":
            counts[f"lost: {text.split(':', 1)[-1].strip()[:70]}"] += 1
            if "not a claim" in text:
                counts["heartbeat not a claim"] += 1
        if kind == "record-error":
            counts["results dropped (record-error)"] += 1

    async def creator() -> None:
        async with Swarm.connect(",".join(urls), swarm=swarm, agent="creator",
                                 ensure=False) as s:
            for k in range(n_tasks):
                if stop.is_set():
                    return
                try:
                    task = await s.tasks.create(f"job {k}", lease_ttl_s=10.0)
                except CflowError as exc:
                    counts["create failed"] += 1
                    counts[f"create failed: {str(exc)[:60]}"] += 1
                    continue
                counts["created"] += 1
                try:
                    await s.tasks.get(task.task_id)
                except NotFound:
                    counts["create-read not found"] += 1
                except CflowError:
                    counts["create-read failed"] += 1
                await asyncio.sleep(seconds * 0.6 / n_tasks)

    async def worker(i: int) -> Any:
        url = ",".join(urls[i % 3:] + urls[:i % 3])
        async with Swarm.connect(url, swarm=swarm, agent=f"w{i}", ensure=False) as s:
            w = Worker(s, Executor(produced), WorkerOptions(name=f"w{i}", url=url,
                                                            claim_wait_s=2.0),
                       on_event=on_event)
            task = asyncio.create_task(w.run())
            await stop.wait()
            w.drain()
            return await task

    async def killer(admin: Any) -> None:
        targets = [names.events_stream(swarm), names.kv_stream(names.bucket(swarm, names.LEASES))]
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            if stop.is_set():
                return
            stream = targets[len(kills) % 2]  # alternate: the events' leader, the leases'
            try:
                info = await api_request(admin, f"$JS.API.STREAM.INFO.{stream}", timeout=3)
                leader = (info.get("cluster") or {}).get("leader")
            except CflowError:
                leader = None
            if not leader:
                continue
            victim: EmbeddedServer = by_name[leader]
            kills.append(f"{stream}@{leader}")
            victim.kill()
            await asyncio.sleep(5)
            await asyncio.to_thread(victim.start)

    admin = None
    tasks: list[asyncio.Task[Any]] = []
    started = time.monotonic()
    try:
        await wait_jetstream_ready(urls)
        admin = await connect(",".join(urls))
        await ensure_swarm_when_placeable(admin, swarm, 3)
        workers = [asyncio.create_task(worker(i)) for i in range(n_workers)]
        tasks = [asyncio.create_task(creator()), asyncio.create_task(killer(admin)), *workers]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(tasks[0]), seconds)
        # Let the workers finish what is ready (bounded), then stop.
        log = EventLog(admin, swarm)
        log.retry_s = 30
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = await stored_completions(log)
            if len(done) >= counts["created"]:
                break
            await asyncio.sleep(2)
        stop.set()
        stats = await asyncio.gather(*workers, return_exceptions=True)
        done = await stored_completions(log)
        expiries = await never_leased(log)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if admin is not None:
            await admin.close()
        for s in servers:
            s.stop()
    kept = {(t, e) for t, es in done.items() for e in es}
    refused = sum(getattr(st, "lost", 0) for st in stats if not isinstance(st, BaseException))
    counts["results produced"] = len(produced)
    counts["completions stored"] = sum(len(v) for v in done.values())
    counts["tasks completed twice"] = sum(1 for v in done.values() if len(v) > 1)
    counts["results refused or lost (worker)"] = refused
    counts["results not stored"] = len(set(produced) - kept)
    counts["never leased expiries"] = expiries
    return {"seconds": round(time.monotonic() - started), "kills": kills,
            "counts": dict(sorted(counts.items())), "worker_notes": dict(worker_notes)}


async def stored_completions(log: EventLog) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for item in await log.read(names.events_filter(log.swarm, "task")):
        event = getattr(item, "event", None)
        if event is not None and isinstance(event.data, ev.TaskCompleted):
            out.setdefault(event.entity_id, []).append(event.data.epoch)
    return out


async def never_leased(log: EventLog) -> int:
    n = 0
    for item in await log.read(names.events_filter(log.swarm, "task")):
        event = getattr(item, "event", None)
        if event is not None and isinstance(event.data, ev.TaskLeaseExpired) and \
                "never leased" in (event.data.reason or ""):
            n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--every", type=float, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(args.seconds, args.tasks, args.workers, args.every, Path(tmp)))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
