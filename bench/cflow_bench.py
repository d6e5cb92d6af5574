"""cflow's figures, each next to the baseline measured in the same run.

1 pickup latency (push) vs SQLite 1 s polling; 2 claims/s and claim latency with
N agent processes vs SQLite; 3 reclaim time after kill -9 / lease TTL; 4 event
append through EventLog vs raw JetStream publish; 6 claim p99 under 1,000
heartbeating agents (4 niced generator processes) vs idle; 8 R3 vs R1 on a local
3-node cluster. (9 and 10, the big swarm and mixed capabilities, are in
:mod:`bench.swarm_bench`.)
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import uuid
from collections import Counter
from typing import Any

from bench import sqlite_baseline
from bench.context import Ctx
from bench.procs import Child
from bench.servers import DURABILITY, SQLITE_DURABILITY
from bench.stats import Goal, latency_summary, percentile
from cflow import events as ev
from cflow.streams import StoredEvent, names
from cflow.swarm import Swarm

SYNCS = ("always", "default")
BULK = 1000  # events per publish_async / append_many batch (one ack wait per batch)


def progress(text: str) -> None:
    print(f"[bench]   {text}", file=sys.stderr, flush=True)


def swarm_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


async def create_pool(sw: Swarm, n: int, *, concurrency: int = 32, **opts: Any) -> list[str]:
    """``n`` ready tasks through the public ``create`` (setup, not timed)."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> str:
        async with sem:
            state = await sw.tasks.create(f"bench task {i}", priority=i % 5, **opts)
            return state.task_id

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def holder_violations(items: list[Any]) -> dict[str, int]:
    """From the task event log: claims made while another claim was live (double
    claims) and tasks with more than one TaskCompleted."""
    holder: dict[str, bool] = {}
    completed: Counter[str] = Counter()
    doubles = 0
    for item in items:
        if not isinstance(item, StoredEvent):
            continue
        tid = item.event.entity_id
        data = item.event.data
        if isinstance(data, ev.TaskClaimed):
            if holder.get(tid):
                doubles += 1
            holder[tid] = True
        elif isinstance(data, ev.TaskCompleted):
            completed[tid] += 1
            holder[tid] = False
        elif isinstance(data, ev.TaskFailed | ev.TaskReleased | ev.TaskLeaseExpired
                        | ev.TaskCancelled):
            holder[tid] = False
    return {"double_claims": doubles,
            "double_completions": sum(c - 1 for c in completed.values() if c > 1)}


async def log_violations(url: str | list[str], swarm: str) -> dict[str, int]:
    async with Swarm.connect(url, swarm=swarm, agent="checker", ensure=False) as sw:
        items = await sw.log.read(names.events_filter(swarm, "task"))
    return holder_violations(items)


async def agents(ctx: Ctx, n: int) -> list[Child]:
    """``n`` long-lived agent processes, started once and reused across figures."""
    while len(ctx.agents) < n:
        ctx.agents.append(
            await ctx.children.start("bench.cflow_worker", f"agent{len(ctx.agents)}"))
    return ctx.agents[:n]


async def reset_agents(ctx: Ctx) -> None:
    for child in ctx.agents:
        await child.send({"op": "reset"})
        await child.recv()


# --------------------------------------------------------------------- 1 pickup


