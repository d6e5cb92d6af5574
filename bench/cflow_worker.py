"""A long-lived benchmark agent process: ``python -m bench.cflow_worker``.

It reads one JSON command per line on stdin and answers JSON lines on stdout,
so the runner can start N of them once and reuse them across figures. Every
cflow operation goes through the public facade (``Swarm.connect`` ->
``swarm.tasks``); the only instrumentation is a counter of compare-and-set
conflicts around ``EventLog.append_event``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import cflow.control
import cflow.leases  # noqa: F401 - loaded at start, not inside a timed first claim
from cflow.errors import CflowError, ConcurrencyConflict
from cflow.swarm import Swarm


def rss_kb(pid: int | str = "self") -> int:
    """A process's resident set size now (VmRSS from /proc), in kB; 0 when unknown."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _profiler() -> Any:
    """A running cProfile when ``CFLOW_BENCH_PROFILE`` names a directory (off by default)."""
    if not os.environ.get("CFLOW_BENCH_PROFILE"):
        return None
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    return prof


async def read_line() -> str:
    return await asyncio.to_thread(sys.stdin.readline)


class Costs:
    """This process's CPU time, context switches and event-loop iterations since it was
    made: the per-cycle costs that decide claims/s when many processes share two cores.

    Loop iterations are counted by wrapping the running loop's selector (one
    ``select`` per iteration); voluntary switches are mostly the loop going idle."""

    def __init__(self) -> None:
        selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
        if not hasattr(selector, "cflow_iterations"):
            select = selector.select

            def counted(timeout: float | None = None) -> Any:
                selector.cflow_iterations += 1
                return select(timeout)

            selector.cflow_iterations = 0
            selector.select = counted
        self.selector = selector
        self.start = self.now()

    def now(self) -> dict[str, float]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {"cpu_user_s": ru.ru_utime, "cpu_sys_s": ru.ru_stime,
                "voluntary_switches": ru.ru_nvcsw, "involuntary_switches": ru.ru_nivcsw,
                "loop_iterations": self.selector.cflow_iterations}

    def since(self) -> dict[str, float]:
        return {k: v - self.start[k] for k, v in self.now().items()}


