"""Adversarial soak of the claim path on one nats-server (not collected by pytest).

    uv run python tests/soak_single.py --minutes 10 --seed 7

Starts its own nats-server (:class:`faults.RestartableServer`, ``sync=always``)
on a free port with a temporary store, a handful of real ``cfctl worker``
processes, each through its own :class:`faults.Proxy`, whose ``--exec`` is the
execution recorder (:class:`faults.ExecutionLog`: start/end/dead lines on the
machine's monotonic clock), and keeps a few hundred mixed tasks flowing: short
(2-3 s) and longer lease TTLs, forced failures with few attempts, dependencies,
priorities and capabilities. Meanwhile a fault loop, every few seconds:

- kill -9 a worker and start a replacement;
- black-holes a worker's proxy for longer than its tasks' TTL, then heals it;
- cuts a proxy's connections; takes a proxy down for a while;
- delays a proxy by 200 ms for a while;
- kill -9 the server and restarts it (same port and store);
- SIGSTOPs a worker for longer than a TTL, then SIGCONTs it;
- replaces a worker by one whose clock is 2 minutes ahead or behind (libfaketime).

Then the faults stop, everything is healed and the swarm drains (bounded wait),
and the promises of DESIGN.md are checked from the real executions and the log:

a. no two executions of one task were live at the same time (an execution is
   live until its ``end`` or ``dead`` line), beyond ``--slack`` seconds (the
   time it takes to kill a process). That holds for a holder SIGSTOPped while
   its child runs too: the worker's watcher process kills the child by the
   lease's kill-by time, frozen worker or not (whatever the worker reports
   after SIGCONT is refused: checked under d);
b. every task completed exactly once, or ended failed after its max attempts
   with a final failure that its executions explain;
c. no task left claimed, ready, expired or pending once the faults stopped;
d. every accepted completion (and failure) comes from an execution that really
   ran under that claim (same epoch and agent) and ended the way it reports;
   every execution ran under a claim of that agent, and no claim ran twice.

Prints a one-line verdict (and details on violation); exit status 1 on violation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cflow import events as ev
from cflow.errors import CflowError
from cflow.streams import StoredEvent
from cflow.swarm import Swarm
from faults import (
    Execution,
    ExecutionLog,
    Proxy,
    RestartableServer,
    WorkerProcess,
    by_task,
    faketime_library,
    skewed_env,
    task_events,
    timeline,
)

SHORT_TTLS = (2.0, 3.0)
LONG_TTL = 6.0
MAX_TTL = LONG_TTL


@dataclass
class Slot:
    """One place in the fleet: a worker (replaced when killed) and its proxy."""

    index: int
    proxy: Proxy
    capabilities: tuple[str, ...]
    lease_ttl: float | None
    concurrency: int
    worker: WorkerProcess | None = None
    generation: int = 0
    busy: bool = False  # a fault is in progress on it
    skew_s: float = 0.0

    @property
    def ttl(self) -> float:
        """Longest lease TTL of the tasks this worker can take."""
        return MAX_TTL


@dataclass
class Soak:
    args: argparse.Namespace
    root: Path
    rng: random.Random
    server: RestartableServer
    log: ExecutionLog
    env: dict[str, str]
    slots: list[Slot] = field(default_factory=list)
    faults: list[tuple[float, str]] = field(default_factory=list)  # (mono, what)
    paused: dict[str, list[tuple[float, float | None]]] = field(default_factory=dict)
    killed_workers: list[str] = field(default_factory=list)
    fault_counts: Counter[str] = field(default_factory=Counter)
    created: dict[str, dict[str, Any]] = field(default_factory=dict)
    background: set[asyncio.Task[None]] = field(default_factory=set)
    server_down: bool = False

    def note(self, what: str) -> None:
        now = time.monotonic()
        self.faults.append((now, what))
        if self.args.verbose:
            print(f"[{now - T0:7.1f}] {what}", flush=True)

    # ---------------------------------------------------------------- workers

    def start_worker(self, slot: Slot, skew_s: float = 0.0) -> None:
        slot.generation += 1
        name = f"w{slot.index}g{slot.generation}"
        env = {**self.env, "CFLOW_URL": slot.proxy.url}
        if skew_s:
            env = skewed_env(env, skew_s)
        slot.skew_s = skew_s
        slot.worker = WorkerProcess(
            name, env, self.log.command(1.0), self.root, concurrency=slot.concurrency,
            lease_ttl=slot.lease_ttl, capabilities=slot.capabilities, drain_grace=1.0).start()

    def stop_all(self) -> None:
        for slot in self.slots:
            w = slot.worker
            if w is not None and w.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGCONT)
                w.terminate()
        for slot in self.slots:
            if slot.worker is not None:
                slot.worker.stop(15)
        self.log.kill_running()

    # ----------------------------------------------------------------- faults

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def idle_slot(self) -> Slot | None:
        free = [s for s in self.slots if not s.busy]
        return self.rng.choice(free) if free else None

    async def fault(self) -> None:
        kinds = ["kill9", "blackhole", "cut", "down", "delay", "sigstop", "server",
                 "blackhole-at-start", "blackhole-at-end"]
        weights = [3, 3, 2, 1, 2, 3, 1, 2, 2]
        if faketime_library() is not None:
            kinds.append("skew")
            weights.append(1)
        kind = self.rng.choices(kinds, weights)[0]
        if kind == "server":
            if self.server_down:
                return
            self.spawn(self.server_outage())
            return
        slot = self.idle_slot()
        if slot is None or slot.worker is None:
            return
        self.fault_counts[kind] += 1
        slot.busy = True
        self.spawn(self.on_slot(kind, slot))

    async def on_slot(self, kind: str, slot: Slot) -> None:
        w = slot.worker
        assert w is not None
        try:
            if kind == "kill9":
                self.note(f"kill -9 {w.name}")
                w.kill9()
                self.killed_workers.append(w.name)
                await asyncio.sleep(self.rng.uniform(0.0, 2.0))
                self.start_worker(slot, slot.skew_s)
                self.note(f"started {slot.worker.name if slot.worker else '?'}")
            elif kind == "skew":
                offset = self.rng.choice((-120.0, 120.0))
                self.note(f"kill -9 {w.name}, replaced by one skewed {offset:+.0f} s")
                w.kill9()
                self.killed_workers.append(w.name)
                self.start_worker(slot, offset)
                self.note(f"started {slot.worker.name if slot.worker else '?'} skewed")
            elif kind in ("blackhole", "down", "blackhole-at-start", "blackhole-at-end"):
                hold = slot.ttl + self.rng.uniform(0.5, 4.0)
                if kind != "down" and kind != "blackhole":
                    # Right after one of its executions starts (the claim's follow-up
                    # writes) or ends (the completion write): poll the recorder's log.
                    word = "start" if kind.endswith("start") else "end"
                    pids = {e.pid for e in self.log.executions() if e.agent == w.name}
                    seen = len(self.log.lines())
                    deadline = time.monotonic() + 10
                    hit = False
                    while not hit and time.monotonic() < deadline:
                        await asyncio.sleep(0.01)
                        fresh = self.log.lines()[seen:]
                        seen += len(fresh)
                        for line in fresh:
                            parts = line.split()
                            if parts[0] == "start" and parts[-1] == w.name:
                                pids.add(int(parts[2]))
                                hit = word == "start"
                            elif parts[0] == word and len(parts) > 2 and int(parts[2]) in pids:
                                hit = True
                    if not hit:
                        return
                    kind = "blackhole"
                self.note(f"{kind} proxy of {w.name} for {hold:.1f} s")
                getattr(slot.proxy, kind)()  # blackhole or down
                await asyncio.sleep(hold)
                slot.proxy.heal()
                self.note(f"healed proxy of {w.name}")
            elif kind == "cut":
                self.note(f"cut proxy of {w.name}")
                slot.proxy.cut()
            elif kind == "delay":
                hold = self.rng.uniform(3.0, 12.0)
                self.note(f"delay 200 ms proxy of {w.name} for {hold:.1f} s")
                slot.proxy.delay(200)
                await asyncio.sleep(hold)
                slot.proxy.heal()
                self.note(f"healed proxy of {w.name}")
            elif kind == "sigstop":
                hold = self.rng.choice(SHORT_TTLS) + self.rng.uniform(0.5, 6.0)
                if not w.alive:
                    return
                self.note(f"SIGSTOP {w.name} for {hold:.1f} s")
                stopped = time.monotonic()
                os.kill(w.pid, signal.SIGSTOP)
                span: tuple[float, float | None] = (stopped, None)
                self.paused.setdefault(w.name, []).append(span)
                try:
                    await asyncio.sleep(hold)
                finally:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.pid, signal.SIGCONT)
                    self.paused[w.name][-1] = (stopped, time.monotonic())
                self.note(f"SIGCONT {w.name}")
        finally:
            slot.busy = False

    async def server_outage(self) -> None:
        self.server_down = True
        self.fault_counts["server"] += 1
        try:
            outage = self.rng.choice((0.5, 1.5, MAX_TTL + 1.0))
            self.note(f"kill -9 nats-server for {outage:.1f} s")
            self.server.kill9()
            await asyncio.sleep(outage)
            await asyncio.to_thread(self.server.restart)
            self.note("nats-server restarted")
        finally:
            self.server_down = False

    # ------------------------------------------------------------------ tasks

    async def create_task(self, s: Swarm, n: int) -> None:
        rng = self.rng
        seconds = round(rng.uniform(0.1, 3.0), 2)
        roll = rng.random()
        opts: dict[str, Any] = {"priority": rng.randint(0, 5), "backoff_initial_s": 0.2,
                                "backoff_max_s": 1.0, "max_attempts": 30}
        fail_attempts = 0
        if roll < 0.35:
            opts["lease_ttl_s"] = rng.choice(SHORT_TTLS)
            opts["capabilities"] = ["fast"]
        else:
            opts["lease_ttl_s"] = LONG_TTL
            if rng.random() < 0.2:
                opts["capabilities"] = ["gpu"]
        if rng.random() < 0.15:  # fails on purpose: some recover, some run out of attempts
            opts["max_attempts"] = rng.choice((2, 3))
            fail_attempts = rng.choice((1, 5))
        elif rng.random() < 0.2 and self.created:
            candidates = [t for t, c in self.created.items() if c["fail_attempts"] == 0]
            if candidates:
                opts["depends_on"] = rng.sample(candidates, min(len(candidates),
                                                                rng.choice((1, 2))))
        body = ExecutionLog.body(seconds, fail_attempts)
        for _ in range(60):
            try:
                t = await s.tasks.create(f"soak {n}", body=body, request_id=f"soak-{n}",
                                         **opts)
                break
            except CflowError as exc:  # the server is away: try again
                if self.args.verbose:
                    print(f"create {n}: {exc}", flush=True)
                await asyncio.sleep(0.5)
        else:
            raise RuntimeError(f"could not create task {n}")
        self.created[t.task_id] = {"fail_attempts": fail_attempts, **opts}


T0 = time.monotonic()


async def wait_live(s: Swarm, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            await s.tasks.list(limit=1)
            return
        except CflowError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def terminal_states(s: Swarm, ids: list[str]) -> dict[str, str]:
    """Status per task, read from the log (not a projection)."""
    out = {}
    for items in by_task(await task_events(s.log)).items():
        task_id, evs = items
        out[task_id] = status_of(evs)
    return {t: out.get(t, "absent") for t in ids}


def status_of(evs: list[StoredEvent]) -> str:
    last = evs[-1].event.data
    if isinstance(last, ev.TaskCompleted):
        return "completed"
    if isinstance(last, ev.TaskFailed) and last.final:
        return "failed"
    if isinstance(last, ev.TaskCancelled):
        return "cancelled"
    return type(last).__name__


async def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix=f"soak{args.seed}-"))
    swarm_name = f"soak{uuid.uuid4().hex[:8]}"
    server = RestartableServer(root / "nats", name="soak")
    log = ExecutionLog(root)
    env = {**os.environ, "CFLOW_SWARM": swarm_name, "XDG_DATA_HOME": str(root)}
    soak = Soak(args, root, rng, server, log, env)
    print(f"soak seed={args.seed} minutes={args.minutes} dir={root}", flush=True)
    server.start()
    env["CFLOW_URL"] = server.url
    verdict = 2
    try:
        configs = [(("fast",), 2.0, 2), (("fast", "gpu"), 2.0, 1), ((), None, 2),
                   (("gpu",), None, 1), ((), None, 2)][:args.workers]
        for i, (caps, lt, conc) in enumerate(configs, start=1):
            proxy = Proxy(server.url, name=f"p{i}").start()
            soak.slots.append(Slot(i, proxy, caps, lt, conc))
        async with Swarm.connect(server.url, swarm=swarm_name, agent="soak") as s:
            for slot in soak.slots:
                soak.start_worker(slot)
            await asyncio.gather(*(slot.worker.wait_ready(60) for slot in soak.slots
                                   if slot.worker is not None))
            n = 0
            for _ in range(args.initial):
                await soak.create_task(s, n)
                n += 1
            end = time.monotonic() + args.minutes * 60
            next_fault = time.monotonic() + rng.uniform(2, 5)
            while time.monotonic() < end:
                # keep a backlog of about --backlog tasks that are not finished
                try:
                    states = await terminal_states(s, list(soak.created))
                    open_ = sum(1 for v in states.values() if v not in ("completed", "failed"))
                    while open_ < args.backlog and n < args.max_tasks:
                        await soak.create_task(s, n)
                        n += 1
                        open_ += 1
                except CflowError:
                    pass
                if time.monotonic() >= next_fault:
                    await soak.fault()
                    next_fault = time.monotonic() + rng.uniform(2, 6)
                await asyncio.sleep(1.0)
            soak.note("faults stop")
            for task in list(soak.background):
                await task  # every fault ends with its heal
            for slot in soak.slots:
                slot.proxy.heal()
                if slot.worker is None or not slot.worker.alive:
                    soak.start_worker(slot)
            healed = time.monotonic()
            await wait_live(s, 60)
            ids = list(soak.created)
            drain_s = args.drain
            states: dict[str, str] = {}
            while time.monotonic() < healed + drain_s:
                try:
                    states = await terminal_states(s, ids)
                except CflowError:
                    await asyncio.sleep(1)
                    continue
                if all(v in ("completed", "failed") for v in states.values()):
                    break
                await asyncio.sleep(1.0)
            drained_after = time.monotonic() - healed
            soak.stop_all()
            items = await task_events(s.log)
            verdict = check(soak, items, ids, drained_after)
    finally:
        for task in list(soak.background):
            task.cancel()
        soak.stop_all()
        for slot in soak.slots:
            slot.proxy.stop()
        server.stop()
        if verdict == 0 and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")
    return verdict


def paused_during(soak: Soak, e: Execution) -> tuple[float, float] | None:
    """The SIGSTOP span of ``e``'s worker that began while ``e`` was live, if any."""
    for stopped, cont in soak.paused.get(e.agent, []):
        if e.start <= stopped <= e.until() and cont is not None:
            return stopped, cont
    return None


