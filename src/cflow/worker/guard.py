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
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from typing import IO

log = logging.getLogger(__name__)

_WATCHER = r"""
import os, signal, socket, sys
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
held = {"group": set(), "container": set()}
for line in sys.stdin.buffer:  # "+group 123", "-container abc..."
    op, _, name = line.decode(errors="replace").strip().partition(" ")
    if op[1:] in held and name:
        (held[op[1:]].add if op[:1] == "+" else held[op[1:]].discard)(name)
for pgid in held["group"]:
    try:
        os.killpg(int(pgid), signal.SIGKILL)
    except (OSError, ValueError):
        pass
host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
for cid in held["container"]:
    try:
        if host.startswith("unix://"):
            conn = socket.socket(socket.AF_UNIX)
            conn.settimeout(10)
            conn.connect(host[len("unix://"):])
        elif host.startswith("tcp://") and not os.environ.get("DOCKER_TLS_VERIFY"):
            address, _, port = host[len("tcp://"):].rstrip("/").rpartition(":")
            conn = socket.create_connection((address, int(port)), timeout=10)
        else:
            continue
        with conn:
            conn.sendall(b"DELETE /containers/%s?force=1 HTTP/1.0\r\nHost: docker\r\n\r\n"
                         % cid.encode())
            conn.recv(1024)
    except (OSError, ValueError):
        pass
"""


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

    def watch_group(self, pgid: int) -> None:
        """Kill process group ``pgid`` if this process dies before :meth:`forget_group`."""
        self._send(b"+group %d\n" % pgid)

    def forget_group(self, pgid: int) -> None:
        self._send(b"-group %d\n" % pgid)

    def watch_container(self, container_id: str) -> None:
        """Force-remove the container (Docker's API at ``DOCKER_HOST``) if this process
        dies before :meth:`forget_container`."""
        self._send(b"+container %s\n" % container_id.encode())

    def forget_container(self, container_id: str) -> None:
        self._send(b"-container %s\n" % container_id.encode())


guard = DeathWatch()

__all__ = ["DeathWatch", "guard"]
