"""The web console under test: a real projector and a real `cfctl ui`, as processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("CFLOW_TEST_ARTIFACTS", ROOT / ".test-artifacts")) / "ui"
CHROMIUM = (os.environ.get("CFLOW_CHROMIUM") or shutil.which("chromium")
            or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def cfctl(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "cfctl"), *args]


@dataclass
class Console:
    url: str
    token: str
    login: str
    swarm: str
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    workdir: Path = Path()

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def run(self, *args: str, timeout: float = 30.0) -> str:
        """Run `cfctl ARGS` against this swarm; its stdout (raises on a non-zero exit)."""
        done = subprocess.run(cfctl(*args), env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if done.returncode != 0:
            raise AssertionError(f"cfctl {' '.join(args)}: {done.returncode} {done.stderr}")
        return done.stdout.strip()


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
    seen = []
    while True:
        try:
            line = lines.get(timeout=within)
        except queue.Empty:
            raise AssertionError(f"no {want!r} within {within} s: {seen}") from None
        if line is None:
            raise AssertionError(f"process exited ({proc.wait()}): {seen}")
        seen.append(line)
        if want in line:
            return line


_readers: dict[int, list[threading.Thread]] = {}


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for reader in _readers.pop(id(proc), []):
        reader.join(5)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def start_ui(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    proc = subprocess.Popen(cfctl("--json", "ui", "--port", "0", *args), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(first_line(proc, "stdout", 30.0, '"login"'))
    except BaseException:
        stop(proc)
        raise
    return proc, info


async def _init(nats_url: str, swarm: str) -> None:
    from cflow.streams import connect, ensure_swarm

    nc = await connect(nats_url)
    try:
        await ensure_swarm(nc, swarm)
    finally:
        await nc.close()


def spawn_projector(env: dict[str, str], workdir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(cfctl("projector", "--db", str(workdir / "p.duckdb")), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def projector_ready(proc: subprocess.Popen[str]) -> None:
    first_line(proc, "stderr", 30.0, "projector: swarm")


def start_projector(env: dict[str, str], workdir: Path) -> subprocess.Popen[str]:
    """`cfctl projector` on the console's swarm, once its query service answers."""
    proc = spawn_projector(env, workdir)
    try:
        projector_ready(proc)
    except BaseException:
        stop(proc)
        raise
    return proc


@contextlib.contextmanager
def running_console(nats_url: str, swarm: str, workdir: Path, *, operator: str = "tester",
                    ui_args: Sequence[str] = ()) -> Iterator[Console]:
    env = dict(os.environ)
    env.update({"CFLOW_URL": nats_url, "CFLOW_SWARM": swarm, "XDG_DATA_HOME": str(workdir)})
    env.pop("CFLOW_UI_TOKEN", None)
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        asyncio.run(_init(nats_url, swarm))
        # Both start at once (the console needs no projector to start); both are ready
        # before the first test.
        procs["projector"] = spawn_projector(env, workdir)
        procs["ui"], info = start_ui(env, "--operator", operator, *ui_args)
        projector_ready(procs["projector"])
        yield Console(url=info["url"], token=info["token"], login=info["login"], swarm=swarm,
                      env=env, procs=procs, workdir=workdir)
    finally:
        for proc in procs.values():
            stop(proc)


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (uv sync installs it)"
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (`apt-get install chromium`; .ci/run does it in CI)"
    return None
