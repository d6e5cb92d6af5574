"""Fixtures: one real nats-server per session, a unique swarm per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cflow.server import EmbeddedServer, ServerOptions, free_port
from cflow.streams import EventLog, connect, ensure_swarm


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    data = tmp_path_factory.mktemp("nats")
    server = EmbeddedServer(ServerOptions(port=free_port(), data_dir=Path(data), sync="default"))
    server.start()
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
def cli_env(nats_url: str, swarm_name: str, tmp_path: Path) -> dict[str, str]:
    """Environment for running `cfctl` as a subprocess against the test server."""
    env = dict(os.environ)
    env.update({"CFLOW_URL": nats_url, "CFLOW_SWARM": swarm_name, "XDG_DATA_HOME": str(tmp_path)})
    return env
