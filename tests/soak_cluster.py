"""Adversarial soak of cflow on a local three-node NATS cluster (not collected by pytest).

    uv run python tests/soak_cluster.py --minutes 10 --seed 1

What it does, all on loopback with temporary store directories and free ports:

- starts a three-node cluster (``faults.Cluster``, monitoring ports on, routes
  not advertised to clients so that a worker behind a proxy stays behind it) and
  runs ``cfctl init --replicas 3``; every stream and bucket of the swarm must
  then be R3;
- runs ``--workers`` real ``cfctl worker --exec`` processes, each with its own
  three proxies (one per node) as its URL list, whose executions are recorded by
  ``faults.ExecutionLog`` (start/end/dead lines on the monotonic clock);
- creates tasks all along (short lease TTLs of 2-3 s, retries, some failing
  attempts on purpose, a few failing for good, some dependencies);
- a prober writes memory entries and tasks and reads each one back at once
  (read-your-writes) through its own proxies;
- a fault loop, every few seconds, picks one of: kill -9 a node (restarted
  3-12 s later) or freeze one with SIGSTOP (thawed 2-8 s later; never two
  down at once, and only once every replica is current again), step down
  the leader of the events stream or of the leases bucket, black-hole a
  worker's proxies for longer than a TTL then heal, delay a worker's proxies,
  cut a worker's connections, kill -9 a worker and start a replacement.

At the end (faults off, cluster whole, a bounded wait for the swarm to drain)
it checks, from real executions and the event log:

a. per task, no two executions overlap (beyond ``--overlap-limit`` seconds);
b. every task completed exactly once, or failed for good after its attempts;
c. nothing stranded (every task terminal within the drain wait);
   and every execution whose lease expired ended before the expiry was stored;
d. every accepted completion comes from the claim of record and an execution
   that really ran to exit 0 with that epoch and agent;
e. the three servers agree on every stream's last sequence;
plus read-your-writes and R3 everywhere. One verdict line, details, and a
non-zero exit on any violation. The run directory is kept when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cflow.server as cserver
import faults  # tests/ is on the path: it is the script's directory
from cflow import events as ev
from cflow.errors import CflowError, NotFound
from cflow.streams import EventLog, StoredEvent, connect, names
from cflow.streams.client import api_request
from cflow.streams.definitions import swarm_resources
from cflow.swarm import Swarm

SWARM = "soak"
TERMINAL = ("completed", "failed", "cancelled")

_render = cserver.render_config


def _render_no_advertise(opts: cserver.ServerOptions) -> str:
    """Cluster members that do not gossip their client URLs: a client behind a
    proxy must not find the real port and walk around the proxy's faults."""
    text = _render(opts)
    return text.replace("cluster {\n", "cluster {\n  no_advertise: true\n", 1)


cserver.render_config = _render_no_advertise  # type: ignore[assignment]


def now() -> float:
    return time.monotonic()


