"""The console as child processes (`cfctl ui`, `cfctl projector`), started and stopped.

For the console's tests (``tests/ui_support.py``) and ``bench.ui_bench``; the
product never starts itself this way.
"""

from __future__ import annotations

import collections
import contextlib
import json
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path


def cfctl(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "cfctl"), *args]


_readers: dict[int, list[threading.Thread]] = {}


def first_line(proc: subprocess.Popen[str], stream: str, within: float, want: str) -> str:
    """The first line of ``stream`` containing ``want`` (a reader thread; no polling)."""
    lines: queue.Queue[str | None] = queue.Queue()
    pipe = getattr(proc, stream)

    def read() -> None:
        for line in pipe:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    _readers.setdefault(id(proc), []).append(reader)
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=within)
        except queue.Empty:
            raise RuntimeError(f"no {want!r} within {within} s: {seen}") from None
        if line is None:
            raise RuntimeError(f"process exited ({proc.wait()}): {seen}")
        seen.append(line)
        if want in line:
            return line


_tails: dict[int, collections.deque[str]] = {}


def drain(proc: subprocess.Popen[str], stream: str) -> None:
    """Read ``stream`` to its end in a thread, keeping its last lines (:func:`tail`):
    a pipe nobody reads fills up and blocks the child's next write."""
    kept: collections.deque[str] = _tails.setdefault(id(proc), collections.deque(maxlen=200))
    pipe = getattr(proc, stream)

    def read() -> None:
        for line in pipe:
            kept.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    _readers.setdefault(id(proc), []).append(reader)


def tail(proc: subprocess.Popen[str]) -> str:
    """The last lines a :func:`drain` kept (for a failing test's message)."""
    return "".join(_tails.get(id(proc), ()))


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL after 10 s; its reader threads joined, its pipes closed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for reader in _readers.pop(id(proc), []):
        reader.join(5)
    _tails.pop(id(proc), None)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def start_ui(env: dict[str, str], *args: str, within: float = 30.0
             ) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """`cfctl --json ui --port 0 ARGS` and its start-up line (url, token, login)."""
    proc = subprocess.Popen(cfctl("--json", "ui", "--port", "0", *args), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    drain(proc, "stderr")
    try:
        info = json.loads(first_line(proc, "stdout", within, '"login"'))
    except BaseException:
        stop(proc)
        raise
    return proc, info


@contextlib.contextmanager
def ui(env: dict[str, str], *args: str) -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    """:func:`start_ui`, stopped on exit."""
    proc, info = start_ui(env, *args)
    try:
        yield proc, info
    finally:
        stop(proc)


def spawn_projector(env: dict[str, str], workdir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(cfctl("projector", "--db", str(workdir / "p.duckdb")), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def projector_ready(proc: subprocess.Popen[str], within: float = 30.0) -> None:
    first_line(proc, "stderr", within, "projector: swarm")


def start_projector(env: dict[str, str], workdir: Path, within: float = 30.0
                    ) -> subprocess.Popen[str]:
    """`cfctl projector` on the console's swarm, once its query service answers."""
    proc = spawn_projector(env, workdir)
    try:
        projector_ready(proc, within)
    except BaseException:
        stop(proc)
        raise
    return proc