async def pickup(ctx: Ctx) -> None:
    rec = ctx.rec
    reps = ctx.reps(2, 5)
    sq_each = int(ctx.pick(2, 8))
    for _ in range(reps):
        lat = await asyncio.to_thread(sqlite_baseline.pickup_run, ctx.tmp, "strict", 4, sq_each)
        s = latency_summary(lat)
        for q in ("p50", "p99"):
            rec.add(f"pickup.sqlite.{q}", s[q], label=f"pickup {q}, SQLite 1 s polling",
                    unit="ms", section="1 pickup", durability=SQLITE_DURABILITY["strict"],
                    is_baseline=True,
                    note=f"4 idle pollers x {sq_each} tasks per run, random phase")
    n = int(ctx.pick(15, 60))
    [agent] = await agents(ctx, 1)
    for sync in SYNCS:
        url = ctx.servers.url(sync)
        name = swarm_name("pick")
        async with Swarm.connect(url, swarm=name, agent="creator") as sw:
            for _ in range(reps):
                await agent.send({"op": "pickup", "url": url, "swarm": name, "agent": "picker",
                                  "n": n, "wait": 30})
                await agent.recv()
                lat = []
                for i in range(n):
                    await asyncio.sleep(random.uniform(0.005, 0.03))
                    t0 = time.time()
                    await sw.tasks.create(f"pickup {i}")
                    got = await agent.recv()
                    lat.append(float(got["t"]) - t0)
                await agent.recv()  # done
                s = latency_summary(lat)
                for q in ("p50", "p99"):
                    rec.add(
                        f"pickup.cflow.{sync}.{q}", s[q],
                        label=f"pickup {q}, cflow push, sync {sync}", unit="ms",
                        section="1 pickup", baseline=f"pickup.sqlite.{q}",
                        durability=DURABILITY[sync],
                        goals=[Goal("value", "<=", 5.0, "<= 5 ms"),
                               Goal("ratio", "<=", 0.01, ">= 100x faster")] if q == "p50"
                        else [],
                        note=f"{n} tasks per run; measured from before create() to claim "
                             "returning in another process")
        await reset_agents(ctx)


# --------------------------------------------------------------------- 2 claims


def _claim_figures(ctx: Ctx, prefix: str, label: str, n: int, res: dict[str, Any],
                   durability: str, baseline: str | None, conflicts_note: str) -> None:
    rec = ctx.rec
    s = latency_summary(res["latencies"])
    base = (lambda k: f"{baseline}.n{n}.{k}") if baseline else (lambda k: None)
    goals = ([Goal("ratio", ">=", 2.0, ">= 2x strict SQLite")]
             if baseline and n == 16 and "always" in prefix else [])
    rec.add(f"{prefix}.n{n}.rate", res["rate"], label=f"claims/s, {label}, {n} procs",
            unit="claims/s", section="2 claims", baseline=base("rate"), better="higher",
            durability=durability, goals=goals, is_baseline=baseline is None,
            note="claim + complete cycles per second, all processes together")
    for q in ("p50", "p99", "max"):
        rec.add(f"{prefix}.n{n}.{q}", s[q], label=f"claim {q}, {label}, {n} procs", unit="ms",
                section="2 claims", baseline=base(q), durability=durability,
                is_baseline=baseline is None)
    rec.add(f"{prefix}.n{n}.double_claims", res["double_claims"],
            label=f"double claims, {label}, {n} procs", unit="count", section="2 claims",
            durability=durability, is_baseline=baseline is None,
            goals=[Goal("value", "<=", 0, "must be 0")])
    rec.add(f"{prefix}.n{n}.conflicts", res["conflicts"],
            label=f"CAS conflicts (lost races), {label}, {n} procs", unit="count",
            section="2 claims", durability=durability, is_baseline=baseline is None,
            note=conflicts_note)


def _per_cycle(ctx: Any, sync: str, n: int, key: str, value: float, what: str, unit: str,
               note: str = "") -> None:
    """Record one cost per claim + complete cycle of the ``n``-process cflow run."""
    ctx.rec.add(f"claims.cflow.{sync}.n{n}.{key}_per_cycle", value,
                label=f"{what} per claim+complete, cflow {sync}, {n} procs", unit=unit,
                section="2 claims", durability=DURABILITY[sync], note=note)


async def _run_claimers(active: list[Child], duration: float) -> list[dict[str, Any]]:
    """Start barrier, then the run; an agent that fails (a NATS timeout on an overloaded
    machine) is left out of this run rather than aborting the whole section."""
    ready = []
    for w in active:
        try:
            await w.recv(120)
            ready.append(w)
        except RuntimeError as exc:
            progress(f"agent left out: {exc}")
    for w in ready:
        await w.send("go")
    results = []
    for w in ready:
        try:
            results.append(await w.recv(duration + 120))
        except RuntimeError as exc:
            progress(f"agent result lost: {exc}")
    return results