@dataclass
class Soak:
    args: argparse.Namespace
    base: Path
    rng: random.Random
    t0: float = field(default_factory=now)
    cluster: faults.Cluster | None = None
    log: faults.ExecutionLog | None = None
    env: dict[str, str] = field(default_factory=dict)
    workers: dict[str, faults.WorkerProcess] = field(default_factory=dict)
    worker_proxies: dict[str, list[faults.Proxy]] = field(default_factory=dict)
    proxies: list[faults.Proxy] = field(default_factory=list)
    spec: dict[str, dict[str, Any]] = field(default_factory=dict)  # task id -> options
    faults_done: Counter[str] = field(default_factory=Counter)
    fault_lines: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    down: Any = None  # the node killed (or frozen), until restarted (or thawed)
    frozen: bool = False
    restart_at: float = 0.0
    pending_heals: list[tuple[float, str, list[faults.Proxy]]] = field(default_factory=list)
    worker_seq: int = 0
    ryw_checks: int = 0
    ryw_errors: int = 0

    # ----------------------------------------------------------------- util

    def say(self, text: str) -> None:
        line = f"[{now() - self.t0:7.1f}] {text}"
        self.fault_lines.append(f"{now():.3f} {text}")
        if self.args.verbose:
            print(line, flush=True)

    def violation(self, text: str) -> None:
        self.violations.append(text)
        print(f"VIOLATION: {text}", flush=True)

    # ------------------------------------------------------------- workers

    def new_worker(self) -> faults.WorkerProcess:
        assert self.cluster is not None and self.log is not None
        self.worker_seq += 1
        name = f"w{self.worker_seq}"
        ps = [faults.Proxy(s.url, name=f"{name}-n{i}").start()
              for i, s in enumerate(self.cluster.servers)]
        self.proxies += ps
        k = self.worker_seq % 3
        ordered = ps[k:] + ps[:k]  # each worker prefers another node
        env = {**self.env, "CFLOW_URL": ",".join(p.url for p in ordered)}
        w = faults.WorkerProcess(name, env, self.log.command(1.0), self.base / "logs",
                                 concurrency=2, drain_grace=1.0)
        self.workers[name] = w
        self.worker_proxies[name] = ordered
        w.start()
        return w

    def alive_workers(self) -> list[faults.WorkerProcess]:
        return [w for w in self.workers.values() if w.alive]

    # --------------------------------------------------------------- tasks

    async def create_tasks(self, s: Swarm, n: int) -> None:
        ids = list(self.spec)
        for _ in range(n):
            k = len(self.spec)
            ttl = self.rng.choice((2.0, 2.5, 3.0))
            seconds = round(self.rng.uniform(0.1, 3.0), 2)
            roll = self.rng.random()
            max_attempts = self.rng.choice((4, 6, 10))
            fail_attempts = 0
            final_fail = False
            if roll < 0.08:
                fail_attempts = self.rng.randint(1, 2)  # retried, then succeeds
            elif roll < 0.11:
                fail_attempts, max_attempts, final_fail = 99, 2, True  # fails for good
            deps: list[str] = []
            candidates = [t for t in ids[-40:] if not self.spec[t]["final_fail"]]
            if candidates and self.rng.random() < 0.15:
                deps = self.rng.sample(candidates, min(len(candidates), self.rng.randint(1, 2)))
            body = faults.ExecutionLog.body(seconds, fail_attempts)
            for attempt in range(20):
                try:
                    t = await s.tasks.create(
                        f"soak {k}", body=body, lease_ttl_s=ttl, max_attempts=max_attempts,
                        backoff_initial_s=0.1, backoff_max_s=0.5, depends_on=deps,
                        priority=self.rng.randint(0, 3), request_id=f"soak-{self.args.seed}-{k}")
                    break
                except CflowError as exc:
                    if attempt == 19:
                        raise
                    self.say(f"create retry: {exc}")
                    await asyncio.sleep(0.5)
            self.spec[t.task_id] = {"ttl": ttl, "max_attempts": max_attempts,
                                    "fail_attempts": fail_attempts, "final_fail": final_fail,
                                    "deps": deps, "k": k}
            ids.append(t.task_id)

    async def producer(self, s: Swarm, stop: asyncio.Event, total: int) -> None:
        initial = min(total, max(60, total // 5))
        await self.create_tasks(s, initial)
        rest = total - initial
        period = max(0.5, (self.args.minutes * 60 * 0.85) / max(1, rest / 3))
        while rest > 0 and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period)
            if stop.is_set():
                break
            n = min(3, rest)
            await self.create_tasks(s, n)
            rest -= n

    # ---------------------------------------------------- read your writes

    async def prober(self, stop: asyncio.Event) -> None:
        assert self.cluster is not None
        ps = [faults.Proxy(sv.url, name=f"prober-n{i}").start()
              for i, sv in enumerate(self.cluster.servers)]
        self.proxies += ps
        self.worker_proxies["prober"] = ps
        async with Swarm.connect(",".join(p.url for p in ps), swarm=SWARM, agent="prober",
                                 ensure=False) as s:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    await s.memory.put("soak", "counter", str(n))
                except CflowError:
                    await asyncio.sleep(0.3)
                    continue
                try:
                    got = await s.memory.get("soak", "counter")
                    self.ryw_checks += 1
                    if str(got.value) != str(n):
                        self.violation(f"read-your-writes: memory put {n}, read back {got.value!r}")
                except CflowError as exc:
                    self.ryw_errors += 1
                    self.say(f"prober memory read error after a stored put: {exc}")
                if n % 5 == 0:
                    try:
                        t = await s.tasks.create(f"probe {n}", body=faults.ExecutionLog.body(0.1),
                                                 lease_ttl_s=3.0, max_attempts=10,
                                                 backoff_initial_s=0.1, backoff_max_s=0.5,
                                                 request_id=f"probe-{self.args.seed}-{n}")
                    except CflowError:
                        continue
                    self.spec[t.task_id] = {"ttl": 3.0, "max_attempts": 10, "fail_attempts": 0,
                                            "final_fail": False, "deps": [], "k": -n}
                    try:
                        got_t = await s.tasks.get(t.task_id)
                        self.ryw_checks += 1
                        if got_t.created_seq != t.created_seq:
                            self.violation(f"read-your-writes: task {t.task_id} read back "
                                           f"with created_seq {got_t.created_seq} != "
                                           f"{t.created_seq}")
                    except NotFound:
                        self.violation(f"read-your-writes: task {t.task_id} created, not found")
                    except CflowError as exc:
                        self.ryw_errors += 1
                        self.say(f"prober task read error after a stored create: {exc}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.4)

    # --------------------------------------------------------------- faults

    async def replicas_current(self, nc: Any) -> bool:
        for stream in (names.events_stream(SWARM),
                       names.kv_stream(names.bucket(SWARM, names.LEASES))):
            try:
                info = await api_request(nc, f"$JS.API.STREAM.INFO.{stream}", timeout=1.0)
            except CflowError:
                return False
            cl = info.get("cluster") or {}
            reps = cl.get("replicas") or []
            if not cl.get("leader") or len(reps) != 2 or not all(
                    r.get("current") and not r.get("offline") for r in reps):
                return False
        return True

    def heal_due(self, force: bool = False) -> None:
        keep = []
        for at, what, ps in self.pending_heals:
            if force or now() >= at:
                for p in ps:
                    p.heal()
                self.say(f"heal {what}")
            else:
                keep.append((at, what, ps))
        self.pending_heals = keep

    async def restart_due(self, force: bool = False) -> None:
        if self.down is not None and (force or now() >= self.restart_at):
            server = self.down
            if self.frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server.proc.pid, signal.SIGCONT)
                self.say(f"thaw node {server.opts.server_name}")
            else:
                await asyncio.to_thread(_restart, server)
                self.say(f"restart node {server.opts.server_name}")
            self.down = None
            self.frozen = False

    async def fault_loop(self, nc: Any, stop: asyncio.Event) -> None:
        assert self.cluster is not None
        kinds = ["kill_node", "freeze_node", "step_down_events", "step_down_leases",
                 "blackhole_worker", "delay_worker", "cut_worker", "kill_worker"]
        weights = [3, 2, 2, 2, 3, 1, 2, 2]
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.uniform(2.0, 5.0))
            self.heal_due()
            await self.restart_due()
            if stop.is_set():
                break
            kind = self.rng.choices(kinds, weights)[0]
            try:
                await self.fault(nc, kind)
            except (CflowError, AssertionError) as exc:
                self.say(f"fault {kind} not done: {exc}")

    async def fault(self, nc: Any, kind: str) -> None:
        assert self.cluster is not None
        busy = {name for _, what, _ in self.pending_heals for name in [what.split()[-1]]}
        if kind in ("kill_node", "freeze_node"):
            if self.down is not None or not await self.replicas_current(nc):
                self.say("kill_node skipped: a node is down or catching up")
                return
            if self.rng.random() < 0.5:
                stream = self.rng.choice((names.events_stream(SWARM),
                                          names.kv_stream(names.bucket(SWARM, names.LEASES))))
                victim = self.cluster.by_name(await faults.stream_leader(nc, stream, 5.0))
                why = f"leader of {stream}"
            else:
                victim = self.rng.choice(self.cluster.servers)
                why = "random"
            self.down = victim
            if kind == "freeze_node":  # SIGSTOP: a leader that wakes up deposed
                os.kill(victim.proc.pid, signal.SIGSTOP)
                self.frozen = True
                self.restart_at = now() + self.rng.uniform(2.0, 8.0)
                self.say(f"freeze node {victim.opts.server_name} ({why})")
                self.faults_done[kind] += 1
                return
            victim.kill()
            self.restart_at = now() + self.rng.uniform(3.0, 12.0)
            self.say(f"kill -9 node {victim.opts.server_name} ({why})")
        elif kind in ("step_down_events", "step_down_leases"):
            stream = (names.events_stream(SWARM) if kind == "step_down_events"
                      else names.kv_stream(names.bucket(SWARM, names.LEASES)))
            old, new = await faults.step_down(nc, stream, 10.0)
            self.say(f"step down {stream}: {old} -> {new}")
        else:
            candidates = [w for w in self.alive_workers() if w.name not in busy]
            if not candidates:
                return
            w = self.rng.choice(candidates)
            ps = self.worker_proxies[w.name]
            if kind == "blackhole_worker":
                ttl_max = 3.0
                hold = ttl_max + self.rng.uniform(0.5, 4.0)
                for p in ps:
                    p.blackhole()
                self.pending_heals.append((now() + hold, f"blackhole {w.name}", ps))
                self.say(f"blackhole {w.name} for {hold:.1f} s")
            elif kind == "delay_worker":
                ms = self.rng.choice((200, 500, 1000))
                for p in ps:
                    p.delay(ms)
                hold = self.rng.uniform(2.0, 6.0)
                self.pending_heals.append((now() + hold, f"delay {w.name}", ps))
                self.say(f"delay {w.name} {ms} ms for {hold:.1f} s")
            elif kind == "cut_worker":
                which = self.rng.choice(("primary", "all"))
                for p in ps if which == "all" else ps[:1]:
                    p.cut()
                self.say(f"cut {which} connections of {w.name}")
            elif kind == "kill_worker":
                w.kill9()
                nw = self.new_worker()
                self.say(f"kill -9 worker {w.name}; replacement {nw.name}")
        self.faults_done[kind] += 1


