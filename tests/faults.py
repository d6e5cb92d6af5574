"""Fault injection for chaos tests: partitions, clock skew, server loss, executions.

Used by ordinary pytest tests (``from faults import Proxy, ...``; pytest puts
``tests/`` on the path). Every piece starts real things and is stopped by its
owner in ``finally`` (or by using it as a context manager):

- :class:`Proxy`: a TCP proxy between clients and nats-server, run on its own
  thread (so ``cfctl`` subprocesses and in-process clients can both go through
  it, whatever the test's event loop does). ``blackhole()`` is a silent
  partition (bytes accepted, nothing forwarded, connections stay open; what was
  held is delivered on ``heal()``, as TCP would after a partition shorter than
  its retransmission timeout), ``delay(ms)`` adds latency per direction,
  ``cut()`` closes every current connection, ``down()`` also refuses new ones
  (the server seems dead to these clients only), ``heal()`` undoes it all.
- Clock skew for a whole process with libfaketime (Debian package ``faketime``):
  :func:`skewed_env` shifts the wall clock of a child (``time.time()``);
  timers keep their real speed. :func:`require_faketime` skips without it
  (fails as root in CI, where .ci/run installs it).
- :class:`RestartableServer`: nats-server kill -9 and restart on the same port
  and store directory.
- :class:`Cluster`: three servers on loopback; :func:`stream_leader`,
  :func:`step_down` (``$JS.API.STREAM.LEADER.STEPDOWN``) and
  :meth:`Cluster.kill_leader` change a stream's leader.
- :class:`ExecutionLog`: the recorder a ``cfctl worker --exec`` runs for each
  task; it appends ``start`` / ``end`` lines from the executor's side, and a
  watcher process it forks adds a ``dead`` line when the execution's process is
  gone (also after SIGKILL). :meth:`ExecutionLog.executions` turns them into
  per-run intervals on the machine's monotonic clock.
- :class:`WorkerProcess`: one ``cfctl worker`` subprocess (optionally skewed,
  optionally through a proxy) that can be killed -9.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from cflow import events as ev
from cflow.errors import CflowError
from cflow.server import EmbeddedServer, ServerOptions, free_port, start_cluster
from cflow.streams import EventLog, StoredEvent, names
from cflow.streams.client import api_request

CFCTL = [sys.executable, "-c", "from cflow.cli import main; main()"]


def in_ci() -> bool:
    """What .ci/run calls CI: there, as root, it installs what the chaos tests need."""
    return os.environ.get("CI") == "true" or os.environ.get("CFLOW_CI_DOCKER") == "1"


# ====================================================================== TCP proxy


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for writer in (self.client, self.upstream):
            transport = writer.transport
            if transport is not None and not transport.is_closing():
                transport.abort()


class Proxy:
    """A TCP proxy to ``upstream`` (a ``nats://host:port`` URL) on its own thread.

    ``url`` is what clients connect to. Control calls (``blackhole``, ``delay``,
    ``cut``, ``heal``) are in effect when they return.
    """

    def __init__(self, upstream: str, *, name: str = "proxy") -> None:
        parts = urlsplit(upstream if "://" in upstream else f"nats://{upstream}")
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 4222)
        self.name = name
        self.port = 0
        self.accepted = 0
        self.forwarded = 0  # bytes delivered, both directions
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._links: set[_Link] = set()
        self._flowing: asyncio.Event | None = None
        self._delay_s = 0.0
        self._failure: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """Client connections currently open through the proxy."""
        return sum(1 for link in list(self._links) if not link.closed)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Proxy:
        ready = threading.Event()

        def main() -> None:
            try:
                asyncio.run(self._main(ready))
            except BaseException as exc:  # reported to start() if it never got going
                self._failure = exc
            finally:
                ready.set()

        self._thread = threading.Thread(target=main, name=f"faults-{self.name}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if self._failure is not None or self._loop is None:
            raise RuntimeError(f"proxy {self.name} did not start: {self._failure!r}")
        return self

    def stop(self) -> None:
        loop, thread, stopping = self._loop, self._thread, self._stopping
        if loop is None or thread is None or stopping is None or not thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(stopping.set)
        thread.join(10)

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- faults

    def blackhole(self) -> None:
        """Silent partition: keep accepting bytes both ways, deliver none, close nothing."""
        self._call(self._set(flowing=False))

    def delay(self, ms: float) -> None:
        """Deliver every chunk ``ms`` milliseconds after it arrived (each direction)."""
        self._call(self._set(delay_s=ms / 1000))

    def cut(self) -> None:
        """Close every current connection (both sides); new ones are accepted."""
        self._call(self._cut())

    def down(self) -> None:
        """An outage as the client sees a dead server: connections cut, new ones refused
        (the proxy stops listening until ``heal()``)."""
        self._call(self._down())

    def heal(self) -> None:
        """No partition, no delay, no outage; held bytes are delivered in order."""
        self._call(self._set(flowing=True, delay_s=0.0))
        self._call(self._up())

    async def wait_connections(self, n: int = 1, within: float = 15.0) -> None:
        """Until at least ``n`` clients are connected (the proxy has no event to await)."""
        async with asyncio.timeout(within):
            while self.connections < n:
                await asyncio.sleep(0.05)

    # ------------------------------------------------------- on the thread

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None, "proxy not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _main(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self._down()
            # Let every handler see its connection closed and return: a handler
            # cancelled by asyncio.run's cleanup makes Python 3.11 log an error.
            if self._handlers:
                await asyncio.wait(set(self._handlers), timeout=6.0)

    async def _down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._cut()

    async def _up(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _set(self, *, flowing: bool | None = None, delay_s: float | None = None) -> None:
        assert self._flowing is not None
        if delay_s is not None:
            self._delay_s = delay_s
        if flowing is True:
            self._flowing.set()
        elif flowing is False:
            self._flowing.clear()

    async def _cut(self) -> None:
        for link in list(self._links):
            link.close()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter
                      ) -> None:
        self.accepted += 1
        me = asyncio.current_task()
        assert me is not None
        self._handlers.add(me)
        try:
            try:
                ureader, uwriter = await asyncio.wait_for(
                    asyncio.open_connection(*self.upstream), 5.0)
            except (OSError, TimeoutError):
                return  # upstream down: the client sees its session refused
            link = _Link(cwriter, uwriter)
            self._links.add(link)
            try:
                await asyncio.gather(self._pump(creader, uwriter, link),
                                     self._pump(ureader, cwriter, link),
                                     return_exceptions=True)
            finally:
                link.close()
                self._links.discard(link)
        finally:
            if not cwriter.transport.is_closing():
                cwriter.transport.abort()
            self._handlers.discard(me)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    link: _Link) -> None:
        """Read as fast as the sender writes; deliver when flowing and due."""
        assert self._flowing is not None
        flowing = self._flowing
        loop = asyncio.get_running_loop()
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def receive() -> None:
            while True:
                try:
                    data = await reader.read(65536)
                except (ConnectionError, OSError):
                    data = b""
                held.put_nowait((loop.time() + self._delay_s, data))
                if not data:
                    return

        receiving = asyncio.create_task(receive())
        try:
            while True:
                due, data = await held.get()
                await flowing.wait()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)  # injected latency
                    await flowing.wait()
                if not data or link.closed:
                    link.close()  # one side closed: NATS has no half-closed connections
                    return
                writer.write(data)
                await writer.drain()
                self.forwarded += len(data)
        except (ConnectionError, OSError):
            link.close()
        finally:
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiving


@contextlib.contextmanager
def proxies(upstream: str, n: int) -> Iterator[list[Proxy]]:
    """``n`` started proxies to ``upstream``, stopped on exit."""
    started: list[Proxy] = []
    try:
        for i in range(n):
            started.append(Proxy(upstream, name=f"proxy{i}").start())
        yield started
    finally:
        for proxy in started:
            proxy.stop()


# ===================================================================== clock skew

FAKETIME_LIBS = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
)


def faketime_library() -> Path | None:
    """libfaketime's preload library (the multi-threaded build first), if installed."""
    override = os.environ.get("CFLOW_FAKETIME_LIB")
    candidates = (override, *FAKETIME_LIBS) if override else FAKETIME_LIBS
    return next((Path(p) for p in candidates if p and Path(p).exists()), None)


def require_faketime() -> Path:
    """The library, or skip the test with the reason.

    As root in CI the skip becomes a failure: .ci/run installs the library there.
    """
    lib = faketime_library()
    if lib is not None:
        return lib
    reason = ("libfaketime not installed (Debian: apt-get install faketime; "
              ".ci/run installs it as root in CI)")
    if in_ci() and os.geteuid() == 0:
        pytest.fail(reason)
    pytest.skip(reason)


def skewed_env(env: dict[str, str], offset_s: float) -> dict[str, str]:
    """``env`` for a child whose wall clock is ``offset_s`` seconds off (+ ahead, - behind).

    The offset is fixed from the child's start and inherited by its children (a
    worker's executions see the same skewed wall clock). libfaketime 0.9.10
    moves ``CLOCK_MONOTONIC`` along (by the same constant, at the same rate):
    with ``FAKETIME_DONT_FAKE_MONOTONIC=1`` it breaks ``time.sleep()``
    (EINVAL from clock_nanosleep). A process only compares its own monotonic
    readings, so that is harmless; only the execution recorder compares them
    across processes, and it re-executes itself without libfaketime.
    """
    lib = require_faketime()
    preload = " ".join(p for p in (str(lib), env.get("LD_PRELOAD", "")) if p)
    return {**env, "LD_PRELOAD": preload, "FAKETIME": f"{offset_s:+.0f}s"}


# ================================================================ server restart


class RestartableServer:
    """A single nats-server that can be killed -9 and started again, same port and store.

    ``sync="always"`` by default: a kill -9 must not be confused with losing
    acknowledged writes to an fsync interval.
    """

    def __init__(self, data_dir: Path, *, port: int | None = None, sync: str = "always",
                 name: str = "restartable") -> None:
        self.server = EmbeddedServer(ServerOptions(
            port=port or free_port(), data_dir=data_dir, sync=sync, server_name=name))
        self.kills = 0

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int | None:
        proc = self.server.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self) -> RestartableServer:
        self.server.start()
        return self

    def kill9(self) -> None:
        """SIGKILL, and wait until the process is gone (its port is free again)."""
        self.server.kill()
        self.kills += 1

    def restart(self, timeout: float = 20.0) -> None:
        """Start again on the same port with the same store directory."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.server.start(timeout=timeout)
                return
            except CflowError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # the old listener may linger a moment after SIGKILL

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> RestartableServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ======================================================================== cluster


class Cluster:
    """Three servers on loopback with distinct client and route ports."""

    name = "faults"
    monitored = False  # serve /jsz etc. on an http port

    def __init__(self, base: Path, size: int = 3, *, sync: str = "default") -> None:
        self.base, self.size, self.sync = base, size, sync
        self.servers: list[EmbeddedServer] = self._build()

    def _build(self) -> list[EmbeddedServer]:
        """Servers on freshly picked ports (called again if a port was taken meanwhile)."""
        ports = [(free_port(), free_port()) for _ in range(self.size)]
        self.servers = []
        for i, (port, cport) in enumerate(ports):
            routes = tuple(f"nats://127.0.0.1:{c}" for j, (_, c) in enumerate(ports) if j != i)
            self.servers.append(EmbeddedServer(ServerOptions(
                port=port, data_dir=self.base / f"n{i}", sync=self.sync, server_name=f"n{i}",
                cluster_name=self.name, cluster_port=cport, routes=routes,
                http_port=free_port() if self.monitored else None,
            )))
        return self.servers

    @property
    def urls(self) -> str:
        return ",".join(s.url for s in self.servers)

    def by_name(self, name: str) -> EmbeddedServer:
        return next(s for s in self.servers if s.opts.server_name == name)

    def start(self) -> Cluster:
        self.servers = start_cluster(self._build)
        return self

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def kill_leader(self, nc: Any, stream: str, within_s: float = 10.0) -> EmbeddedServer:
        """kill -9 the server leading ``stream``; returns it (``.start()`` brings it back)."""
        leader = await stream_leader(nc, stream, within_s)
        server = self.by_name(leader)
        server.kill()
        return server


async def stream_leader(nc: Any, stream: str, within_s: float = 10.0,
                        not_: str | None = None) -> str:
    """Name of the server leading ``stream`` (once there is one, other than ``not_``)."""
    deadline = time.monotonic() + within_s
    last: object = "no answer"
    while True:
        try:
            info = await api_request(nc, f"$JS.API.STREAM.INFO.{stream}", timeout=1.0)
            leader = (info.get("cluster") or {}).get("leader")
            if leader and leader != not_:
                return str(leader)
            last = f"leader {leader!r}"
        except CflowError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"no leader for {stream} within {within_s} s ({last})")
        await asyncio.sleep(0.2)  # elections publish nothing a client can await


async def step_down(nc: Any, stream: str, within_s: float = 20.0) -> tuple[str, str]:
    """Make ``stream``'s leader step down; returns (old leader, new leader)."""
    old = await stream_leader(nc, stream, within_s)
    await api_request(nc, f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", timeout=5.0)
    new = await stream_leader(nc, stream, within_s, not_=old)
    return old, new


# ============================================================ execution recorder

RECORDER_SOURCE = r'''
"""Execution recorder: run by `cfctl worker --exec` for each task (see tests/faults.py).

argv: LOG SECONDS. The task body may be JSON: {"seconds": S, "fail_attempts": N,
"ignore_term": true} (exit 1 while CFLOW_TASK_ATTEMPT <= N; SIGTERM ignored).
Lines (monotonic clock of the machine):
  start TASK PID MONO WALL EPOCH ATTEMPT AGENT
  end   TASK PID MONO HOW        (HOW: exit-CODE or signal-N)
  dead  TASK PID MONO            (from a watcher process, once PID is gone)
"""
import json, os, select, signal, sys, time

env = os.environ
if "faketime" in env.get("LD_PRELOAD", ""):
    # Under libfaketime the monotonic clock is shifted too: it would not compare
    # with other processes' readings. Same pid, same stdin, real clocks.
    clean = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
    os.execve(sys.executable, [sys.executable, *sys.argv], clean)

log_path, default_seconds = sys.argv[1], float(sys.argv[2])
task = env.get("CFLOW_TASK_ID", "-")
epoch = env.get("CFLOW_EPOCH", "0")
attempt = int(env.get("CFLOW_TASK_ATTEMPT", "1") or 1)
agent = env.get("CFLOW_AGENT", "-") or "-"
fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def note(*fields):
    os.write(fd, (" ".join(str(f) for f in fields) + "\n").encode())


def mono():
    return f"{time.monotonic():.6f}"


def watch(parent):
    """Fork a watcher outside the process group: it notes when `parent` is gone."""
    try:
        pidfd = os.pidfd_open(parent)
    except (AttributeError, OSError):
        pidfd = None
    if os.fork() != 0:
        if pidfd is not None:
            os.close(pidfd)
        return
    try:
        os.setsid()  # the worker kills its task's process group, not us
        null = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):  # never hold the worker's pipes open
            os.dup2(null, target)
        if pidfd is not None:
            select.select([pidfd], [], [])
        else:
            while os.getppid() == parent:
                time.sleep(0.02)
        note("dead", task, parent, mono())
    finally:
        os._exit(0)


pid = os.getpid()
watch(pid)
try:
    body = sys.stdin.read()
except OSError:
    body = ""
try:
    spec = json.loads(body) if body.strip().startswith("{") else {}
except ValueError:
    spec = {}
seconds = float(spec.get("seconds", default_seconds))
fail_attempts = int(spec.get("fail_attempts", 0))


def stopped(signum, frame):
    note("end", task, pid, mono(), f"signal-{signum}")
    os._exit(128 + signum)


signal.signal(signal.SIGTERM, signal.SIG_IGN if spec.get("ignore_term") else stopped)
signal.signal(signal.SIGINT, stopped)
note("start", task, pid, mono(), f"{time.time():.6f}", epoch, attempt, agent)
deadline = time.monotonic() + seconds
while (left := deadline - time.monotonic()) > 0:
    time.sleep(min(left, 0.25))
code = 1 if attempt <= fail_attempts else 0
note("end", task, pid, mono(), f"exit-{code}")
if code:
    sys.stderr.write(f"failing attempt {attempt} on purpose\n")
else:
    sys.stdout.write(f"ran {task} attempt {attempt}\n")
sys.stdout.flush()
os._exit(code)
'''


@dataclass(frozen=True)
class Execution:
    """One run of one task, seen from the executor: [start, end] on the monotonic clock."""

    task_id: str
    pid: int
    agent: str
    epoch: int
    attempt: int
    start: float
    end: float | None  # None: still running
    how: str | None  # exit-N, signal-N, dead (gone without a word: SIGKILL), None
    wall_start: float  # the machine's wall clock (the recorder never runs skewed)

    def until(self, now: float | None = None) -> float:
        return self.end if self.end is not None else (now or time.monotonic())

    def overlap(self, other: Execution, now: float | None = None) -> float:
        """Seconds both ran at the same time (0 if they did not)."""
        return max(0.0, min(self.until(now), other.until(now)) - max(self.start, other.start))


def parse_executions(lines: Iterable[str]) -> list[Execution]:
    """Executions from recorder lines, in start order.

    An execution ends at its ``end`` line or, if it never wrote one (SIGKILL),
    when its watcher saw the process gone: whichever came first.
    """
    starts: dict[int, list[str]] = {}
    ends: dict[int, tuple[float, str]] = {}
    order: list[int] = []
    for line in lines:
        parts = line.split()
        if not parts:
            continue
        kind = parts[0]
        if kind == "start" and len(parts) >= 8:
            pid = int(parts[2])
            starts[pid] = parts
            order.append(pid)
        elif kind in ("end", "dead") and len(parts) >= 4:
            pid, at = int(parts[2]), float(parts[3])
            how = parts[4] if kind == "end" and len(parts) > 4 else "dead"
            if pid not in ends or at < ends[pid][0]:
                ends[pid] = (at, how)
    out = []
    for pid in order:
        p = starts[pid]
        end = ends.get(pid)
        out.append(Execution(
            task_id=p[1], pid=pid, start=float(p[3]), wall_start=float(p[4]), epoch=int(p[5]),
            attempt=int(p[6]), agent=" ".join(p[7:]), end=end[0] if end else None,
            how=end[1] if end else None))
    return out


class ExecutionLog:
    """Where the recorder writes; ``command()`` is the ``--exec`` that records into it."""

    def __init__(self, directory: Path, name: str = "executions") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{name}.log"
        self.script = directory / "recorder.py"
        self.script.write_text(RECORDER_SOURCE)
        self.path.touch()

    def command(self, seconds: float = 1.0) -> str:
        """Shell command for ``cfctl worker --exec`` (``exec``: no shell stays in between)."""
        return " ".join(["exec", shlex.quote(sys.executable), shlex.quote(str(self.script)),
                         shlex.quote(str(self.path)), f"{seconds:g}"])

    @staticmethod
    def body(seconds: float | None = None, fail_attempts: int = 0,
             ignore_term: bool = False) -> str:
        """A task body the recorder obeys."""
        spec: dict[str, float | int | bool] = {"fail_attempts": fail_attempts}
        if seconds is not None:
            spec["seconds"] = seconds
        if ignore_term:
            spec["ignore_term"] = True
        return json.dumps(spec)

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines()

    def executions(self, task_id: str | None = None) -> list[Execution]:
        found = parse_executions(self.lines())
        return [e for e in found if task_id is None or e.task_id == task_id]

    def by_task(self) -> dict[str, list[Execution]]:
        out: dict[str, list[Execution]] = {}
        for e in self.executions():
            out.setdefault(e.task_id, []).append(e)
        return out

    def overlaps(self, now: float | None = None) -> list[tuple[float, Execution, Execution]]:
        """Every pair of executions of one task that ran at the same time, longest first."""
        found = []
        for runs in self.by_task().values():
            for a, b in itertools.combinations(runs, 2):
                if (o := a.overlap(b, now)) > 0:
                    found.append((o, a, b))
        return sorted(found, key=lambda x: -x[0])

    def max_overlap(self, now: float | None = None) -> float:
        found = self.overlaps(now)
        return found[0][0] if found else 0.0

    def running(self) -> list[Execution]:
        return [e for e in self.executions() if e.end is None]

    async def wait(self, predicate: Callable[[list[Execution]], Any], within: float = 20.0,
                   what: str = "executions") -> Any:
        """Until ``predicate(executions)`` is truthy; returns its value.

        Other processes append to the file: there is no event to await, so poll.
        """
        deadline = time.monotonic() + within
        while True:
            value = predicate(self.executions())
            if value:
                return value
            if time.monotonic() > deadline:
                shown = "\n".join(self.lines()[-20:])
                raise AssertionError(f"not within {within} s: {what}; log tail:\n{shown}")
            await asyncio.sleep(0.05)

    def kill_running(self) -> None:
        """SIGKILL executions still running (test teardown: nothing outlives the test)."""
        for e in self.running():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(e.pid, signal.SIGKILL)


# ================================================================= worker fleet


class WorkerProcess:
    """One ``cfctl worker`` subprocess; its stderr (event lines) goes to ``log_path``."""

    def __init__(self, name: str, env: dict[str, str], command: str, logdir: Path,
                 *extra: str, concurrency: int = 1, lease_ttl: float | None = None,
                 capabilities: Iterable[str] = (), drain_grace: float = 2.0) -> None:
        self.name = name
        self.env = {**env, "CFLOW_AGENT": name}
        self.log_path = logdir / f"{name}.log"
        argv = [*CFCTL, "worker", "--name", name, "--exec", command,
                "--concurrency", str(concurrency), "--drain-grace", f"{drain_grace:g}"]
        if lease_ttl is not None:
            argv += ["--lease-ttl", f"{lease_ttl:g}"]
        for cap in capabilities:
            argv += ["--capability", cap]
        self.argv = [*argv, *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def wait_output(self, text: str, within: float = 30.0) -> None:
        """Until the worker printed ``text`` (its log is a file: poll)."""
        deadline = time.monotonic() + within
        while text not in self.output():
            if not self.alive:
                raise AssertionError(f"worker {self.name} exited:\n{self.output()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {self.name} did not print {text!r} within "
                                     f"{within} s:\n{self.output()[-2000:]}")
            await asyncio.sleep(0.05)

    async def wait_ready(self, within: float = 30.0) -> None:
        """Registered, present and claiming."""
        await self.wait_output(f"[{self.name}] start:", within)

    def kill9(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (drain), then SIGKILL if it does not exit within ``timeout``."""
        if self.proc is None:
            return
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def fleet(workers: Iterable[WorkerProcess], *logs: ExecutionLog,
          stop_timeout: float = 10.0) -> Iterator[list[WorkerProcess]]:
    """Start the workers; on exit stop every one of them and kill leftover executions."""
    started: list[WorkerProcess] = []
    try:
        for w in workers:
            started.append(w.start())
        yield started
    finally:
        for w in started:
            w.terminate()
        deadline = time.monotonic() + stop_timeout
        for w in started:
            w.stop(max(0.1, deadline - time.monotonic()))
        for log in logs:
            log.kill_running()


# ============================================================== event-log checks


async def task_events(log: EventLog) -> list[StoredEvent]:
    """Every task event of the swarm, in stream order."""
    return [i for i in await log.read(names.events_filter(log.swarm, "task"))
            if isinstance(i, StoredEvent)]


def by_task(items: Iterable[StoredEvent]) -> dict[str, list[StoredEvent]]:
    out: dict[str, list[StoredEvent]] = {}
    for item in items:
        out.setdefault(item.event.entity_id, []).append(item)
    return out


def completions(items: Iterable[StoredEvent]) -> Counter[str]:
    """Accepted completions per task."""
    return Counter(i.event.entity_id for i in items if isinstance(i.event.data, ev.TaskCompleted))


def of_type(items: Iterable[StoredEvent], kind: type[Any]) -> list[StoredEvent]:
    return [i for i in items if isinstance(i.event.data, kind)]


def timeline(items: Iterable[StoredEvent]) -> str:
    """A task's events, one per line, for assertion messages."""
    return "\n".join(f"  {i.seq} {i.event.type} by {i.event.actor} {i.event.data}"
                     for i in items)


__all__ = [
    "CFCTL",
    "Cluster",
    "Execution",
    "ExecutionLog",
    "Proxy",
    "RestartableServer",
    "WorkerProcess",
    "by_task",
    "completions",
    "faketime_library",
    "fleet",
    "in_ci",
    "of_type",
    "parse_executions",
    "proxies",
    "require_faketime",
    "skewed_env",
    "step_down",
    "stream_leader",
    "task_events",
    "timeline",
]