async def claims(ctx: Ctx) -> None:
    levels = [1, 4, 16] if ctx.quick else [1, 4, 16, 32]
    duration = ctx.seconds(1.0, 5.0)
    reps = ctx.reps(1, 3)
    for mode in ("strict", "default"):
        for n in levels:
            for _ in range(reps):
                res = await asyncio.to_thread(sqlite_baseline.claims_run, ctx.tmp, mode, n,
                                              duration, int(ctx.pick(20_000, 200_000)))
                _claim_figures(ctx, f"claims.sqlite.{mode}", f"SQLite {mode}", n, res,
                               SQLITE_DURABILITY[mode], None,
                               "UPDATE affected 0 rows, retried")
                ctx.rec.add(f"claims.sqlite.{mode}.n{n}.locked", res["locked"],
                            label=f'"database is locked" errors, SQLite {mode}, {n} procs',
                            unit="count", section="2 claims", is_baseline=True,
                            durability=SQLITE_DURABILITY[mode],
                            note="after the 5 s busy timeout; retried")
    workers = await agents(ctx, max(levels))
    for sync in SYNCS:
        url = ctx.servers.url(sync)
        name = swarm_name("claims")
        async with Swarm.connect(url, swarm=name, agent="creator") as sw:
            left = 0
            target = int(ctx.pick(250, 1500))
            for n in levels:
                for _ in range(reps):
                    if left < target:
                        t_pool = time.perf_counter()
                        await create_pool(sw, target - left)
                        progress(f"created {target - left} tasks in "
                                 f"{time.perf_counter() - t_pool:.1f} s")
                        left = target
                    active = workers[:n]
                    for i, w in enumerate(active):
                        await w.send({"op": "claims", "url": url, "swarm": name,
                                      "agent": f"a{i}", "duration": duration})
                    results = await _run_claimers(active, duration)
                    if len(results) < n:
                        ctx.rec.notes.append(f"claims cflow {sync} n={n}: "
                                             f"{n - len(results)} agents failed (see log)")
                    if not results:
                        continue
                    lat = [x for r in results for x in r["latencies"]]
                    ids = Counter(i for r in results for i in r["ids"])
                    elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
                    rate = len(lat) / elapsed if elapsed > 0 else 0.0
                    left -= len(lat)
                    target = max(target, int(rate * duration * 1.5) + 50)
                    done = [x for r in results for x in r["complete"]]
                    ctx.rec.add(f"claims.cflow.{sync}.n{n}.complete_p50",
                                percentile(done, 50) * 1000,
                                label=f"complete p50, cflow {sync}, {n} procs", unit="ms",
                                section="2 claims", durability=DURABILITY[sync],
                                note="lease.complete(): fenced append, lease delete, re-read")
                    sent = sum(r.get("messages", {}).get("out_msgs", 0) for r in results)
                    got = sum(r.get("messages", {}).get("in_msgs", 0) for r in results)
                    if lat:
                        _per_cycle(ctx, sync, n, "messages", (sent + got) / len(lat),
                                   "NATS messages", "msgs",
                                   note=f"sent {sent / len(lat):.2f} + received "
                                        f"{got / len(lat):.2f}, counted on the agents' "
                                        "connections")
                    costs = [r.get("costs") or {} for r in results]
                    if lat and all(costs):
                        total = {k: sum(c[k] for c in costs) for k in costs[0]}
                        cpu = total["cpu_user_s"] + total["cpu_sys_s"]
                        _per_cycle(ctx, sync, n, "client_cpu", cpu / len(lat) * 1000,
                                   "client CPU", "ms",
                                   note=f"user {total['cpu_user_s'] / len(lat) * 1000:.2f} + "
                                        f"sys {total['cpu_sys_s'] / len(lat) * 1000:.2f} ms, "
                                        "getrusage of the agent processes")
                        for key, what in (("loop_iterations", "event-loop iterations"),
                                          ("voluntary_switches", "voluntary context switches"),
                                          ("involuntary_switches",
                                           "involuntary context switches")):
                            _per_cycle(ctx, sync, n, key, total[key] / len(lat), what, "count")
                    res = {"rate": rate, "latencies": lat,
                           "double_claims": sum(c - 1 for c in ids.values() if c > 1),
                           "conflicts": sum(r["conflicts"] for r in results)}
                    progress(f"cflow {sync} n={n}: {rate:.0f} claims/s")
                    _claim_figures(ctx, f"claims.cflow.{sync}", f"cflow {sync}", n, res,
                                   DURABILITY[sync], "claims.sqlite.strict",
                                   "expected-last-sequence refusals of TaskClaimed, "
                                   "counted in the agent processes")
            await _floor(ctx, sw, workers, levels, sync, duration)
        violations = await log_violations(url, name)
        ctx.rec.add(f"claims.cflow.{sync}.log_double_claims", violations["double_claims"],
                    label=f"double claims in the event log, cflow {sync}, all runs",
                    unit="count", section="2 claims", durability=DURABILITY[sync],
                    goals=[Goal("value", "<=", 0, "must be 0")],
                    note="a TaskClaimed while another claim of the task was live")
        ctx.rec.add(f"claims.cflow.{sync}.log_double_completions",
                    violations["double_completions"],
                    label=f"double completions in the event log, cflow {sync}", unit="count",
                    section="2 claims", durability=DURABILITY[sync],
                    goals=[Goal("value", "<=", 0, "must be 0")])
        await reset_agents(ctx)