def _restart(server: Any) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            server.start(timeout=20)
            return
        except CflowError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# ================================================================= checks

ENDS_CLAIM = (ev.TaskLeaseExpired, ev.TaskCompleted, ev.TaskFailed, ev.TaskReleased,
              ev.TaskCancelled)


def check_log(soak: Soak, items: list[StoredEvent], states: dict[str, Any]) -> dict[str, int]:
    assert soak.log is not None
    history = faults.by_task(items)
    runs = soak.log.by_task()
    stats: Counter[str] = Counter()
    for task_id, spec in soak.spec.items():
        events = history.get(task_id, [])
        if not events:
            soak.violation(f"{task_id}: created (acknowledged) but no event in the log")
            continue
        claims: dict[int, StoredEvent] = {}
        open_claim: StoredEvent | None = None
        closed_epoch: int | None = None  # the claim an expiry just ended
        done: list[StoredEvent] = []
        finals: list[StoredEvent] = []
        for item in events:
            data = item.event.data
            stats[item.event.type] += 1
            if isinstance(data, ev.TaskClaimed):
                if open_claim is not None:
                    soak.violation(f"{task_id}: claim at {item.seq} while claim "
                                   f"{open_claim.seq} open\n{faults.timeline(events)}")
                open_claim = item
                claims[item.seq] = item
            elif (isinstance(data, ev.TaskFailed) and open_claim is None
                  and data.epoch == closed_epoch):
                # The reaper's "attempts exhausted" after its own expiry of that claim.
                if data.final:
                    finals.append(item)
            elif isinstance(data, ENDS_CLAIM):
                epoch = getattr(data, "epoch", None)
                if open_claim is None or epoch not in (None, open_claim.seq):
                    soak.violation(f"{task_id}: {item.event.type} of epoch {epoch} at "
                                   f"{item.seq}, claim of record "
                                   f"{open_claim.seq if open_claim else None}\n"
                                   f"{faults.timeline(events)}")
                if isinstance(data, ev.TaskCompleted):
                    done.append(item)
                    owner = open_claim.event.data.owner if open_claim else None  # type: ignore[attr-defined]
                    if item.event.actor != owner:
                        soak.violation(f"{task_id}: completion by {item.event.actor}, claim "
                                       f"of record held by {owner}")
                    matching = [r for r in runs.get(task_id, []) if r.epoch == data.epoch
                                and r.how == "exit-0" and r.agent == item.event.actor]
                    if not matching:
                        soak.violation(f"{task_id}: completion of epoch {data.epoch} by "
                                       f"{item.event.actor} without an execution that ran "
                                       f"to exit 0: {runs.get(task_id, [])}")
                if isinstance(data, ev.TaskFailed) and data.final:
                    finals.append(item)
                closed_epoch = open_claim.seq if open_claim is not None else None
                open_claim = None
        st = states.get(task_id)
        status = st.status if st is not None else "?"
        if len(done) > 1:
            soak.violation(f"{task_id}: {len(done)} accepted completions\n"
                           f"{faults.timeline(events)}")
        if spec["final_fail"]:
            if done or len(finals) != 1 or status != "failed":
                soak.violation(f"{task_id}: meant to fail for good: status {status}, "
                               f"{len(done)} completions, {len(finals)} final failures\n"
                               f"{faults.timeline(events)}")
            stats["failed_for_good"] += 1
        elif len(done) != 1 or status != "completed":
            if finals:
                # Legit only if it ran out of attempts (expiries count as attempts).
                soak.notes.append(f"{task_id}: failed for good after {st.attempt if st else '?'}"
                                  f" attempts of {spec['max_attempts']}")
                stats["exhausted"] += 1
            else:
                soak.violation(f"{task_id}: stranded/not completed: status {status}, "
                               f"{len(done)} completions\n{faults.timeline(events)}")
        else:
            stats["completed_once"] += 1
        if len(claims) > 1:
            stats["reclaimed_tasks"] += 1
    return dict(stats)


