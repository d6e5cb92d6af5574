"""A watcher that kills a worker's commands (process groups, containers) when the worker dies.

A ``--exec`` command runs in its own process group, and ``PR_SET_PDEATHSIG``
kills its shell when the worker is killed -9. What the shell started (``cd repo
&& make``, a pipeline, anything in the background) is not covered by that: it
would keep working on a task whose lease then expires and which another worker
claims, two executions of one task at once.

So each worker process starts one small watcher the first time it runs a
command: ``python -S -E -c <_WATCHER>``, in a session of its own (a terminal's
Ctrl-C does not reach it), reading lines from a pipe whose only writer is the
worker. The worker writes ``+group PGID`` when a command starts and ``-group PGID``
when it is over (``+container ID`` / ``-container ID`` for ``--docker``). When
the pipe reaches end of file, the worker is gone, however it died: the watcher
sends SIGKILL to every group still listed, force-removes every container still
listed through Docker's API (``DOCKER_HOST``, a unix socket or plain TCP), and
exits. A worker that stops normally has listed none by then.

The same holds for ``--docker``: a container keeps running when the worker that
waits for it is killed. If the watcher cannot be started (no fork, no
interpreter), commands run as before and the lease fencing still refuses
whatever they report late.

A worker that is alive but frozen (SIGSTOP, a blocked event loop, a stalled VM
process) cannot stop its commands when its lease runs out either, and the server
would hand the task to someone else while they run. So a command started while
a lease is held (:meth:`DeathWatch.holding`) is also given the time by which it
must be dead (``@group PGID T``, T on the machine's monotonic clock, moved on
every renewal): half-way through the margin between the holder's own deadline
and the server's expiry. The watcher kills it then, whatever became of the
worker; a worker that stops it itself (SIGTERM, then SIGKILL after a grace) has
usually done so by then, and the watcher's SIGKILL also ends a command that
ignores SIGTERM before the lease can be taken over.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import IO

log = logging.getLogger(__name__)

_WATCHER = r"""
import math, os, select, signal, socket, sys, time
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
held = {"group": {}, "container": {}}  # name -> monotonic time it must be dead by


def end(kind, name):
    if kind == "group":
        try:
            os.killpg(int(name), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        return
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        if host.startswith("unix://"):
            conn = socket.socket(socket.AF_UNIX)
            conn.settimeout(10)
            conn.connect(host[len("unix://"):])
        elif host.startswith("tcp://") and not os.environ.get("DOCKER_TLS_VERIFY"):
            address, _, port = host[len("tcp://"):].rstrip("/").rpartition(":")
            conn = socket.create_connection((address, int(port)), timeout=10)
        else:
            return
        with conn:
            conn.sendall(b"DELETE /containers/%s?force=1 HTTP/1.0\r\nHost: docker\r\n\r\n"
                         % name.encode())
            conn.recv(1024)
    except (OSError, ValueError):
        pass


fd, pending = sys.stdin.fileno(), b""
while True:  # "+group 123", "@group 123 4567.25", "-container abc..."
    due = min((t for names in held.values() for t in names.values()), default=math.inf)
    wait = None if due == math.inf else max(0.0, due - time.monotonic())
    if select.select([fd], [], [], wait)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            head, name, when = (line.decode(errors="replace").split() + ["", "", ""])[:3]
            op, names = head[:1], held.get(head[1:])
            if names is None or not name:
                continue
            if op == "+":
                names[name] = math.inf
            elif op == "-":
                names.pop(name, None)
            elif op == "@" and name in names:
                try:
                    names[name] = float(when)
                except ValueError:
                    pass
    now = time.monotonic()
    for kind, names in held.items():
        for name in [n for n, t in names.items() if t <= now]:
            del names[name]
            end(kind, name)
for kind, names in held.items():
    for name in names:
        end(kind, name)
"""


class Holding:
    """The commands started under one lease, and the time they must be dead by."""

    def __init__(self, watch: DeathWatch, kill_by: float) -> None:
        self._watch = watch
        self.kill_by = kill_by
        self.held: set[tuple[str, str]] = set()  # (kind, name): ("group", "123")

    def move(self, kill_by: float) -> None:
        """The lease was renewed: its commands may live until ``kill_by``."""
        if abs(kill_by - self.kill_by) < 0.001:
            return
        self.kill_by = kill_by
        if self.held:
            self._watch._send("".join(_kill_by(kind, name, kill_by)
                                      for kind, name in list(self.held)).encode())


def _kill_by(kind: str, name: str, kill_by: float) -> str:
    """The watcher's line giving a command (or container) the time it must be dead by."""
    return f"@{kind} {name} {kill_by:.6f}\n" if math.isfinite(kill_by) else ""


_holding: contextvars.ContextVar[Holding | None] = contextvars.ContextVar(
    "cflow_guard_holding", default=None)


class DeathWatch:
    """This process's watcher (started on first use), told of the groups and containers."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # executors may run commands from several threads
        self._unavailable = False

    @property
    def pid(self) -> int | None:
        """The watcher's pid, once started (tests kill around it)."""
        return self._proc.pid if self._proc is not None else None

    def _pipe(self) -> IO[bytes] | None:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.stdin
        if self._unavailable:
            return None
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-S", "-E", "-c", _WATCHER], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                close_fds=True)
        except OSError as exc:
            self._unavailable = True
            log.warning("cannot start the command watcher (%s): a command's background "
                        "processes may outlive a killed worker", exc)
            return None
        return self._proc.stdin

    def _send(self, line: bytes) -> None:
        with self._lock:
            for _ in range(2):  # a watcher that died is started again once
                pipe = self._pipe()
                if pipe is None:
                    return
                try:
                    pipe.write(line)
                    pipe.flush()
                    return
                except OSError:  # BrokenPipeError: it died
                    self._proc = None

    @contextlib.contextmanager
    def holding(self, kill_by: float) -> Iterator[Holding]:
        """Commands watched inside the block (and in tasks created inside it) are killed
        at ``kill_by`` (monotonic), moved with :meth:`Holding.move`, even if this
        process is frozen by then."""
        held = Holding(self, kill_by)
        token = _holding.set(held)
        try:
            yield held
        finally:
            _holding.reset(token)

    def watch_group(self, pgid: int) -> None:
        """Kill process group ``pgid`` if this process dies before :meth:`forget_group`
        (or its lease's time is up: :meth:`holding`)."""
        self._watch("group", str(pgid))

    def forget_group(self, pgid: int) -> None:
        self._forget("group", str(pgid))

    def watch_container(self, container_id: str) -> None:
        """Force-remove the container (Docker's API at ``DOCKER_HOST``) if this process
        dies before :meth:`forget_container` (or its lease's time is up)."""
        self._watch("container", container_id)

    def forget_container(self, container_id: str) -> None:
        self._forget("container", container_id)

    def _watch(self, kind: str, name: str) -> None:
        line = f"+{kind} {name}\n"
        held = _holding.get()
        if held is not None:
            held.held.add((kind, name))
            line += _kill_by(kind, name, held.kill_by)
        self._send(line.encode())

    def _forget(self, kind: str, name: str) -> None:
        held = _holding.get()
        if held is not None:
            held.held.discard((kind, name))
        self._send(f"-{kind} {name}\n".encode())


guard = DeathWatch()

__all__ = ["DeathWatch", "Holding", "guard"]
