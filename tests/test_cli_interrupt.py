"""Ctrl-C of the long-running commands, as a terminal sends it: SIGINT to the whole
foreground process group of a real `cfctl` subprocess.

Each must exit within 2 s, print no traceback, and leave none of the processes it
started (servers, workers, task processes) running.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cflow.server import free_port

pytestmark = pytest.mark.e2e

# SIGUSR1 dumps the threads' stacks of a cfctl that did not stop, SIGUSR2 the stacks of
# its asyncio tasks (an idle event loop shows only `select` in the first).
CFCTL = [sys.executable, "-c", """
import asyncio, faulthandler, signal, sys
faulthandler.register(signal.SIGUSR1, all_threads=True)
def tasks(*_):
    loop = asyncio.events._get_running_loop()
    for task in asyncio.all_tasks(loop) if loop else ():
        task.print_stack(limit=12, file=sys.stderr)
signal.signal(signal.SIGUSR2, tasks)
from cflow.cli import main
main()
"""]


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children in their own sessions included)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Session:
    """`cfctl ...` in its own session, as a shell job; output collected as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([*CFCTL, *args], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.out = {"stdout": b"", "stderr": b""}
        self.sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        os.set_blocking(self.proc.stderr.fileno(), False)
        self.sel.register(self.proc.stdout, selectors.EVENT_READ, "stdout")
        self.sel.register(self.proc.stderr, selectors.EVENT_READ, "stderr")

    def pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            chunk = key.fileobj.read()  # type: ignore[union-attr]
            if chunk:
                self.out[key.data] += chunk
            else:
                self.sel.unregister(key.fileobj)

    def text(self) -> str:
        return (self.out["stdout"] + self.out["stderr"]).decode(errors="replace")

    def wait_for(self, marker: str, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while marker not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.pump(0.1)
                if marker in self.text():
                    return
                raise AssertionError(f"no {marker!r} (rc {self.proc.poll()}):\n{self.text()}")
            self.pump(0.5)

    def interrupt(self, sig: int = signal.SIGINT) -> tuple[float, set[int]]:
        """Send ``sig`` to the job's process group; returns seconds to exit and the
        processes that were running below it when the signal went."""
        below = descendants(self.proc.pid)
        sent = time.monotonic()
        os.killpg(self.proc.pid, sig)
        deadline = sent + 10
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.pump(0.05)
        took = time.monotonic() - sent
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # faulthandler: where it hangs
            self.pump(0.5)
            self.proc.send_signal(signal.SIGUSR2)  # and where its tasks wait
            until = time.monotonic() + 3
            while time.monotonic() < until:
                self.pump(0.2)
            raise AssertionError(f"still running 10 s after the signal:\n{self.text()}")
        while self.sel.get_map():
            self.pump(1.0)
        return took, below

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for pid in descendants(self.proc.pid):
            os.kill(pid, signal.SIGKILL)
        self.sel.close()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def assert_clean_stop(s: Session, took: float, below: set[int], line: str | None) -> None:
    text = s.text()
    assert took <= 2.0, f"took {took:.2f} s:\n{text}"
    assert "Traceback" not in text and "retrying" not in text, text
    if line is not None:
        assert s.out["stderr"].decode().strip().splitlines()[-1] == line, text
    left = sorted(pid for pid in below if alive(pid))
    assert not left, f"still running: {left}\n{text}"


def test_ctrl_c_stops_the_demo_and_everything_it_started(tmp_path: Path) -> None:
    env = {**os.environ, "CFLOW_URL": f"nats://127.0.0.1:{free_port()}",
           "XDG_DATA_HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    s = Session(["demo", "--agents", "4", "--tasks", "20", "--work", "2", "--seed", "3"], env)
    try:
        s.wait_for("will retry")  # workers are running tasks
        assert len(descendants(s.proc.pid)) >= 5  # the server and 4 workers at least
        took, below = s.interrupt()
        assert s.proc.returncode == 130
        assert_clean_stop(s, took, below, "interrupted: stopped the server and 4 workers")
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("cflow-demo")]
    finally:
        s.close()


def test_sigterm_stops_the_demo(tmp_path: Path) -> None:
    env = {**os.environ, "CFLOW_URL": f"nats://127.0.0.1:{free_port()}",
           "XDG_DATA_HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    s = Session(["demo", "--agents", "2", "--tasks", "10", "--work", "2"], env)
    try:
        s.wait_for("will retry")
        below = descendants(s.proc.pid)
        sent = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)  # a supervisor, not a terminal: cfctl alone
        while s.proc.poll() is None and time.monotonic() < sent + 10:
            s.pump(0.05)
        took = time.monotonic() - sent
        while s.proc.poll() is not None and s.sel.get_map():
            s.pump(1.0)
        assert_clean_stop(s, took, below, "interrupted: stopped the server and 2 workers")
    finally:
        s.close()


def test_ctrl_c_stops_a_worker_and_releases_its_task(cli_env: dict[str, str]) -> None:
    task = subprocess.run([*CFCTL, "task", "add", "long job"], env=cli_env, capture_output=True,
                          text=True, check=True, timeout=60).stdout.strip()
    s = Session(["worker", "--name", "w-int", "--exec", "sleep 60"], cli_env)
    try:
        s.wait_for("claimed")
        deadline = time.monotonic() + 30
        while not any("sleep" in _cmdline(p) for p in descendants(s.proc.pid)):
            assert time.monotonic() < deadline, s.text()
            s.pump(0.05)  # a process starting is no event we could await
        took, below = s.interrupt()
        assert s.proc.returncode == 130
        assert_clean_stop(s, took, below, None)
        last = s.out["stderr"].decode().strip().splitlines()[-1]
        assert last.startswith("interrupted: stopped worker w-int (") and "1 released" in last
        shown = subprocess.run([*CFCTL, "task", "show", task], env=cli_env,
                               capture_output=True, text=True, timeout=60)
        assert "ready" in shown.stdout
    finally:
        s.close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_ctrl_c_stops_up_in_the_foreground(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}
    port = free_port()
    s = Session(["up", "--port", str(port), "--data-dir", str(tmp_path / "node")], env)
    try:
        s.wait_for("Ctrl-C stops it")
        assert any("nats-server" in _cmdline(p) for p in descendants(s.proc.pid))
        took, below = s.interrupt()
        assert s.proc.returncode == 130
        assert_clean_stop(s, took, below, "interrupted: stopped the server and the projector")
        assert not list((tmp_path / "node").glob("*.pid"))
    finally:
        s.close()


def test_ctrl_c_stops_the_projector(cli_env: dict[str, str], tmp_path: Path) -> None:
    s = Session(["projector", "--db", str(tmp_path / "p.duckdb")], cli_env)
    try:
        s.wait_for("projector: swarm")
        took, below = s.interrupt()
        assert s.proc.returncode == 130
        assert_clean_stop(s, took, below, "interrupted: stopped the projector")
    finally:
        s.close()


def test_ctrl_c_leaves_top(cli_env: dict[str, str]) -> None:
    subprocess.run([*CFCTL, "init"], env=cli_env, check=True, timeout=60, capture_output=True)
    s = Session(["--json", "top"], cli_env)  # a pipe gets JSON snapshots as they change
    try:
        s.wait_for("swarm")
        took, below = s.interrupt()
        assert s.proc.returncode == 130
        assert_clean_stop(s, took, below, None)
        last = s.out["stderr"].decode().strip().splitlines()[-1]
        assert json.loads(last) == {"interrupted": "left the live view", "exit_code": 130}
    finally:
        s.close()


def test_a_hung_shutdown_is_still_bounded_and_says_it_was_forced() -> None:
    # The clean stops above end well under 2 s; `exit_soon` stays only as the last
    # resort for a shutdown step that hangs (here: one that sleeps), and says so.
    hung = ("from cflow.cli.app import exit_soon; exit_soon('stopped the projector', 0.2); "
            "import time; time.sleep(30)")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", hung], capture_output=True, text=True,
                          timeout=30)
    assert time.monotonic() - started < 10
    assert done.returncode == 130
    assert done.stderr == ("interrupted: stopped the projector (forced after 0.2 s: "
                           "a shutdown step hung)\n")
