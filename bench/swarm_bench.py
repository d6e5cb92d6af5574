"""Swarm-shaped figures of issue 15: a big swarm, and mixed capabilities.

9 bigswarm: N ready tasks (1k, 10k, 100k; bulk-loaded, see :mod:`bench.bulk`)
and 64 agents (8 fresh processes x 8 agents, each its own ``Swarm.connect``)
starting together; then one more fresh agent process joins. Time from connecting
to the first claim, and the RSS of the processes after claiming, against N
(baseline: the same figure at 1k tasks).

10 mixed: tasks needing different capability sets at different priorities,
agents with different capability sets draining them, while urgent tasks arrive;
from what each agent claimed and from the event log: claims by an agent lacking
the capabilities, agents that starved, claimable tasks left behind, priority
inversions, and how long an urgent arrival waited while lower-priority work was
being claimed.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Collection
from typing import Any

from bench.bulk import load_tasks
from bench.cflow_bench import agents as agent_procs
from bench.cflow_bench import holder_violations, progress, swarm_name
from bench.cflow_worker import rss_kb
from bench.context import Ctx
from bench.procs import Child
from bench.servers import DURABILITY
from bench.stats import Goal, percentile
from cflow import events as ev
from cflow.streams import StoredEvent, names
from cflow.swarm import Swarm

# ------------------------------------------------------------------- 9 bigswarm

PROCS, PER_PROC = 8, 8  # 64 agents on a 2-core machine: 8 processes x 8 connections
SIZES_QUICK = (1_000, 10_000)
SIZES_FULL = (1_000, 10_000, 100_000)


def size_label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


async def _start_agents(ctx: Ctx, url: str, name: str, tag: str, procs: int, per_proc: int
                        ) -> list[Child]:
    """Fresh agent processes, each ready (imports done) to run ``per_proc`` agents."""
    children = [await ctx.children.start("bench.cflow_worker", f"{tag}-p{p}")
                for p in range(procs)]
    for p, child in enumerate(children):
        await child.send({"op": "agents", "mode": "first", "url": url, "swarm": name,
                          "wait": 30,
                          "agents": [{"name": f"{tag}-p{p}-a{a}"} for a in range(per_proc)]})
    for child in children:
        await child.recv(120)  # ready
    return children


async def _go(children: list[Child]) -> list[dict[str, Any]]:
    for child in children:
        await child.send("go")
    out = []
    for child in children:
        res = await child.recv(120)
        res["vm_rss_kb"] = rss_kb(child.pid)  # read by the parent, after claiming
        out.append(res)
    return out


def _first_claims(results: list[dict[str, Any]]) -> list[float]:
    times = []
    for res in results:
        for agent in res["agents"]:
            if agent["task_id"] is None:
                raise RuntimeError(f"{agent['name']} claimed nothing within its wait")
            times.append(agent["first_claim_s"])
    return times


async def bigswarm(ctx: Ctx) -> None:
    sizes = SIZES_QUICK if ctx.quick else SIZES_FULL
    reps = ctx.reps(1, 3)
    sync = "default"
    url = ctx.servers.url(sync)
    dur = DURABILITY[sync]
    base = size_label(sizes[0])
    rec = ctx.rec
    for n in sizes:
        label = size_label(n)
        name = swarm_name("big")
        async with Swarm.connect(url, swarm=name, agent="loader") as sw:
            t0 = time.perf_counter()
            await load_tasks(sw, (ev.TaskCreated(title=f"big {i}", priority=i % 5)
                                  for i in range(n)))
            load_s = time.perf_counter() - t0
        progress(f"loaded {n} tasks + offers in {load_s:.1f} s")
        rec.add(f"bigswarm.load_s.n{label}", load_s,
                label=f"setup: bulk-load {n:,} tasks + offers", unit="s",
                section="9 bigswarm", durability=dur,
                note="bench.bulk: TaskCreated through EventLog.append_many and offers "
                     "published with gathered acks, 1,000 per ack wait")
        for r in range(reps):
            tag = f"big{label}r{r}"
            swarm64: list[Child] = []
            joiner: list[Child] = []
            try:
                swarm64 = await _start_agents(ctx, url, name, tag, PROCS, PER_PROC)
                res64 = await _go(swarm64)
                joiner = await _start_agents(ctx, url, name, f"{tag}-join", 1, 1)
                [res1] = await _go(joiner)
                await joiner[0].send({"op": "board", "url": url, "swarm": name,
                                      "agent": f"{tag}-join-folder"})
                folded = await joiner[0].recv(300)
                folded["vm_rss_kb"] = rss_kb(joiner[0].pid)
            finally:
                await ctx.children.stop(swarm64 + joiner)
            first64 = _first_claims(res64)
            [first1] = _first_claims([res1])
            rss64 = [res["vm_rss_kb"] / 1024 for res in res64]
            connect64 = [a["connect_s"] for res in res64 for a in res["agents"]]

            def baseline(key: str, label: str = label) -> str | None:
                return key.replace(f".n{label}", f".n{base}") if label != base else None

            key = f"bigswarm.joiner.first_claim.n{label}"
            rec.add(key, first1 * 1000,
                    label=f"joining agent process: connect -> first claim, {n:,} tasks",
                    unit="ms", section="9 bigswarm", durability=dur, baseline=baseline(key),
                    is_baseline=label == base, goals=[Goal("value", "<=", 1000.0, "<= 1 s")],
                    note="a fresh worker process (imports done) connects while 64 agents "
                         "hold tasks; from the start of Swarm.connect to claim() returning")
            key = f"bigswarm.joiner.rss.n{label}"
            rec.add(key, res1["vm_rss_kb"] / 1024,
                    label=f"joining agent process: RSS after its claim, {n:,} tasks",
                    unit="MB", section="9 bigswarm", baseline=baseline(key),
                    is_baseline=label == base,
                    goals=[Goal("ratio", "<=", 1.1, "flat: <= 1.1x the 1k value")]
                    if label != base else [],
                    note=f"VmRSS from /proc/<pid>/status, read by the runner; one agent "
                         f"(one connection); before connecting it was "
                         f"{res1['rss_kb'] / 1024:.1f} MB, peak {res1['maxrss_kb'] / 1024:.1f} MB")
            key = f"bigswarm.contrast.board_rss.n{label}"
            rec.add(key, folded["vm_rss_kb"] / 1024,
                    label=f"contrast: the joiner after folding the whole board, {n:,} tasks",
                    unit="MB", section="9 bigswarm", baseline=f"bigswarm.joiner.rss.n{label}",
                    note=f"ensure_board() (every task event, what each claimer did before "
                         f"work offers) took {folded['fold_s']:.1f} s for "
                         f"{folded['tasks']:,} tasks; shows the RSS figures can see growth")
            for q, value in (("p50", percentile(first64, 50)), ("max", max(first64))):
                key = f"bigswarm.swarm64.first_claim_{q}.n{label}"
                rec.add(key, value * 1000,
                        label=f"64 agents starting together: connect -> first claim {q}, "
                              f"{n:,} tasks",
                        unit="ms", section="9 bigswarm", durability=dur,
                        baseline=baseline(key), is_baseline=label == base,
                        goals=[Goal("value", "<=", 1000.0, "<= 1 s")] if q == "max" else [],
                        note=f"{PROCS} fresh processes x {PER_PROC} agents (each its own "
                             "Swarm.connect), released by one 'go' line: 64 connects and "
                             "claims at once on 2 cores; of which Swarm.connect p50 "
                             f"{percentile(connect64, 50) * 1000:.0f} ms")
            key = f"bigswarm.swarm64.rss.n{label}"
            rec.add(key, percentile(rss64, 50),
                    label=f"agent process with {PER_PROC} agents: RSS after claiming, "
                          f"{n:,} tasks",
                    unit="MB", section="9 bigswarm", baseline=baseline(key),
                    is_baseline=label == base,
                    goals=[Goal("ratio", "<=", 1.1, "flat: <= 1.1x the 1k value")]
                    if label != base else [],
                    note=f"median over the {PROCS} processes (range "
                         f"{min(rss64):.1f}-{max(rss64):.1f} MB), each holding {PER_PROC} "
                         "leases with keep_alive")
            progress(f"{label}: joiner first claim {first1 * 1000:.0f} ms, "
                     f"rss {res1['vm_rss_kb'] / 1024:.1f} MB; 64 agents p50 "
                     f"{percentile(first64, 50) * 1000:.0f} ms max {max(first64) * 1000:.0f} ms "
                     f"(connect p50 {percentile(connect64, 50) * 1000:.0f} ms)")


# ---------------------------------------------------------------------- 10 mixed

# Capability sets of tasks and agents. Nobody can do "docker" work: it must stay.
TASK_SETS: tuple[tuple[str, ...], ...] = ((), ("py",), ("gpu",), ("gpu", "py"), ("docker",))
AGENT_SETS: tuple[tuple[str, ...], ...] = ((), ("py",), ("gpu",), ("gpu", "py"))
PRIORITIES = (0, 1, 2, 3)
LATE_MS = 1000  # a higher-priority task still unclaimed this long after: left behind
ARRIVAL_PRIORITY = 9  # urgent work created while the agents drain the pool
ARRIVALS_AFTER_S = 0.2
ARRIVAL_SPACING_S = 0.025


def set_name(caps: tuple[str, ...] | list[str]) -> str:
    return "+".join(sorted(caps)) or "any"


def inversions(items: list[Any], tasks: dict[str, tuple[frozenset[str], int]],
               agent_caps: dict[str, frozenset[str]],
               among: Collection[str] | None = None) -> dict[str, int]:
    """Priority inversions from the task event log, in stream order.

    At each ``TaskClaimed`` of a task of priority p, was a task of higher priority
    ready (created, not yet claimed) that the claimer could have taken: of the
    same capability set (``same_set``), or of any set the claimer covers
    (``covered``)? ``*_late`` counts only those whose higher-priority task was
    still unclaimed ``LATE_MS`` (server time) after the lower one's claim: work
    left behind, not an offer that was already in another claimer's hands.
    Tasks not in ``tasks`` are ignored; with ``among``, only those tasks count as
    the waiting higher-priority work.
    """
    claims = [item for item in items if isinstance(item, StoredEvent)
              and isinstance(item.event.data, ev.TaskClaimed)]
    claimed_ms = {item.event.entity_id: item.time_ms for item in claims}
    ready: dict[tuple[frozenset[str], int], set[str]] = {}
    out = Counter({"same_set": 0, "covered": 0, "same_set_late": 0, "covered_late": 0})
    for item in items:
        if not isinstance(item, StoredEvent):
            continue
        tid = item.event.entity_id
        data = item.event.data
        if tid not in tasks:
            continue
        caps, prio = tasks[tid]
        if isinstance(data, ev.TaskCreated):
            ready.setdefault((caps, prio), set()).add(tid)
        elif isinstance(data, ev.TaskClaimed):
            ready.get((caps, prio), set()).discard(tid)
            mine = agent_caps.get(data.owner, frozenset())
            late_at = (item.time_ms or 0) + LATE_MS
            found = {"same_set": False, "covered": False,
                     "same_set_late": False, "covered_late": False}
            for (other_caps, other_prio), waiting in ready.items():
                ids = waiting if among is None else waiting & set(among)
                if other_prio <= prio or not ids or not other_caps <= mine:
                    continue
                late = any((claimed_ms.get(u) or math.inf) > late_at for u in ids)
                found["covered"] = True
                found["covered_late"] |= late
                if other_caps == caps:
                    found["same_set"] = True
                    found["same_set_late"] |= late
            out.update({k: int(v) for k, v in found.items()})
    return dict(out)


async def _arrive(url: str, name: str, n: int, spacing_s: float
                  ) -> list[tuple[str, tuple[str, ...]]]:
    """Urgent tasks created one by one (public ``create``) while the agents are busy."""
    out = []
    async with Swarm.connect(url, swarm=name, agent="arrivals", ensure=False) as sw:
        await asyncio.sleep(ARRIVALS_AFTER_S)
        for i in range(n):
            caps = AGENT_SETS[i % len(AGENT_SETS)]
            state = await sw.tasks.create(f"urgent {i}", priority=ARRIVAL_PRIORITY,
                                          capabilities=caps)
            out.append((state.task_id, caps))
            await asyncio.sleep(spacing_s)
    return out


async def mixed(ctx: Ctx) -> None:
    rec = ctx.rec
    per_cell = int(ctx.pick(30, 100))  # tasks per (capability set, priority)
    n_arrivals = int(ctx.pick(8, 24))
    reps = ctx.reps(1, 3)
    procs = 2  # processes, each running one agent of every set in AGENT_SETS
    sync = "default"
    url = ctx.servers.url(sync)
    dur = DURABILITY[sync]
    workers = await agent_procs(ctx, procs)
    for _ in range(reps):
        name = swarm_name("mixed")
        cells = [(caps, p) for caps in TASK_SETS for p in PRIORITIES for _ in range(per_cell)]
        random.shuffle(cells)  # creation order says nothing about priority
        async with Swarm.connect(url, swarm=name, agent="loader") as sw:
            states = await load_tasks(sw, (ev.TaskCreated(title=f"mixed {i}", priority=p,
                                                          capabilities=caps)
                                           for i, (caps, p) in enumerate(cells)))
        tasks = {s.task_id: (frozenset(s.capabilities), s.priority) for s in states}
        specs = [[{"name": f"w{w}-{set_name(caps)}", "caps": list(caps)} for caps in AGENT_SETS]
                 for w in range(procs)]
        agent_caps = {a["name"]: frozenset(a["caps"]) for group in specs for a in group}
        for worker, group in zip(workers, specs, strict=True):
            await worker.send({"op": "agents", "mode": "drain", "url": url, "swarm": name,
                               "idle": 0.5, "agents": group})
        for worker in workers:
            await worker.recv(120)
        for worker in workers:
            await worker.send("go")
        arriving = asyncio.create_task(_arrive(url, name, n_arrivals, ARRIVAL_SPACING_S))
        try:
            results = [await worker.recv(300) for worker in workers]
        finally:
            arrived = await arriving
        # until the last completion (not the final idle wait)
        elapsed = max(a["busy_s"] for res in results for a in res["agents"])
        for worker in workers:  # close the 8 connections
            await worker.send({"op": "reset"})
            await worker.recv()
        urgent = {tid: (frozenset(caps), ARRIVAL_PRIORITY) for tid, caps in arrived}
        every = {**tasks, **urgent}
        claimed = {a["name"]: a["claimed"] for res in results for a in res["agents"]}
        errors = sum(a["errors"] for res in results for a in res["agents"])
        violations = sum(1 for agent, ids in claimed.items() for t in ids
                         if not every[t][0] <= agent_caps[agent])
        taken = {t for ids in claimed.values() for t in ids}
        claimable = {t for t, (caps, _) in every.items()
                     if any(caps <= c for c in agent_caps.values())}
        left = len(claimable - taken)
        starved = [agent for agent, ids in claimed.items() if not ids
                   and any(caps <= agent_caps[agent] for caps, _ in every.values())]
        async with Swarm.connect(url, swarm=name, agent="checker", ensure=False) as sw:
            items = await sw.log.read(names.events_filter(name, "task"))
        inv = inversions(items, tasks, agent_caps)
        bypassed = inversions(items, every, agent_caps, among=set(urgent))["covered"]
        stamps: dict[str, dict[str, int]] = {}
        for item in items:
            if isinstance(item, StoredEvent) and item.event.entity_id in urgent:
                kind = type(item.event.data).__name__
                stamps.setdefault(item.event.entity_id, {}).setdefault(kind, item.time_ms)
        # Only arrivals created while pool work was still being claimed: the agents busy.
        pool_busy_until = max(item.time_ms for item in items if isinstance(item, StoredEvent)
                              and item.event.entity_id in tasks
                              and isinstance(item.event.data, ev.TaskClaimed))
        waits = [(st["TaskClaimed"] - st["TaskCreated"]) for st in stamps.values()
                 if "TaskClaimed" in st and st.get("TaskCreated", math.inf) < pool_busy_until]
        which = f"the {len(waits)} arrivals created before the last claim of pool work"
        if not waits:  # the pool drained before the first arrival: a far faster machine
            waits = [(st["TaskClaimed"] - st["TaskCreated"]) for st in stamps.values()
                     if "TaskClaimed" in st and "TaskCreated" in st]
            which = "all arrivals: the pool drained before any arrived (agents idle)"
        doubles = holder_violations(items)
        n_claims = sum(len(ids) for ids in claimed.values())
        progress(f"mixed: {n_claims} claims in {elapsed:.1f} s, {violations} capability "
                 f"violations, {len(starved)} starved, {left} left, inversions {inv}, "
                 f"arrivals waited p50 {percentile(waits, 50):.0f} ms max "
                 f"{max(waits, default=math.nan):.0f} ms, bypassed by {bypassed} claims, "
                 f"{errors} errors")
        must0 = [Goal("value", "<=", 0, "must be 0")]
        setup = (f"{len(tasks)} tasks: {per_cell} per (capability set, priority) for sets "
                 f"{', '.join(set_name(c) for c in TASK_SETS)} x priorities "
                 f"{PRIORITIES[0]}-{PRIORITIES[-1]}, created in random order; "
                 f"{len(agent_caps)} agents ({procs} of each set "
                 f"{', '.join(set_name(c) for c in AGENT_SETS)}; {procs} processes) claim + "
                 "complete until no offer for 0.5 s; nobody can do 'docker'; "
                 f"{len(urgent)} urgent tasks arrive meanwhile (below)")
        rec.add("mixed.claims", n_claims, label="claims made", unit="count",
                section="10 mixed", durability=dur, is_baseline=True, better="higher",
                note=setup)
        rec.add("mixed.claims_per_s", n_claims / elapsed, label="claims/s, mixed run",
                unit="claims/s", section="10 mixed", durability=dur, better="higher",
                note="from 'go' to the last completion")
        rec.add("mixed.capability_violations", violations,
                label="claims by an agent lacking the task's capabilities", unit="count",
                section="10 mixed", durability=dur, goals=must0,
                note="from what each agent's claim() returned")
        rec.add("mixed.starved_agents", len(starved),
                label="agents with eligible work that claimed none", unit="count",
                section="10 mixed", durability=dur, goals=must0,
                note=f"starved: {', '.join(starved) or 'none'}")
        rec.add("mixed.left_claimable", left,
                label="tasks some agent could do, left unclaimed", unit="count",
                section="10 mixed", durability=dur, goals=must0)
        rec.add("mixed.double_claims", doubles["double_claims"],
                label="double claims in the event log", unit="count", section="10 mixed",
                durability=dur, goals=must0)
        for kind, text in (("same_set", "of the same capability set"),
                           ("covered", "of any set the claimer covers")):
            rec.add(f"mixed.inversions.{kind}", inv[kind],
                    label=f"priority inversions, higher-priority task {text} ready",
                    unit="claims", section="10 mixed", durability=dur, baseline="mixed.claims",
                    note="event log: a TaskClaimed of priority p while a task of priority > p "
                         f"{text} was created and not yet claimed; includes offers already "
                         "fetched by another claimer whose TaskClaimed was not yet written "
                         "(a band boundary race, up to one per busy agent)")
            rec.add(f"mixed.inversions.{kind}_late", inv[f"{kind}_late"],
                    label=f"priority inversions {text}, higher task left >= {LATE_MS} ms",
                    unit="claims", section="10 mixed", durability=dur,
                    baseline="mixed.claims", goals=must0,
                    note=f"as above, counted only when the higher-priority task was still "
                         f"unclaimed {LATE_MS} ms (server time) after the lower one's claim")
        arrivals_how = (f"{len(urgent)} tasks of priority {ARRIVAL_PRIORITY} (above the whole "
                        f"pool), one per {ARRIVAL_SPACING_S * 1000:.0f} ms from "
                        f"{ARRIVALS_AFTER_S:g} s after the start, capability sets in turn "
                        f"{', '.join(set_name(c) for c in AGENT_SETS)}, created through "
                        "swarm.tasks.create while the agents drain the pool")
        rec.add("mixed.cycle_ms", elapsed * len(agent_caps) / max(1, n_claims) * 1000,
                label="one agent's claim + complete cycle, mean over the run", unit="ms",
                section="10 mixed", durability=dur, is_baseline=True,
                note="run time x agents / claims: about how long a new top-priority task "
                     "should wait for the next agent to be free")
        for q, value in (("p50", percentile(waits, 50)), ("max", max(waits, default=math.nan))):
            rec.add(f"mixed.arrivals.wait_{q}", value,
                    label=f"urgent task arriving while agents are busy: created -> claimed {q}",
                    unit="ms", section="10 mixed", durability=dur, baseline="mixed.cycle_ms",
                    note=arrivals_how + "; server timestamps of its TaskCreated and "
                         f"TaskClaimed; {which}")
        rec.add("mixed.arrivals.bypassed", bypassed,
                label="claims of lower-priority work while an urgent task the claimer "
                      "could do waited",
                unit="claims", section="10 mixed", durability=dur, baseline="mixed.claims",
                note="event log, as the inversions above, with the arrivals as the waiting "
                     "higher-priority work; a busy claimer sees a band that was empty only "
                     "when it looks again at which subjects hold offers")
        for agent, ids in sorted(claimed.items()):
            by_set = Counter(set_name(sorted(every[t][0])) for t in ids)
            by_prio = Counter(every[t][1] for t in ids)
            rec.add(f"mixed.agent.{agent}", len(ids), label=f"tasks claimed by {agent}",
                    unit="tasks", section="10 mixed", durability=dur, better="higher",
                    note="by task set: " + ", ".join(f"{k} {v}" for k, v in
                                                     sorted(by_set.items()))
                         + "; by priority: " + ", ".join(f"p{k} {v}" for k, v in
                                                         sorted(by_prio.items())))
