"""A watcher that kills a worker's commands, whole process groups, when the worker dies.

A ``--exec`` command runs in its own process group, and ``PR_SET_PDEATHSIG``
kills its shell when the worker is killed -9. What the shell started (``cd repo
&& make``, a pipeline, anything in the background) is not covered by that: it
would keep working on a task whose lease then expires and which another worker
claims, two executions of one task at once.

So each worker process starts one small watcher the first time it runs a
command: ``python -S -E -c <_WATCHER>``, in a session of its own (a terminal's
Ctrl-C does not reach it), reading lines from a pipe whose only writer is the
worker. The worker writes ``+PGID`` when a command starts and ``-PGID`` when it
is over. When the pipe reaches end of file, the worker is gone, however it
died: the watcher sends SIGKILL to every group still listed, and exits. A
worker that stops normally has listed none by then.

If the watcher cannot be started (no fork, no interpreter), commands run as
before and the lease fencing still refuses whatever they report late.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from typing import IO

log = logging.getLogger(__name__)

_WATCHER = r"""
import os, signal, sys
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
groups = set()
for line in sys.stdin.buffer:
    try:
        pgid = int(line[1:])
    except ValueError:
        continue
    if line[:1] == b"+":
        groups.add(pgid)
    else:
        groups.discard(pgid)
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


class GroupGuard:
    """This process's watcher (started on first use) and the groups it is told of."""

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

    def watch(self, pgid: int) -> None:
        """Kill process group ``pgid`` if this process dies before :meth:`forget`."""
        self._send(b"+%d\n" % pgid)

    def forget(self, pgid: int) -> None:
        self._send(b"-%d\n" % pgid)


guard = GroupGuard()

__all__ = ["GroupGuard", "guard"]