WRITES_PER_CYCLE = 3  # awaited per claim + complete: the lease, the claim, the completion


async def _floor(ctx: Ctx, sw: Swarm, workers: list[Child], levels: list[int], sync: str,
                 duration: float) -> None:
    """The same processes doing nothing but awaited JetStream writes (cflow's ack path,
    no cflow logic): what N processes on this machine can do at all, and so the most
    claim + complete cycles a second that WRITES_PER_CYCLE writes each could reach."""
    js = sw.log.nc.jetstream()
    stream = f"BENCHFLOOR{uuid.uuid4().hex[:8].upper()}"
    await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"])
    try:
        for n in levels:
            if n not in (1, 16):
                continue
            active = workers[:n]
            for i, w in enumerate(active):
                await w.send({"op": "writes", "url": ctx.servers.url(sync),
                              "swarm": sw.name, "agent": f"a{i}",
                              "subject": f"{stream.lower()}.a{i}", "duration": duration})
            results = await _run_claimers(active, duration)
            if not results:
                continue
            writes = sum(r["writes"] for r in results)
            elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
            rate = writes / elapsed if elapsed > 0 else 0.0
            cpu = sum(r["costs"]["cpu_user_s"] + r["costs"]["cpu_sys_s"] for r in results)
            progress(f"floor {sync} n={n}: {rate:.0f} awaited writes/s")
            ctx.rec.add(f"claims.floor.{sync}.n{n}.writes", rate,
                        label=f"awaited JetStream writes/s and nothing else, {n} procs",
                        unit="writes/s", section="2 claims", better="higher",
                        durability=DURABILITY[sync],
                        note="the claim path's ack mux (js_publish) in a loop: the floor "
                             "under any claim protocol on this machine")
            ctx.rec.add(f"claims.floor.{sync}.n{n}.ceiling", rate / WRITES_PER_CYCLE,
                        label=f"claim+complete ceiling at {WRITES_PER_CYCLE} awaited writes "
                              f"a cycle, {n} procs",
                        unit="cycles/s", section="2 claims", better="higher",
                        baseline=f"claims.sqlite.strict.n{n}.rate",
                        durability=DURABILITY[sync],
                        note="writes/s divided by the lease, claim and completion writes; "
                             "no offer, no event building, no fold")
            ctx.rec.add(f"claims.floor.{sync}.n{n}.client_cpu_per_write",
                        cpu / max(writes, 1) * 1e6,
                        label=f"client CPU per awaited write, {n} procs", unit="us",
                        section="2 claims", durability=DURABILITY[sync],
                        note="getrusage of the writing processes (user + sys)")
    finally:
        await js.delete_stream(stream)