def check_overlaps(soak: Soak) -> float:
    assert soak.log is not None
    worst = 0.0
    for o, a, b in soak.log.overlaps():
        worst = max(worst, o)
        first, second = (a, b) if a.start <= b.start else (b, a)
        text = (f"task {a.task_id}: executions overlap {o:.2f} s: epoch {first.epoch} "
                f"by {first.agent} [{first.start - soak.t0:.2f}, "
                f"{first.until() - soak.t0:.2f}] {first.how}; epoch {second.epoch} by "
                f"{second.agent} [{second.start - soak.t0:.2f}, "
                f"{second.until() - soak.t0:.2f}] {second.how}")
        if o > soak.args.overlap_limit:
            soak.violation(text)
        else:
            soak.notes.append("small " + text)
    return worst


def check_stopped_before_expiry(soak: Soak, items: list[StoredEvent]) -> int:
    """An execution whose lease expired ended before the expiry was stored.

    The expiry is appended only after the server's TTL passed, and the holder
    stops before that (its deadline is TTL minus a margin after the last renewal
    it sent): an execution still running then outlived its lease, whether or not
    someone else had claimed the task yet. Wall times map to the monotonic clock
    through each execution's own start readings (one machine, one clock).
    """
    assert soak.log is not None
    runs: dict[tuple[str, int], list[faults.Execution]] = {}
    for r in soak.log.executions():
        runs.setdefault((r.task_id, r.epoch), []).append(r)
    checked = 0
    for item in items:
        data = item.event.data
        if not isinstance(data, ev.TaskLeaseExpired) or not item.time_ms:
            continue
        for r in runs.get((item.event.entity_id, data.epoch), []):
            checked += 1
            expired_mono = item.time_ms / 1000 - (r.wall_start - r.start)
            late = r.until() - expired_mono
            if late > soak.args.overlap_limit:
                soak.violation(f"task {r.task_id}: execution of epoch {r.epoch} by {r.agent} "
                               f"ended {late:.2f} s after its lease's expiry was stored "
                               f"({r.how}, ran {r.until() - r.start:.2f} s, TTL "
                               f"{soak.spec.get(r.task_id, {}).get('ttl')})")
    return checked