class Agent:
    def __init__(self) -> None:
        self.stack = AsyncExitStack()
        self.swarms: dict[tuple[str, str, str], Swarm] = {}
        self.conflicts = 0

    async def swarm(self, url: str, name: str, agent: str) -> Swarm:
        key = (url, name, agent)
        if key not in self.swarms:
            sw = await self.stack.enter_async_context(
                Swarm.connect(url, swarm=name, agent=agent, ensure=False))
            self._count_conflicts(sw)
            self.swarms[key] = sw
        return self.swarms[key]

    def _count_conflicts(self, sw: Swarm) -> None:
        original = sw.log.append_event

        async def counted(event: Any, **options: Any) -> Any:
            try:
                return await original(event, **options)
            except ConcurrencyConflict:
                self.conflicts += 1
                raise

        sw.log.append_event = counted  # type: ignore[method-assign]

    # ---------------------------------------------------------------- commands

    async def claims(self, cmd: dict[str, Any]) -> None:
        """Claim + complete in a loop for ``duration`` seconds after "go"."""
        sw = await self.swarm(cmd["url"], cmd["swarm"], cmd["agent"])
        await sw.tasks.offers.subjects(fresh=True)  # no board: claims take offers
        emit({"ready": True})
        await read_line()  # "go"
        self.conflicts = 0
        lat: list[float] = []
        done_lat: list[float] = []
        ids: list[str] = []
        errors = 0
        stats0 = dict(sw.log.nc.stats)
        refreshes0 = sw.tasks.offers.refreshes
        prof = _profiler()
        costs = Costs() if not os.environ.get("CFLOW_BENCH_UVLOOP") else None
        start = time.time()
        deadline = time.perf_counter() + float(cmd["duration"])
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                lease = await sw.tasks.claim(agent=cmd["agent"], wait=0)
            except CflowError:
                errors += 1
                continue
            if lease is None:
                break  # pool drained
            t1 = time.perf_counter()
            lat.append(t1 - t0)
            ids.append(lease.task_id)
            try:
                await lease.complete("ok")
            except CflowError:
                errors += 1
            done_lat.append(time.perf_counter() - t1)
        end = time.time()
        spent = costs.since() if costs is not None else {}
        if prof is not None:
            prof.disable()
            prof.dump_stats(f"{os.environ['CFLOW_BENCH_PROFILE']}/{cmd['agent']}.prof")
        stats = {k: v - stats0.get(k, 0) for k, v in sw.log.nc.stats.items()
                 if k in ("in_msgs", "out_msgs")}
        emit({"start": start, "end": end, "latencies": lat, "complete": done_lat,
              "ids": ids, "conflicts": self.conflicts, "errors": errors, "costs": spent,
              "messages": {**stats, "offer_refreshes": sw.tasks.offers.refreshes - refreshes0}})

    async def writes(self, cmd: dict[str, Any]) -> None:
        """The floor under a claim: only awaited JetStream writes (cflow's ack path,
        ``js_publish``) on this process's connection, in a loop for ``duration`` s."""
        from cflow.streams.acks import js_publish

        sw = await self.swarm(cmd["url"], cmd["swarm"], cmd["agent"])
        nc, subject, payload = sw.log.nc, cmd["subject"], b"x" * int(cmd.get("size", 200))
        await js_publish(nc, subject, payload, {}, 5.0)  # the inbox is made before "go"
        emit({"ready": True})
        await read_line()  # "go"
        costs = Costs()
        start = time.time()
        deadline = time.perf_counter() + float(cmd["duration"])
        n = 0
        while time.perf_counter() < deadline:
            await js_publish(nc, subject, payload, {}, 5.0)
            n += 1
        emit({"start": start, "end": time.time(), "writes": n, "costs": costs.since()})

    async def pickup(self, cmd: dict[str, Any]) -> None:
        """Idle claimer: ``claim(wait=...)``, report when it got the task, complete it."""
        sw = await self.swarm(cmd["url"], cmd["swarm"], cmd["agent"])
        await sw.tasks.offers.subjects(fresh=True)
        emit({"ready": True})
        for _ in range(int(cmd["n"])):
            lease = await sw.tasks.claim(agent=cmd["agent"], wait=float(cmd.get("wait", 30)))
            t = time.time()
            if lease is None:
                emit({"id": None, "t": t})
                continue
            emit({"id": lease.task_id, "t": t})
            await lease.complete("ok")
        emit({"done": True})

    async def hold(self, cmd: dict[str, Any]) -> None:
        """Claim one task and heartbeat it until killed (kill -9 by the runner)."""
        sw = await self.swarm(cmd["url"], cmd["swarm"], cmd["agent"])
        lease = await sw.tasks.claim(cmd.get("task_id"), agent=cmd["agent"], wait=10)
        if lease is None:
            emit({"held": None})
            return
        async with lease.keep_alive():
            emit({"held": lease.task_id, "epoch": lease.epoch, "t": time.time()})
            await asyncio.Event().wait()

    async def reclaim(self, cmd: dict[str, Any]) -> None:
        """Run the reaper (``maintain``) and wait to claim ``task_id`` again."""
        sw = await self.swarm(cmd["url"], cmd["swarm"], cmd["agent"])
        maint = asyncio.create_task(sw.tasks.maintain())
        try:
            await sw.tasks.ensure_board()
            emit({"ready": True})
            deadline = time.monotonic() + float(cmd["wait"])
            while time.monotonic() < deadline:
                lease = await sw.tasks.claim(agent=cmd["agent"],
                                             wait=max(0.0, deadline - time.monotonic()))
                if lease is None:
                    break
                t = time.time()
                await lease.complete("reclaimed")
                if lease.task_id == cmd["task_id"]:
                    emit({"id": lease.task_id, "t": t, "attempt": lease.attempt})
                    return
            emit({"id": None, "t": time.time()})
        finally:
            maint.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maint

    async def load(self, cmd: dict[str, Any]) -> None:
        """``agents`` simulated agents, each present (``swarm.agents``, presence key
        renewed every ``period``) and holding one claimed task whose lease it renews
        every ``period`` (``lease.keep_alive``), until a "stop" line arrives.

        ``nice`` lowers this process's CPU priority first (``os.nice``), so that the
        generator does not compete with what is measured. Each "mark" line is
        answered with the number of heartbeat writes stored so far (successful
        ``kv_put`` calls: presence and lease renewals), so the runner can compute
        the writes/s achieved over exactly its measuring window.
        """
        if int(cmd.get("nice", 0)):
            os.nice(int(cmd["nice"]))
        url, name = cmd["url"], cmd["swarm"]
        n = int(cmd["agents"])
        prefix = str(cmd.get("prefix", "sim-"))
        period = float(cmd.get("period", 1.0))
        sw = await self.swarm(url, name, f"load-{prefix}")
        puts = 0
        kv_put = sw.log.kv_put

        async def counted_put(*args: Any, **kwargs: Any) -> int:
            nonlocal puts
            revision = await kv_put(*args, **kwargs)
            puts += 1
            return revision

        sw.log.kv_put = counted_put  # type: ignore[method-assign]
        setup_t0 = time.perf_counter()
        sem = asyncio.Semaphore(64)
        async with AsyncExitStack() as held:

            async def one(i: int) -> Any:
                async with sem:
                    agent = await sw.agents.register(f"{prefix}{i}", runtime="bench")
                    await held.enter_async_context(
                        agent.present(ttl_s=3 * period, renew_s=period))
                    state = await sw.tasks.create(f"{prefix}{i}", lease_ttl_s=3 * period,
                                                  priority=-1000)
                    lease = await sw.tasks.claim(state.task_id, agent=f"{prefix}{i}")
                    assert lease is not None
                    await held.enter_async_context(lease.keep_alive(interval_s=period))
                    return agent, lease

            pairs = await asyncio.gather(*(one(i) for i in range(n)))
            setup_s = time.perf_counter() - setup_t0
            emit({"ready": True, "setup_s": setup_s, "niceness": os.nice(0)})
            while (await read_line()).strip() == "mark":
                emit({"puts": puts, "t": time.time()})
            lost = Counter(lease.lost_reason for _, lease in pairs if lease.lost.is_set())
            lapses = sum(agent.lapses for agent, _ in pairs)
            emit({"setup_s": setup_s, "puts": puts, "leases_lost": sum(lost.values()),
                  "lost_reasons": dict(lost), "presence_lapses": lapses})
            t_down = time.perf_counter()
        print(f"load teardown took {time.perf_counter() - t_down:.1f} s", file=sys.stderr,
              flush=True)

    async def agents(self, cmd: dict[str, Any]) -> None:
        """Several agents in this process, each its own ``Swarm.connect``, all started
        by one "go" line.

        ``mode`` "first": after "go" each agent connects, claims one task
        (``wait`` s at most) and holds it (``keep_alive``) until the next "reset";
        the answer gives, per agent, the seconds from the start of its connect to
        its first claim. ``mode`` "drain": agents connect before "go", then claim +
        complete until no offer came for ``idle`` s; the answer lists per agent the
        task ids it claimed. Both answers carry this process's RSS.
        """
        url, name = cmd["url"], cmd["swarm"]
        specs: list[dict[str, Any]] = cmd["agents"]
        mode = cmd["mode"]

        async def connect(spec: dict[str, Any]) -> Swarm:
            sw = await self.stack.enter_async_context(
                Swarm.connect(url, swarm=name, agent=spec["name"], ensure=False))
            return sw

        async def first(spec: dict[str, Any]) -> dict[str, Any]:
            t0 = time.perf_counter()
            sw = await connect(spec)
            t_conn = time.perf_counter()
            lease = await sw.tasks.claim(agent=spec["name"], capabilities=spec.get("caps", ()),
                                         wait=float(cmd.get("wait", 30)))
            t1 = time.perf_counter()
            if lease is not None:
                await self.stack.enter_async_context(lease.keep_alive())
            return {"name": spec["name"], "connect_s": t_conn - t0, "first_claim_s": t1 - t0,
                    "task_id": lease.task_id if lease else None}

        async def drain(spec: dict[str, Any], sw: Swarm) -> dict[str, Any]:
            claimed: list[str] = []
            errors = 0
            t0 = t_last = time.perf_counter()
            while True:
                try:
                    lease = await sw.tasks.claim(agent=spec["name"],
                                                 capabilities=spec.get("caps", ()),
                                                 wait=float(cmd.get("idle", 0.5)))
                except CflowError:
                    errors += 1
                    continue
                if lease is None:
                    break
                claimed.append(lease.task_id)
                try:
                    await lease.complete("ok")
                except CflowError:
                    errors += 1
                t_last = time.perf_counter()
            return {"name": spec["name"], "claimed": claimed, "errors": errors,
                    "busy_s": t_last - t0}

        results: list[dict[str, Any]]
        if mode == "first":
            emit({"ready": True, "rss_kb": rss_kb()})
            await read_line()  # "go"
            results = list(await asyncio.gather(*(first(spec) for spec in specs)))
        else:
            swarms = [await connect(spec) for spec in specs]
            for sw in swarms:
                await sw.tasks.offers.subjects(fresh=True)
            emit({"ready": True, "rss_kb": rss_kb()})
            await read_line()  # "go"
            results = list(await asyncio.gather(
                *(drain(spec, sw) for spec, sw in zip(specs, swarms, strict=True))))
        emit({"agents": results, "rss_kb": rss_kb(),
              "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})

    async def board(self, cmd: dict[str, Any]) -> None:
        """Fold the whole board (``ensure_board``: every task event of the swarm), as
        every claimer did before work offers; a contrast for the RSS figures."""
        sw = await self.swarm(cmd["url"], cmd["swarm"], cmd["agent"])
        t0 = time.perf_counter()
        board = await sw.tasks.ensure_board()
        emit({"fold_s": time.perf_counter() - t0, "tasks": len(board.tasks),
              "rss_kb": rss_kb()})

    async def serve(self) -> None:
        handlers = {"claims": self.claims, "pickup": self.pickup, "hold": self.hold,
                    "reclaim": self.reclaim, "load": self.load, "agents": self.agents,
                    "board": self.board, "writes": self.writes}
        try:
            while True:
                line = await read_line()
                if not line:
                    return
                cmd = json.loads(line)
                if cmd["op"] == "exit":
                    return
                if cmd["op"] == "reset":  # close every connection of earlier figures
                    await self.stack.aclose()
                    self.stack = AsyncExitStack()
                    self.swarms.clear()
                    emit({"reset": True})
                    continue
                try:
                    await handlers[cmd["op"]](cmd)
                except CflowError as exc:
                    emit({"error": f"{type(exc).__name__}: {exc}"})
        finally:
            await self.stack.aclose()


def main() -> None:
    if os.environ.get("CFLOW_BENCH_UVLOOP"):  # measuring uvloop (not a dependency of cflow)
        import uvloop  # type: ignore[import-not-found, unused-ignore]

        uvloop.run(Agent().serve())
        return
    asyncio.run(Agent().serve())


if __name__ == "__main__":
    main()