# -------------------------------------------------------------------- 3 reclaim


async def reclaim(ctx: Ctx) -> None:
    ttl = ctx.pick(2.0, 3.0)
    reps = ctx.reps(2, 5)
    sync = "always"
    url = ctx.servers.url(sync)
    name = swarm_name("reclaim")
    [reclaimer] = await agents(ctx, 1)
    async with Swarm.connect(url, swarm=name, agent="creator") as sw:
        for r in range(reps * 2):
            # Every other task has failed once already (retry policy: 1 s, doubling),
            # so the kill lands on a later attempt: an expired lease is requeued at
            # once (the TTL was the wait), whatever attempt it is.
            later = r % 2 == 1
            state = await sw.tasks.create(f"reclaim {r}", lease_ttl_s=ttl,
                                          backoff_initial_s=0.2 if later else 1.0,
                                          max_attempts=5)
            if later:
                first = await sw.tasks.claim(state.task_id, agent="creator")
                assert first is not None
                await first.fail("first attempt failed", retry=True)
                await asyncio.sleep(0.3)  # the retry policy's backoff (0.2 s) is a timer
            holder = await ctx.children.start("bench.cflow_worker", f"holder{r}")
            try:
                await holder.send({"op": "hold", "url": url, "swarm": name, "agent": "holder",
                                   "task_id": state.task_id})
                held = await holder.recv(60)
                assert held["held"] == state.task_id, held
                await reclaimer.send({"op": "reclaim", "url": url, "swarm": name,
                                      "agent": "rescuer", "task_id": state.task_id,
                                      "wait": ttl * 10})
                await reclaimer.recv(60)
                # a random point in the heartbeat cycle (heartbeats run every TTL/3)
                await asyncio.sleep(random.uniform(0.0, ttl / 3))
                t_kill = time.time()
                holder.kill9()
                got = await reclaimer.recv(ttl * 10 + 30)
            finally:
                await ctx.children.stop([holder])
            if got["id"] is None:
                raise RuntimeError("task was not reclaimed")
            which = "later" if later else "first"
            ctx.rec.add(f"reclaim.cflow.ratio_ttl.{which}", (float(got["t"]) - t_kill) / ttl,
                        label=f"reclaim after kill -9 / lease TTL, {which} attempt",
                        unit="x TTL", section="3 reclaim", durability=DURABILITY[sync],
                        goals=[Goal("value", "<=", 1.2, "<= 1.2x TTL")],
                        note=f"TTL {ttl:g} s, kill at a random point of the heartbeat cycle, "
                             "default retry policy; the expected value is about TTL minus "
                             "half a heartbeat period")
            ctx.rec.add("reclaim.cflow.after_last_renewal", (float(got["t"]) - held["t"]) / ttl,
                        label="reclaim after the last lease write / lease TTL", unit="x TTL",
                        section="3 reclaim", durability=DURABILITY[sync],
                        note="the kill lands before the first heartbeat, so the claim's lease "
                             "write is the last renewal: this is server-side TTL precision "
                             "plus the reaper and the new claim")
            ctx.rec.add("reclaim.cflow.seconds", float(got["t"]) - t_kill,
                        label="reclaim after kill -9", unit="s", section="3 reclaim",
                        durability=DURABILITY[sync], baseline="reclaim.ttl")
            ctx.rec.add("reclaim.ttl", ttl, label="lease TTL", unit="s", section="3 reclaim",
                        is_baseline=True)
    await reset_agents(ctx)


# --------------------------------------------------------------------- 4 append


