"""Fixtures: one real nats-server per session, a unique swarm per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cflow.server import EmbeddedServer, ServerOptions, free_port, start_cluster
from cflow.streams import EventLog, connect, ensure_swarm


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    data = tmp_path_factory.mktemp("nats")
    [server] = start_cluster(lambda: [EmbeddedServer(ServerOptions(
        port=free_port(), data_dir=Path(data), sync="default"))])  # retried on a port clash
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: EmbeddedServer) -> str:
    return nats_server.url


@pytest.fixture
def swarm_name() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[object]:
    conn = await connect(nats_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def log(nc: object, swarm_name: str) -> EventLog:
    await ensure_swarm(nc, swarm_name)  # type: ignore[arg-type]
    return EventLog(nc, swarm_name, actor="test")  # type: ignore[arg-type]


@pytest.fixture
async def swarm(request: pytest.FixtureRequest, nats_url: str, swarm_name: str
                ) -> AsyncIterator[object]:
    """The facade on this test's swarm, as the module's ``SWARM_AGENT`` (else "tester")."""
    from cflow.swarm import Swarm

    agent = getattr(request.module, "SWARM_AGENT", "tester")
    async with Swarm.connect(nats_url, swarm=swarm_name, agent=agent) as s:
        yield s


@pytest.fixture
def cli_env(nats_url: str, swarm_name: str, tmp_path: Path) -> dict[str, str]:
    """Environment for running `cfctl` as a subprocess against the test server."""
    env = dict(os.environ)
    env.update({"CFLOW_URL": nats_url, "CFLOW_SWARM": swarm_name, "XDG_DATA_HOME": str(tmp_path)})
    return env


WATCHDOG_S = float(os.environ.get("CFLOW_TEST_WATCHDOG_S", "240"))


@pytest.fixture(autouse=True)
async def _watchdog(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """A hung async test fails (with every task's stack on stderr) instead of hanging CI."""
    import asyncio
    import sys

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()

    def fire() -> None:
        sys.stderr.write(f"\n=== watchdog: {request.node.nodeid} ran {WATCHDOG_S:g} s; tasks:\n")
        for task in asyncio.all_tasks(loop):
            task.print_stack(file=sys.stderr)
        for task in asyncio.all_tasks(loop):
            if task is not main:
                task.cancel()

    handle = loop.call_later(WATCHDOG_S, fire)
    try:
        yield
    finally:
        handle.cancel()
