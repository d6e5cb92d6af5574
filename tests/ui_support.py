"""The web console under test: a real projector and a real `cfctl ui`, as processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cflow.ui.processes import (
    cfctl,
    first_line,
    projector_ready,
    spawn_projector,
    start_projector,
    start_ui,
    stop,
    ui,
)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("CFLOW_TEST_ARTIFACTS", ROOT / ".test-artifacts")) / "ui"
CHROMIUM = (os.environ.get("CFLOW_CHROMIUM") or shutil.which("chromium")
            or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


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


async def _init(nats_url: str, swarm: str) -> None:
    from cflow.streams import connect, ensure_swarm

    nc = await connect(nats_url)
    try:
        await ensure_swarm(nc, swarm)
    finally:
        await nc.close()


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


__all__ = [
    "ARTIFACTS",
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "ROOT",
    "Console",
    "cfctl",
    "chromium_missing",
    "first_line",
    "projector_ready",
    "running_console",
    "spawn_projector",
    "start_projector",
    "start_ui",
    "stop",
    "ui",
]