async def append(ctx: Ctx) -> None:
    reps = ctx.reps(2, 5)
    n = int(ctx.pick(300, 2000))
    n_async = int(ctx.pick(2000, 10000))
    for sync in SYNCS:
        url = ctx.servers.url(sync)
        name = swarm_name("append")
        async with Swarm.connect(url, swarm=name, agent="appender") as sw:
            log = sw.log
            data = ev.TaskNoted(task_id="t" * 36, text="progress " * 8)
            sample = log.event(data, "x" * 36)
            payload = ev.encode(sample)
            subj = [names.event_subject(name, "raw", f"r{i}") for i in range(64)]
            for _ in range(reps):
                t0 = time.perf_counter()
                for i in range(n):
                    await log.js.publish(subj[i % 64], payload)
                raw_rate = n / (time.perf_counter() - t0)
                t0 = time.perf_counter()
                for i in range(n):
                    await log.append(data, f"n{i % 64}")
                cf_rate = n / (time.perf_counter() - t0)
                t0 = time.perf_counter()
                for lo in range(0, n_async, BULK):
                    futs = [await log.js.publish_async(subj[i % 64], payload)
                            for i in range(lo, min(n_async, lo + BULK))]
                    await asyncio.gather(*futs)
                raw_async = n_async / (time.perf_counter() - t0)
                t0 = time.perf_counter()
                for lo in range(0, n_async, BULK):
                    await log.append_many([(log.event(data, f"m{i % 64}"), None)
                                           for i in range(lo, min(n_async, lo + BULK))])
                cf_async = n_async / (time.perf_counter() - t0)
                dur = DURABILITY[sync]
                rec = ctx.rec
                rec.add(f"append.raw.{sync}.publish.rate", raw_rate,
                        label=f"raw js.publish, awaited, sync {sync}", unit="msg/s",
                        section="4 append",
                        better="higher", durability=dur, is_baseline=True,
                        note=f"{len(payload)} B payload, no headers")
                rec.add(f"append.cflow.{sync}.append.rate", cf_rate,
                        label=f"EventLog.append, awaited, sync {sync}", unit="events/s",
                        section="4 append",
                        baseline=f"append.raw.{sync}.publish.rate", better="higher",
                        durability=dur, goals=[Goal("ratio", ">=", 0.7, ">= 0.7x raw")])
                rec.add(f"append.raw.{sync}.publish_async.rate", raw_async,
                        label=f"raw js.publish_async + gather per {BULK}, sync {sync}",
                        unit="msg/s",
                        section="4 append", better="higher", durability=dur,
                        is_baseline=True)
                rec.add(f"append.cflow.{sync}.append_many.rate", cf_async,
                        label=f"EventLog.append_many per {BULK} (event build included), "
                              f"sync {sync}",
                        unit="events/s", section="4 append",
                        baseline=f"append.raw.{sync}.publish_async.rate", better="higher",
                        durability=dur, goals=[Goal("ratio", ">=", 0.7, ">= 0.7x raw")])


# ---------------------------------------------------------------------- 6 scale


async def _claim_loop(ctx: Ctx, agent: Child, url: str, name: str, duration: float
                      ) -> list[float]:
    await agent.send({"op": "claims", "url": url, "swarm": name, "agent": "measured",
                      "duration": duration})
    await agent.recv(120)
    await agent.send("go")
    res = await agent.recv(duration + 120)
    lat: list[float] = res["latencies"]
    return lat


class Pool:
    """Ready tasks for a claim loop, topped up between runs (setup, not timed)."""

    def __init__(self, url: str, swarm: str, target: int) -> None:
        self.url = url
        self.swarm = swarm
        self.target = target
        self.left = 0

    async def top_up(self) -> None:
        if self.left >= self.target:
            return
        async with Swarm.connect(self.url, swarm=self.swarm, agent="creator") as sw:
            await create_pool(sw, self.target - self.left)
        self.left = self.target

    def used(self, claimed: int) -> None:
        self.left -= claimed
        self.target = max(self.target, int(claimed * 1.5) + 50)