def check(soak: Soak, items: list[StoredEvent], ids: list[str], drained_after: float) -> int:
    args = soak.args
    history = by_task(items)
    runs = soak.log.by_task()
    violations: list[str] = []

    def fault_context(a: float, b: float) -> str:
        near = [f"    [{t - T0:7.1f}] {what}" for t, what in soak.faults if a - 15 <= t <= b + 2]
        return "\n".join(near)

    for task_id in ids:
        evs = history.get(task_id, [])
        mine = sorted(runs.get(task_id, []), key=lambda e: e.start)
        claims = {i.seq: i for i in evs if isinstance(i.event.data, ev.TaskClaimed)}
        tl = timeline(evs)

        def show(e: Execution) -> str:
            return (f"{e.agent} epoch {e.epoch} attempt {e.attempt} pid {e.pid} "
                    f"[{e.start - T0:.2f} .. {e.until() - T0:.2f}] {e.how}")

        # (a) overlapping executions
        for i, a in enumerate(mine):
            for b in mine[i + 1:]:
                overlap = a.overlap(b)
                if overlap <= 0:
                    continue
                pause = paused_during(soak, a)
                what = (f"{task_id}: executions overlap {overlap:.2f} s:\n    {show(a)}\n"
                        f"    {show(b)}")
                if pause is not None:
                    what += (f"\n    (holder SIGSTOPped {pause[0] - T0:.2f} .. "
                             f"{pause[1] - T0:.2f})")
                if overlap > args.slack:
                    violations.append(f"(a) {what}\n  timeline:\n{tl}\n  faults:\n"
                                      f"{fault_context(a.start, a.until())}")
        # (d) executions ran under a claim of theirs, one execution per claim
        per_epoch = Counter(e.epoch for e in mine)
        for epoch, k in per_epoch.items():
            if k > 1:
                violations.append(f"(d) {task_id}: claim {epoch} ran {k} times\n{tl}")
        for e in mine:
            claim = claims.get(e.epoch)
            if claim is None or claim.event.data.owner != e.agent:  # type: ignore[attr-defined]
                violations.append(f"(d) {task_id}: {show(e)} ran without a claim of its own"
                                  f"\n{tl}")
        by_epoch = {e.epoch: e for e in mine}
        # (b) completed exactly once / failed after max attempts
        done = [i for i in evs if isinstance(i.event.data, ev.TaskCompleted)]
        final_fail = [i for i in evs if isinstance(i.event.data, ev.TaskFailed)
                      and i.event.data.final]
        status = status_of(evs) if evs else "absent"
        spec = soak.created[task_id]
        if len(done) > 1:
            violations.append(f"(b) {task_id}: {len(done)} completions\n{tl}")
        if status == "completed":
            if final_fail:
                violations.append(f"(b) {task_id}: completed after a final failure\n{tl}")
        elif status == "failed":
            attempts = max((c.event.data.attempt for c in claims.values()),  # type: ignore[attr-defined]
                           default=0)
            if done:
                violations.append(f"(b) {task_id}: failed after a completion\n{tl}")
            if attempts < spec["max_attempts"]:
                violations.append(f"(b) {task_id}: failed after {attempts} of "
                                  f"{spec['max_attempts']} attempts\n{tl}")
        else:
            violations.append(f"(c) {task_id}: {status} {drained_after:.0f} s after the "
                              f"faults stopped\n{tl}")
        # (d) accepted outcomes come from executions that ran and ended that way
        for k, item in enumerate(evs):
            data = item.event.data
            if not isinstance(data, (ev.TaskCompleted, ev.TaskFailed)):
                continue
            if k and isinstance(evs[k - 1].event.data, ev.TaskLeaseExpired):
                continue  # a reaper's final failure after the last attempt expired
            epoch = data.epoch  # type: ignore[attr-defined]
            claim = claims.get(epoch)
            e = by_epoch.get(epoch)
            ok = isinstance(data, ev.TaskCompleted)
            if claim is None or item.event.actor != claim.event.data.owner:  # type: ignore[attr-defined]
                violations.append(f"(d) {task_id}: {item.event.type} at {item.seq} by "
                                  f"{item.event.actor} is not from the claim of record\n{tl}")
            elif e is None:
                violations.append(f"(d) {task_id}: {item.event.type} for epoch {epoch} "
                                  f"without an execution\n{tl}")
            elif ok and e.how != "exit-0":
                violations.append(f"(d) {task_id}: completion of {show(e)}\n{tl}")
            elif not ok and e.how == "exit-0":
                violations.append(f"(d) {task_id}: failure of {show(e)}\n{tl}")
            if ok and e is not None and paused_during(soak, e) is not None:
                # Accepted from a holder that was frozen: only fine if nobody else
                # ran the task meanwhile.
                others = [o for o in mine if o is not e and o.overlap(e) > 0]
                if others:
                    violations.append(f"(d) {task_id}: completion accepted from paused "
                                      f"{show(e)} while {show(others[0])} ran\n{tl}")

    n_exec = sum(len(v) for v in runs.values())
    statuses = Counter(status_of(history[t]) if t in history else "absent" for t in ids)
    expiries = sum(1 for i in items if isinstance(i.event.data, ev.TaskLeaseExpired))
    faults = ", ".join(f"{k} {v}" for k, v in sorted(soak.fault_counts.items()))
    summary = (f"seed {args.seed}: {len(ids)} tasks ({dict(statuses)}), {n_exec} executions, "
               f"{expiries} expiries, faults: {faults}; drained {drained_after:.0f} s after "
               f"the faults stopped")
    if violations:
        print(f"VIOLATION: {len(violations)} broken promises; {summary}")
        for v in violations[:args.show]:
            print("-" * 70)
            print(v)
        return 1
    print(f"OK: {summary}")
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=5, choices=range(1, 6))
    p.add_argument("--initial", type=int, default=40, help="tasks created at the start")
    p.add_argument("--backlog", type=int, default=25, help="unfinished tasks kept around")
    p.add_argument("--max-tasks", type=int, default=3000)
    p.add_argument("--drain", type=float, default=60.0 + 2 * MAX_TTL,
                   help="seconds the swarm gets to drain once the faults stopped")
    p.add_argument("--slack", type=float, default=0.3,
                   help="overlap allowed for killing an execution's process")
    p.add_argument("--show", type=int, default=10, help="violations printed in full")
    p.add_argument("--keep", action="store_true", help="keep the temp dir even if OK")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
