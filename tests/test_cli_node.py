"""`cfctl up --detach` is the same node as a foreground one: the server, a projector with
its query service, and maintenance (reaping dead claims), all under --data-dir, all
stopped by `cfctl down`, shown by `cfctl status`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cflow.server import free_port, port_in_use

pytestmark = pytest.mark.e2e

CFCTL = [sys.executable, "-c", "from cflow.cli import main; main()"]


async def _ready(url: str, task_id: str) -> None:
    from cflow.swarm import Swarm
    from support import until

    async with Swarm.connect(url, swarm="default", agent="observer", ensure=False) as swarm:
        await swarm.tasks.ensure_board()
        await until(swarm, task_id, lambda s: s.status == "ready", 30)


def test_detached_node_serves_queries_reaps_and_stops(tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "node"
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg"),
           "CFLOW_URL": f"nats://127.0.0.1:{port}", "CFLOW_SWARM": "default"}

    def cfctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*CFCTL, *args], env=env, capture_output=True, text=True,
                              timeout=90, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"cfctl {args} -> {done.returncode}: {done.stderr}")
        return done

    up = json.loads(cfctl("--json", "up", "--detach", "--port", str(port), "--data-dir",
                          str(data)).stdout)
    services = up["services_pid"]
    try:
        assert up["projection"] == str(data / "default.duckdb")
        assert Path(f"/proc/{services}").exists()
        # queries are answered at once: `up --detach` returned when the service did
        rows = json.loads(cfctl("query", "select count(*) as n from tasks", "--json").stdout)
        assert rows == [{"n": 0}]
        # maintenance: a claim whose holder vanished comes back without any other process
        task = cfctl("task", "add", "orphan", "--lease-ttl", "1").stdout.strip()
        assert cfctl("task", "claim", "--agent", "ghost").stdout.split()[0] == task
        # awaited on the event feed, so no claimer of ours can be the one that reaps it
        asyncio.run(_ready(f"nats://127.0.0.1:{port}", task))
        events = json.loads(cfctl("task", "show", task, "--json").stdout)["timeline"]
        expired = [e for e in events if e["type"] == "TaskLeaseExpired"]
        assert expired and expired[0]["actor"].startswith("projector-")  # the node reaped it
        status = cfctl("status").stdout
        assert f"pid {services}" in status  # the node's maintaining process is shown
        assert all(p.is_relative_to(data) for p in data.rglob("*"))
        assert (data / "default.duckdb").exists()
    finally:
        down = cfctl("down", "--data-dir", str(data), check=False)
    assert down.returncode == 0, down.stderr
    assert f"and its services pid {services}" in down.stdout
    assert not port_in_use("127.0.0.1", port)
    assert not Path(f"/proc/{services}").exists()
    assert not list(data.glob("*.pid"))