LOAD_PROCS = 4  # heartbeat generator processes (1,000 simulated agents split evenly)
LOAD_NICE = 10  # their CPU priority is lowered (os.nice) so they do not outrun the claimer


async def _marks(loads: list[Child]) -> tuple[int, float]:
    """Heartbeat writes stored so far by all generators, and when they were counted."""
    total = 0
    for load in loads:
        await load.send("mark")
    for load in loads:
        total += int((await load.recv(60))["puts"])
    return total, time.perf_counter()


async def scale(ctx: Ctx) -> None:
    n_agents = 1000
    per_proc = n_agents // LOAD_PROCS
    duration = ctx.seconds(3.0, 8.0)
    reps = ctx.reps(1, 3)
    syncs = ("default",) if ctx.quick else SYNCS
    how = (f"load: {n_agents} simulated agents in {LOAD_PROCS} processes x {per_proc} "
           f"(bench.cflow_worker 'load', started with os.nice({LOAD_NICE})), each agent "
           "present (agent.present(), presence key renewed every 1 s) and holding one "
           "claimed task whose lease it renews every 1 s (lease.keep_alive): 2 writes/s "
           "per agent; the measured claimer is another (un-niced) process on the same "
           "2-core machine as the server and the generators")
    [agent] = await agents(ctx, 1)
    for sync in syncs:
        url = ctx.servers.url(sync)
        name = swarm_name("scale")
        loads: list[Child] = []
        pool = Pool(url, name, int(ctx.pick(1000, 2500)))
        try:
            for _ in range(reps):
                await pool.top_up()
                lat = await _claim_loop(ctx, agent, url, name, duration)
                pool.used(len(lat))
                ctx.rec.add(f"scale.idle.{sync}.p99", percentile(lat, 99) * 1000,
                            label=f"claim p99, idle server, sync {sync}", unit="ms",
                            section="6 scale",
                            durability=DURABILITY[sync], is_baseline=True)
            for p in range(LOAD_PROCS):
                loads.append(await ctx.children.start("bench.cflow_worker", f"load-{sync}-{p}"))
            for p, load in enumerate(loads):
                await load.send({"op": "load", "url": url, "swarm": name, "agents": per_proc,
                                 "prefix": f"sim{p}-", "period": 1.0, "nice": LOAD_NICE})
            ready = [await load.recv(300) for load in loads]
            ctx.rec.add(f"scale.load.{sync}.setup_s", max(float(r["setup_s"]) for r in ready),
                        label=f"setup: register + present + create + claim x {n_agents}, "
                              f"sync {sync}",
                        unit="s", section="6 scale", durability=DURABILITY[sync],
                        note=f"{LOAD_PROCS} processes in parallel (the slowest), niceness "
                             f"{', '.join(str(r['niceness']) for r in ready)} as they "
                             "reported it")
            await asyncio.sleep(2.0)  # let the heartbeat load reach its steady state
            puts0, t0 = await _marks(loads)
            for _ in range(reps):
                await pool.top_up()
                p0, m0 = await _marks(loads)
                lat = await _claim_loop(ctx, agent, url, name, duration)
                p1, m1 = await _marks(loads)
                pool.used(len(lat))
                ctx.rec.add(
                    f"scale.load.{sync}.p99", percentile(lat, 99) * 1000,
                    label=f"claim p99, {n_agents} agents heartbeating 1/s, sync {sync}", unit="ms",
                    section="6 scale", baseline=f"scale.idle.{sync}.p99",
                    durability=DURABILITY[sync],
                    goals=[Goal("ratio", "<=", 2.0, "at most doubles")], note=how)
                ctx.rec.add(
                    f"scale.load.{sync}.writes_during_claims", (p1 - p0) / (m1 - m0),
                    label=f"heartbeat writes/s achieved while the claimer ran, sync {sync}",
                    unit="writes/s", section="6 scale", better="higher",
                    baseline=f"scale.load.{sync}.writes_offered", durability=DURABILITY[sync],
                    note="successful presence + lease renewals (kv_put) counted in the "
                         "generators between marks around each claim run")
            puts1, t1 = await _marks(loads)
            stats = []
            for load in loads:
                await load.send("stop")
            for load in loads:
                stats.append(await load.recv(120))
            ctx.rec.add(f"scale.load.{sync}.writes_per_s", (puts1 - puts0) / (t1 - t0),
                        label=f"heartbeat writes/s achieved ({n_agents} presence + "
                              f"{n_agents} leases), sync {sync}",
                        unit="writes/s", section="6 scale", better="higher",
                        baseline=f"scale.load.{sync}.writes_offered",
                        durability=DURABILITY[sync],
                        note=f"successful renewals (kv_put) counted in the generators over "
                             f"{t1 - t0:.0f} s of measuring (claim runs and top-ups); "
                             f"{sum(s['leases_lost'] for s in stats)} leases lost, "
                             f"{sum(s['presence_lapses'] for s in stats)} presence lapses")
            ctx.rec.add(f"scale.load.{sync}.leases_lost", sum(s["leases_lost"] for s in stats),
                        label=f"leases lost by the {n_agents} heartbeating holders, sync {sync}",
                        unit="count", section="6 scale", durability=DURABILITY[sync],
                        goals=[Goal("value", "<=", 0, "must be 0")],
                        note="a holder renewing every 1 s with a 3 s TTL must never lose it "
                             "(also checks that the in-memory leases bucket writes no expiry "
                             "marker for a key being renewed); why: "
                             + json.dumps(sum((Counter(s.get("lost_reasons") or {})
                                               for s in stats), Counter())))
            ctx.rec.add(f"scale.load.{sync}.writes_offered", 2.0 * n_agents,
                        label="heartbeat writes/s offered", unit="writes/s",
                        section="6 scale", is_baseline=True, better="higher")
        finally:
            await ctx.children.stop(loads)
        await reset_agents(ctx)