def dump(soak: Soak, items: list[StoredEvent]) -> None:
    """The run's record for a post-mortem: task options and every task event."""
    (soak.base / "tasks.json").write_text(json.dumps(soak.spec, indent=1))
    with open(soak.base / "events.txt", "w") as out:
        for i in items:
            out.write(f"{i.seq} {i.time_ms} {i.event.entity_id} {i.event.type} "
                      f"{i.event.actor} {i.event.data}\n")


def jsz(server: Any) -> dict[str, Any]:
    url = (f"http://127.0.0.1:{server.opts.http_port}/jsz?accounts=true&streams=true"
           "&config=true")
    with urllib.request.urlopen(url, timeout=3) as resp:
        body: dict[str, Any] = json.loads(resp.read())
    return body


def stream_states(server: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for acc in jsz(server).get("account_details") or []:
        for st in acc.get("stream_detail") or []:
            out[st["name"]] = st.get("state") or {}
    return out


async def check_agreement(soak: Soak, nc: Any) -> dict[str, Any]:
    """Every server holds every stream of the swarm at the same last sequence."""
    assert soak.cluster is not None
    streams = [names.events_stream(SWARM), names.messages_stream(SWARM), f"CF_{SWARM}_OFFERS",
               *(f"KV_{names.bucket(SWARM, b)}" for b in (
                   names.LEASES, names.PRESENCE, names.MEMORY, names.RESERVATIONS,
                   names.CONTROL))]
    deadline = now() + 60
    last: dict[str, Any] = {}
    while True:
        per = {s.opts.server_name: stream_states(s) for s in soak.cluster.servers}
        last = {st: {n: (per[n].get(st) or {}).get("last_seq") for n in per} for st in streams}
        # Compare the event log strictly; soft-state buckets keep moving (renewals,
        # presence) while anything runs, so they are compared once everything stopped.
        if all(len(set(v.values())) == 1 and None not in v.values() for v in last.values()):
            return last
        if now() > deadline:
            for st, v in last.items():
                if len(set(v.values())) != 1 or None in v.values():
                    soak.violation(f"servers disagree on {st} last_seq: {v}")
            return last
        await asyncio.sleep(0.5)


async def check_r3(soak: Soak, nc: Any, when: str) -> None:
    for spec in swarm_resources(SWARM, 3):
        try:
            info = await api_request(nc, f"$JS.API.STREAM.INFO.{spec.name}", timeout=3.0)
        except CflowError as exc:
            soak.violation(f"{when}: {spec.name}: no stream info ({exc})")
            continue
        r = int(info["config"].get("num_replicas", 1))
        if r != 3:
            soak.violation(f"{when}: {spec.name} has {r} replicas, not 3")


# =================================================================== main


async def run(args: argparse.Namespace, base: Path) -> int:
    soak = Soak(args=args, base=base, rng=random.Random(args.seed))
    (base / "logs").mkdir(parents=True)
    soak.log = faults.ExecutionLog(base / "exec")
    faults.Cluster.monitored = True
    soak.cluster = faults.Cluster(base / "nats")
    soak.env = {**os.environ, "CFLOW_SWARM": SWARM, "XDG_DATA_HOME": str(base / "xdg")}
    stop = asyncio.Event()
    background: list[asyncio.Task[None]] = []
    total_tasks = args.tasks or int(100 + 50 * args.minutes)
    admin: Any = None
    try:
        soak.cluster.start()
        init = await asyncio.to_thread(subprocess.run, [
            *faults.CFCTL, "--url", soak.cluster.urls, "--swarm", SWARM, "--json", "init",
            "--replicas", "3"], capture_output=True, text=True, env=soak.env, timeout=90)
        if init.returncode != 0:
            raise SystemExit(f"cfctl init failed: {init.stderr}")
        admin = await connect(soak.cluster.urls)
        await check_r3(soak, admin, "after init")
        for _ in range(args.workers):
            soak.new_worker()
        async with Swarm.connect(soak.cluster.urls, swarm=SWARM, agent="producer",
                                 ensure=False) as s:
            await asyncio.gather(*(w.wait_ready(60) for w in soak.workers.values()))
            soak.say(f"{len(soak.workers)} workers ready")
            background = [asyncio.create_task(soak.producer(s, stop, total_tasks)),
                          asyncio.create_task(soak.prober(stop)),
                          asyncio.create_task(soak.fault_loop(admin, stop))]
            end_at = now() + args.minutes * 60
            while now() < end_at:
                await asyncio.sleep(1.0)
                for t in background:
                    if t.done() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                if len(soak.alive_workers()) < 2:
                    soak.violation("workers died on their own: "
                                   + ", ".join(w.name for w in soak.workers.values()
                                               if not w.alive))
                    soak.new_worker()
            soak.say("faults stop")
            stop.set()
            await asyncio.gather(*background, return_exceptions=True)
            background = []
            soak.heal_due(force=True)
            await soak.restart_due(force=True)
            for p in soak.proxies:
                p.heal()
            # The swarm drains: every task terminal (bounded).
            drain_deadline = now() + args.drain
            pending = set(soak.spec)
            states: dict[str, Any] = {}
            while pending and now() < drain_deadline:
                for task_id in list(pending):
                    try:
                        st = await s.tasks.get(task_id)
                    except CflowError:
                        break
                    states[task_id] = st
                    if st.status in TERMINAL:
                        pending.discard(task_id)
                if pending:
                    await asyncio.sleep(1.0)
            drained_in = now() - (drain_deadline - args.drain)
            soak.say(f"drain: {len(pending)} not terminal after {drained_in:.1f} s")
            for w in soak.workers.values():
                w.terminate()
            for w in soak.workers.values():
                await asyncio.to_thread(w.stop, 15.0)
            await asyncio.sleep(1.0)  # the recorders' watcher lines
            for task_id in soak.spec:
                with contextlib.suppress(CflowError):
                    states[task_id] = await s.tasks.get(task_id)
            await check_r3(soak, admin, "at the end")
            elog = EventLog(admin, SWARM, actor="checker")
            items = await faults.task_events(elog)
        dump(soak, items)
        stats = check_log(soak, items, states)
        worst = check_overlaps(soak)
        stats["expiries_vs_executions"] = check_stopped_before_expiry(soak, items)
        agreement = await check_agreement(soak, admin)
        execs = soak.log.executions()
        still = [e for e in execs if e.end is None]
        if still:
            soak.violation(f"executions still running after the workers stopped: {still[:5]}")
        hows = Counter((e.how or "running").split("-")[0] for e in execs)
        print(f"seed {args.seed}, {args.minutes:g} min, {len(soak.spec)} tasks, "
              f"{len(execs)} executions {dict(hows)}, workers started {soak.worker_seq}")
        print(f"faults: {dict(soak.faults_done)}")
        print(f"log: {stats}")
        print(f"read-your-writes checks: {soak.ryw_checks} ({soak.ryw_errors} read errors); "
              f"max overlap {worst:.2f} s; drain {drained_in:.1f} s")
        print("stream last_seq per server: " + "; ".join(
            f"{k}={sorted(set(v.values()), key=str)}" for k, v in agreement.items()))
        for n in soak.notes[:30]:
            print(f"note: {n}")
        (base / "faults.log").write_text("\n".join(soak.fault_lines) + "\n")
    finally:
        stop.set()
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for w in soak.workers.values():
            w.terminate()
        for w in soak.workers.values():
            await asyncio.to_thread(w.stop, 10.0)
        if soak.log is not None:
            soak.log.kill_running()
        for p in soak.proxies:
            p.stop()
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()
        if soak.cluster is not None:
            if soak.frozen and soak.down is not None and soak.down.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(soak.down.proc.pid, signal.SIGCONT)
            soak.cluster.stop()
        (base / "faults.log").write_text("\n".join(soak.fault_lines) + "\n")
    verdict = "OK" if not soak.violations else f"FAIL ({len(soak.violations)} violations)"
    print(f"VERDICT seed={args.seed}: {verdict}", flush=True)
    return 1 if soak.violations else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=5)
    p.add_argument("--tasks", type=int, default=0, help="default: 100 + 50 per minute")
    p.add_argument("--drain", type=float, default=90.0, help="seconds to wait for the drain")
    p.add_argument("--overlap-limit", type=float, default=0.5,
                   help="seconds two executions of one task may overlap (kill latency)")
    p.add_argument("--dir", type=Path, default=None, help="run directory (default: temp)")
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix=f"soak-{args.seed}-"))
    if args.dir:
        base.mkdir(parents=True, exist_ok=True)
    code = 2
    try:
        code = asyncio.run(run(args, base))
    finally:
        if code == 0 and not args.keep and not args.dir:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"run directory: {base}", flush=True)
    with contextlib.suppress(Exception):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(code)


if __name__ == "__main__":
    main()
