"""``cfctl demo``: a DAG of tasks drained by real worker processes, one killed -9 half-way.

What it shows, in about a minute on two cores with the defaults:

1. a NATS server (the one at ``--url`` if reachable, else an embedded one on a
   temporary data dir, stopped at the end);
2. a task DAG: one ``plan`` task, ``build`` tasks that need it (some need the
   ``go`` capability), ``test`` tasks that need builds, a ``release`` that needs
   every test; a few tasks fail on their first attempt and are retried after a
   backoff, one fails for good;
3. N ``cfctl worker --exec`` subprocesses draining it, with live progress;
4. half-way, ``kill -9`` of a worker that holds a task: its lease is not
   renewed, the server expires it after the TTL, a reaper requeues the task and
   another worker finishes it;
5. a summary (cycle time, throughput, reclaims, retries) from the DuckDB
   projection, built in-process from the event log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cflow.errors import CflowError, Unavailable

if TYPE_CHECKING:
    from cflow.server import EmbeddedServer
    from cflow.streams import StoredEvent
    from cflow.swarm import Swarm

# One line per task body: "<seconds of work> <attempts that fail>". The body is on stdin.
WORK_COMMAND = (
    'read secs fails; sleep "$secs"; '
    'if [ "$CFLOW_TASK_ATTEMPT" -le "$fails" ]; then '
    'echo "simulated failure on attempt $CFLOW_TASK_ATTEMPT" >&2; exit 1; fi; '
    'echo "$CFLOW_TASK_TITLE: ok"'
)
CFCTL = [sys.executable, "-c", "from cflow.cli import main; main()"]


@dataclass
class DemoOptions:
    agents: int = 4
    tasks: int = 40
    kill: bool = True
    lease_ttl_s: float = 3.0
    work_s: float = 1.5
    url: str = "nats://127.0.0.1:4222"
    swarm: str | None = None
    json: bool = False
    timeout_s: float = 240.0
    seed: int | None = None
    live: bool = True


@dataclass
class Plan:
    """The DAG to create (pure): titles, bodies, dependencies by index, options."""

    titles: list[str] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)
    deps: list[list[int]] = field(default_factory=list)
    priorities: list[int] = field(default_factory=list)
    capabilities: list[tuple[str, ...]] = field(default_factory=list)
    max_attempts: list[int] = field(default_factory=list)

    def add(self, title: str, secs: float, fails: int = 0, deps: list[int] | None = None,
            priority: int = 0, caps: tuple[str, ...] = (), max_attempts: int = 3) -> int:
        self.titles.append(title)
        self.bodies.append(f"{secs:.2f} {fails}\n")
        self.deps.append(deps or [])
        self.priorities.append(priority)
        self.capabilities.append(caps)
        self.max_attempts.append(max_attempts)
        return len(self.titles) - 1


def plan_dag(n: int, work_s: float, rng: random.Random) -> Plan:
    """A plan -> builds -> tests -> release DAG of ``n`` tasks (pure, seeded)."""
    plan = Plan()

    def secs() -> float:
        return max(0.1, rng.uniform(0.5, 1.5) * work_s)

    root = plan.add("plan the release", secs(), priority=10)
    n_build = max(2, (n - 2) * 3 // 5)
    n_test = max(1, n - 2 - n_build)
    builds = []
    for i in range(n_build):
        caps = ("go",) if i % 3 == 2 else ()
        fails = 1 if i % 7 == min(3, n_build - 1) else 0
        builds.append(plan.add(f"build module {i + 1}", secs(), fails, [root],
                               priority=5 + (i % 3), caps=caps))
    tests = []
    for i in range(n_test):
        deps = sorted({builds[i % n_build], builds[(i * 7 + 3) % n_build]})
        if i == n_test // 2 and n_test > 2:
            # One task that fails for good: nothing depends on it.
            plan.add("flaky integration suite", secs() / 2, 99, deps, priority=1,
                     max_attempts=2)
            continue
        fails = 1 if i % 5 == 1 else 0
        tests.append(plan.add(f"test suite {i + 1}", secs(), fails, deps, priority=3,
                              caps=("py",) if i % 2 else ()))
    plan.add("release", secs(), 0, tests or builds, priority=10)
    return plan


def worker_caps(i: int) -> list[str]:
    """Every worker does py; every other one also go, so both are always covered."""
    return ["py", "go"] if i % 2 == 0 else ["py"]


async def reachable(url: str) -> bool:
    from cflow.streams import connect

    try:
        nc = await connect(url, connect_timeout=1.0)
    except Unavailable:
        return False
    await nc.close()
    return True


class DemoInterrupted(CflowError):
    """Ctrl-C / SIGTERM stopped the demo; the message says what was stopped."""


def embedded_server() -> tuple[EmbeddedServer, Path]:
    """An embedded server on 4222 (or a free port) and a temporary data dir, not started."""
    from cflow.server import EmbeddedServer, ServerOptions, free_port, port_in_use

    data = Path(tempfile.mkdtemp(prefix="cflow-demo-"))
    port = 4222 if not port_in_use("127.0.0.1", 4222) else free_port()
    return EmbeddedServer(ServerOptions(port=port, data_dir=data, sync="default")), data


class Demo:
    def __init__(self, opts: DemoOptions, swarm: Swarm, url: str, out: Any) -> None:
        self.opts = opts
        self.swarm = swarm
        self.url = url
        self.out = out  # a rich Console
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[Any] = []
        self.recent: deque[str] = deque(maxlen=8)
        self.killed: str | None = None
        self.killed_task: str | None = None
        self.task_ids: list[str] = []
        self.started = time.monotonic()
        self.first_seq = 0
        self.expired: set[str] = set()
        self.live = False
        self.interrupted: list[int] = []  # signals received (filled by run_demo)

    def note(self, line: str) -> None:
        self.recent.append(line)
        if not self.live:
            self.out.print(line)

    # -- setup

    async def create_tasks(self, plan: Plan) -> None:
        svc = self.swarm.tasks
        for i, title in enumerate(plan.titles):
            state = await svc.create(
                title, body=plan.bodies[i], priority=plan.priorities[i],
                capabilities=plan.capabilities[i],
                depends_on=[self.task_ids[d] for d in plan.deps[i]],
                lease_ttl_s=self.opts.lease_ttl_s, max_attempts=plan.max_attempts[i],
                backoff_initial_s=0.5, backoff_max_s=2.0, labels={"demo": "1"})
            self.task_ids.append(state.task_id)

    def start_workers(self, logdir: Path) -> None:
        for i in range(self.opts.agents):
            name = f"demo-w{i + 1}"
            args = [*CFCTL, "--url", self.url, "--swarm", self.swarm.name, "--json", "worker",
                    "--name", name, "--exec", WORK_COMMAND, "--drain-grace", "5"]
            for cap in worker_caps(i):
                args += ["--capability", cap]
            log = open(logdir / f"{name}.log", "wb")  # noqa: SIM115 - kept for the child
            self.logs.append(log)
            # Own session: a terminal's Ctrl-C reaches only the demo, which stops
            # the workers itself (and the server last, so they can release).
            self.procs[name] = subprocess.Popen(args, stdout=log, stderr=log,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    # -- progress

    def counts(self) -> Counter[str]:
        board = self.swarm.tasks.board
        return Counter(board.tasks[t].status for t in self.task_ids if t in board.tasks)

    def done(self) -> bool:
        c = self.counts()
        settled = c["completed"] + c["failed"] + c["cancelled"] + c["blocked"]
        return settled >= len(self.task_ids)

    def render(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        c = self.counts()
        total = len(self.task_ids)
        finished = c["completed"] + c["failed"] + c["blocked"] + c["cancelled"]
        head = Table.grid(padding=(0, 2))
        head.add_row(
            ProgressBar(total=total, completed=finished, width=40),
            f"{finished}/{total} settled",
            f"{time.monotonic() - self.started:5.1f} s",
        )
        head.add_row(
            "  ".join(f"{s} {c[s]}" for s in ("ready", "pending", "claimed", "expired",
                                                "completed", "failed", "blocked") if c[s]),
            "", "",
        )
        workers = Table("worker", "pid", "holds", box=None, padding=(0, 2))
        holding: dict[str, list[str]] = {}
        board = self.swarm.tasks.board
        for t in self.task_ids:
            st = board.tasks.get(t)
            if st is not None and st.status == "claimed" and st.owner:
                holding.setdefault(st.owner, []).append(st.title)
        for name, proc in self.procs.items():
            alive = proc.poll() is None
            pid = str(proc.pid) if alive else ("killed -9" if name == self.killed else "exited")
            workers.add_row(name, pid, ", ".join(holding.get(name, [])) or "-")
        return Group(head, workers, *list(self.recent))

    def on_event(self, item: StoredEvent) -> None:
        from cflow import events as ev

        e = item.event
        title = ""
        board_state = self.swarm.tasks.board.get(e.entity_id)
        if board_state is not None:
            title = board_state.title
        match e.data:
            case ev.TaskLeaseExpired(owner=owner):
                self.expired.add(e.entity_id)
                self.note(f"[yellow]lease of {owner} on '{title}' expired "
                          f"(reaped by {e.actor})[/]")
            case ev.TaskRequeued(attempt=attempt):
                self.note(f"[yellow]'{title}' requeued after attempt {attempt}[/]")
            case ev.TaskFailed(final=final, error=error):
                what = "failed for good" if final else "failed, will retry"
                self.note(f"[red]'{title}' {what}: {error}[/]")
            case ev.TaskClaimed(owner=owner, attempt=attempt) if attempt > 1:
                how = "reclaimed" if e.entity_id in self.expired else "retried"
                self.note(f"[cyan]'{title}' {how} by {owner} (attempt {attempt})[/]")
            case ev.TaskBlocked(reason=reason):
                self.note(f"[magenta]'{title}' blocked: {reason}[/]")

    async def follow_events(self) -> None:
        from cflow.streams import StoredEvent, names

        async for item in self.swarm.log.follow(names.events_filter(self.swarm.name, "task"),
                                                start_seq=self.first_seq):
            if isinstance(item, StoredEvent):
                self.on_event(item)

    async def maybe_kill(self) -> None:
        """Half-way, kill -9 a worker that holds a task."""
        if not self.opts.kill or self.killed or len(self.procs) < 2:
            return
        c = self.counts()
        if c["completed"] < len(self.task_ids) // 2:
            return
        board = self.swarm.tasks.board
        for t in self.task_ids:
            st = board.tasks.get(t)
            if st is None or st.status != "claimed" or st.owner not in self.procs:
                continue
            proc = self.procs[st.owner]
            if proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGKILL)
            self.killed, self.killed_task = st.owner, st.task_id
            self.note(
                f"[bold red]kill -9 {st.owner} (pid {proc.pid}) while it holds '{st.title}'; "
                f"its lease expires within {self.opts.lease_ttl_s:g} s[/]")
            return

    async def wait_done(self, live: Any) -> None:
        svc = self.swarm.tasks
        deadline = time.monotonic() + self.opts.timeout_s
        while not self.done():
            if self.interrupted:  # the signal's cancel can be swallowed by a timeout racing it
                raise asyncio.CancelledError
            if time.monotonic() > deadline:
                raise CflowError(f"demo did not finish within {self.opts.timeout_s:g} s")
            await self.maybe_kill()
            if live is not None:
                live.update(self.render())
            # Woken by the next task event; the timeout only keeps the clock ticking.
            seen = svc._version
            await svc._board_moves(seen, 0.25)
        if live is not None:
            live.update(self.render())

    async def stop_workers(self, *, now: bool = False) -> int:
        """Stop the workers; returns how many were still running.

        ``now`` (Ctrl-C): SIGINT, which makes a worker stop its task and release
        it at once; whatever is left after a second is killed with its group.
        Otherwise SIGTERM lets running tasks finish (``--drain-grace``).
        """
        alive = [p for p in self.procs.values() if p.poll() is None]
        for proc in alive:
            proc.send_signal(signal.SIGINT if now else signal.SIGTERM)
        deadline = time.monotonic() + (1.0 if now else 15.0)
        for proc in self.procs.values():
            try:
                await asyncio.to_thread(proc.wait, max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await asyncio.to_thread(proc.wait, 5)
        for log in self.logs:
            log.close()
        return len(alive)


# ------------------------------------------------------------------- summary


async def summary_from_projection(swarm: Swarm, dbdir: Path) -> dict[str, Any]:
    """Build the DuckDB projection in-process and read the analytics views."""
    from cflow.projections.projector import Projector

    projector = Projector(swarm.log, dbdir / "demo.duckdb")
    try:
        await projector.run(until_seq=await swarm.log.stream_last_seq())
        store = await projector.open()

        async def one(sql: str) -> tuple[Any, ...]:
            rows = await projector.db(store.fetch, sql)
            return rows[0] if rows else ()

        cycle = await one("SELECT n, p50_s, p95_s, max_s FROM cycle_time WHERE dimension = 'all'")
        attempts = await one("SELECT attempts, reclaims, releases FROM attempt_stats")
        failures = await one("SELECT failed_attempts, failed_tasks FROM failure_stats")
        span = await one(
            "SELECT count(*) FILTER (WHERE type = 'TaskCompleted'), "
            "(epoch_ms(max(ts) FILTER (WHERE type = 'TaskCompleted')) "
            " - epoch_ms(min(ts) FILTER (WHERE type = 'TaskCreated'))) / 1000.0 "
            "FROM events WHERE entity_kind = 'task'")
        per_agent = await projector.db(store.fetch, "SELECT agent_id, completed, failed, expired "
                                                    "FROM throughput_agent ORDER BY agent_id")
    finally:
        await projector.close()
    completed, window = int(span[0] or 0), float(span[1] or 0.0)
    return {
        "source": "projection",
        "completed": completed,
        "failed_tasks": int(failures[1] or 0),
        "failed_attempts": int(failures[0] or 0),
        "attempts": int(attempts[0] or 0),
        "reclaims": int(attempts[1] or 0),
        "releases": int(attempts[2] or 0),
        "cycle_p50_s": float(cycle[1]) if cycle else None,
        "cycle_p95_s": float(cycle[2]) if cycle else None,
        "cycle_max_s": float(cycle[3]) if cycle else None,
        "window_s": window,
        "throughput_per_min": completed / window * 60 if window else None,
        "per_agent": {str(r[0]): {"completed": int(r[1]), "failed": int(r[2]),
                                  "expired": int(r[3])} for r in per_agent},
    }


async def summary_from_log(swarm: Swarm, task_ids: list[str]) -> dict[str, Any]:
    """The same figures folded straight from the event log (no DuckDB)."""
    from statistics import quantiles

    from cflow import events as ev
    from cflow.streams import StoredEvent, names
    from cflow.tasks import event_ms

    items = await swarm.log.read(names.events_filter(swarm.name, "task"))
    created: dict[str, int] = {}
    completed_at: dict[str, int] = {}
    per_agent: dict[str, Counter[str]] = {}
    counts: Counter[str] = Counter()
    for item in items:
        if not isinstance(item, StoredEvent):
            continue
        e, ms = item.event, event_ms(item.event)
        counts[e.type] += 1
        match e.data:
            case ev.TaskCreated():
                created[e.entity_id] = ms
            case ev.TaskCompleted():
                completed_at[e.entity_id] = ms
                per_agent.setdefault(e.actor, Counter())["completed"] += 1
            case ev.TaskFailed(final=final):
                counts["final_failures"] += final
                per_agent.setdefault(e.actor, Counter())["failed"] += 1
            case ev.TaskLeaseExpired(owner=owner):
                per_agent.setdefault(owner, Counter())["expired"] += 1
    cycles = sorted((completed_at[t] - created[t]) / 1000 for t in completed_at if t in created)
    window = ((max(completed_at.values()) - min(created.values())) / 1000
              if completed_at and created else 0.0)
    q = quantiles(cycles, n=20) if len(cycles) >= 2 else cycles * 19
    return {
        "source": "event log",
        "completed": len(completed_at),
        "failed_tasks": counts["final_failures"],
        "failed_attempts": counts["TaskFailed"],
        "attempts": counts["TaskClaimed"],
        "reclaims": counts["TaskLeaseExpired"],
        "releases": counts["TaskReleased"],
        "cycle_p50_s": q[9] if q else None,
        "cycle_p95_s": q[18] if q else None,
        "cycle_max_s": cycles[-1] if cycles else None,
        "window_s": window,
        "throughput_per_min": len(completed_at) / window * 60 if window else None,
        "per_agent": {a: dict(c) for a, c in sorted(per_agent.items())},
    }


def _n(n: int, noun: str) -> str:
    return f"{n} {noun if n == 1 else noun + 's'}"


def print_summary(out: Any, s: dict[str, Any]) -> None:
    from rich.table import Table

    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} s"

    table = Table(title=f"cflow demo summary (from the {s['source']})", box=None,
                  show_header=False, padding=(0, 2))
    table.add_row("swarm", str(s.get("swarm", "")))
    table.add_row("tasks", f"{s['tasks']} created, {s['completed']} completed, "
                           f"{s['failed_tasks']} failed for good, {s['blocked']} blocked")
    retried = max(0, s["failed_attempts"] - s["failed_tasks"])
    table.add_row("attempts", f"{_n(s['attempts'], 'claim')}, "
                              f"{_n(s['failed_attempts'], 'failed attempt')} ({retried} retried, "
                              f"{s['failed_tasks']} final), {s['releases']} released")
    table.add_row("reclaims", f"{_n(s['reclaims'], 'lease')} expired and reclaimed"
                  + (f" (worker {s['killed']} was killed -9)" if s.get("killed") else ""))
    table.add_row("cycle time", f"p50 {sec(s['cycle_p50_s'])}, p95 {sec(s['cycle_p95_s'])}, "
                                f"max {sec(s['cycle_max_s'])} (created -> completed)")
    tput = s["throughput_per_min"]
    table.add_row("throughput", "-" if tput is None else
                  f"{tput:.1f} tasks/min over {s['window_s']:.1f} s "
                  f"with {_n(s['agents'], 'worker')}")
    table.add_row("wall time", f"{s['wall_s']:.1f} s")
    for agent, c in s["per_agent"].items():
        table.add_row(f"  {agent}", ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    out.print(table)


# ----------------------------------------------------------------------- main


async def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Run the whole demo; returns the summary.

    Ctrl-C and SIGTERM stop it within about a second: the workers stop and
    release their tasks, then the embedded server stops.

    Raises:
        Unavailable: no server reachable and none could be started.
        CflowError: the DAG did not settle within ``opts.timeout_s``.
        DemoInterrupted: a SIGINT or SIGTERM stopped it (everything is stopped).
    """
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    signals: list[int] = []
    stopped = {"server": False, "workers": 0}

    def on_signal(sig: int) -> None:
        if not signals:  # a second Ctrl-C must not cut the cleanup short
            main.cancel()
        signals.append(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await _run_demo(opts, stopped, signals)
    except asyncio.CancelledError:
        if not signals:
            raise
        what = [f"{stopped['workers']} worker{'s' if stopped['workers'] != 1 else ''}"]
        if stopped["server"]:
            what.insert(0, "the server")
        raise DemoInterrupted("stopped " + " and ".join(what)) from None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _run_demo(opts: DemoOptions, stopped: dict[str, Any],
                    signals: list[int]) -> dict[str, Any]:
    from rich.console import Console
    from rich.live import Live

    from cflow.swarm import Swarm

    stream = sys.stderr if opts.json else sys.stdout
    # To a pipe or file: no wrapping at 80 columns (no words cut mid-line).
    out = (Console(stderr=opts.json) if stream.isatty()
           else Console(stderr=opts.json, width=200, soft_wrap=True))
    server: EmbeddedServer | None = None
    server_dir: Path | None = None
    url = opts.url
    wall = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="cflow-demo-run-"))
    try:
        if not await reachable(url):
            server, server_dir = embedded_server()
            # Started in a thread; a Ctrl-C meanwhile waits for it, so the finally
            # below stops a server that did start.
            # detach: its own session, so a terminal's Ctrl-C reaches only cfctl.
            starting = asyncio.ensure_future(asyncio.to_thread(server.start, detach=True))
            try:
                await asyncio.shield(starting)
            except asyncio.CancelledError:
                with contextlib.suppress(CflowError):
                    await starting
                raise
            url = server.url
            out.print(f"started an embedded nats-server at {url} (data in {server_dir})")
        else:
            out.print(f"using the NATS server at {url}")
        name = opts.swarm or f"demo-{uuid.uuid4().hex[:8]}"
        rng = random.Random(opts.seed)  # noqa: S311 - task durations, not secrets
        plan = plan_dag(opts.tasks, opts.work_s, rng)
        async with Swarm.connect(url, swarm=name, agent="demo") as swarm:
            demo = Demo(opts, swarm, url, out)
            demo.interrupted = signals
            demo.first_seq = await swarm.log.stream_last_seq() + 1
            await swarm.tasks.ensure_board()
            out.print(f"swarm [bold]{name}[/]: creating {len(plan.titles)} tasks "
                      f"(plan -> builds -> tests -> release), lease TTL "
                      f"{opts.lease_ttl_s:g} s; starting {_n(opts.agents, 'worker')}")
            await demo.create_tasks(plan)
            demo.started = time.monotonic()
            background: list[asyncio.Task[Any]] = []
            try:
                demo.start_workers(work)
                background = [asyncio.create_task(swarm.tasks.maintain()),
                              asyncio.create_task(demo.follow_events())]
                demo.live = opts.live and out.is_terminal
                live_ctx = (Live(demo.render(), console=out, refresh_per_second=8,
                                 transient=False)
                            if demo.live else contextlib.nullcontext())
                with live_ctx as live:
                    await demo.wait_done(live)
            finally:
                stopped["workers"] = await demo.stop_workers(now=bool(signals))
                for t in background:
                    t.cancel()
                for t in background:
                    with contextlib.suppress(asyncio.CancelledError, CflowError):
                        await t
            counts = demo.counts()
            try:
                summary = await summary_from_projection(swarm, work)
            except (ImportError, CflowError) as exc:
                out.print(f"(projection unavailable: {exc}; folding the event log instead)")
                summary = await summary_from_log(swarm, demo.task_ids)
            summary.update(swarm=name, tasks=len(demo.task_ids), blocked=counts["blocked"],
                           agents=opts.agents, killed=demo.killed,
                           wall_s=time.monotonic() - wall, url=url)
            print_summary(out, summary)
            return summary
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
            stopped["server"] = True
        for d in (server_dir, work):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