# -------------------------------------------------------------------- 8 cluster


async def cluster(ctx: Ctx) -> None:
    urls = await ctx.servers.cluster_urls()
    reps = ctx.reps(2, 5)
    n = int(ctx.pick(200, 1000))
    n_claims = int(ctx.pick(40, 200))
    dur = "3-node cluster on one machine, default sync"
    for r in ("r1", "r3"):
        replicas = 3 if r == "r3" else 1
        name = swarm_name(f"cl{r}")
        async with Swarm.connect(urls, swarm=name, agent=f"cl-{r}", replicas=replicas) as sw:
            data = ev.TaskNoted(task_id="t" * 36, text="progress " * 8)
            for _ in range(reps):
                t0 = time.perf_counter()
                for i in range(n):
                    await sw.log.append(data, f"n{i % 64}")
                rate = n / (time.perf_counter() - t0)
                await create_pool(sw, n_claims)
                await sw.tasks.ensure_board()
                lat = []
                for _ in range(n_claims):
                    t0 = time.perf_counter()
                    lease = await sw.tasks.claim(wait=5)
                    assert lease is not None
                    await lease.complete("ok")
                    lat.append(time.perf_counter() - t0)
                base = "cluster.r1." if r == "r3" else None
                ctx.rec.add(f"cluster.{r}.append.rate", rate,
                            label=f"EventLog.append awaited, {r.upper()}", unit="events/s",
                            section="8 cluster", better="higher", durability=dur,
                            baseline=base + "append.rate" if base else None,
                            is_baseline=base is None,
                            note="CPU-bound: all three servers share the 2 cores")
                ctx.rec.add(f"cluster.{r}.claim_complete.p50", percentile(lat, 50) * 1000,
                            label=f"claim + complete p50, {r.upper()}", unit="ms",
                            section="8 cluster", durability=dur,
                            baseline=base + "claim_complete.p50" if base else None,
                            is_baseline=base is None,
                            note="CPU-bound: all three servers share the 2 cores")
