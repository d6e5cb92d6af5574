"""`cfctl mcp` as a real subprocess: the SDK's stdio client, raw JSON-RPC, kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters

from cflow import events as ev
from cflow.swarm import Swarm

pytestmark = pytest.mark.integration

START_S = 60.0  # generous: importing the SDK takes seconds on a busy 2-core machine
TOKEN_BUDGET = 2000


def cfctl() -> str:
    found = Path(sys.executable).parent / "cfctl"
    return str(found) if found.exists() else (shutil.which("cfctl") or "cfctl")


class RawServer:
    """`cfctl mcp` driven over raw newline-delimited JSON-RPC, every stdout line kept."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._next = 0

    async def request(self, method: str, params: dict[str, Any] | None = None,
                      timeout: float = START_S) -> dict[str, Any]:
        self._next += 1
        ident = self._next
        await self.send({"jsonrpc": "2.0", "id": ident, "method": method,
                         "params": params or {}})
        while True:
            assert self.proc.stdout is not None
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            assert raw, "server closed stdout"
            line = raw.decode()
            self.lines.append(line)
            message = json.loads(line)  # anything that is not JSON-RPC fails here
            assert message.get("jsonrpc") == "2.0", line
            if message.get("id") == ident:
                assert "error" not in message, message
                result: dict[str, Any] = message["result"]
                return result

    async def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        await self.proc.stdin.drain()

    async def initialize(self) -> dict[str, Any]:
        result = await self.request("initialize", {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "cflow-test", "version": "0"}})
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return result

    async def call(self, tool: str, **args: Any) -> dict[str, Any]:
        result = await self.request("tools/call", {"name": tool, "arguments": args})
        assert not result.get("isError"), result
        out: dict[str, Any] = result["structuredContent"]
        return out


@contextlib.asynccontextmanager
async def raw_server(env: dict[str, str], *args: str) -> AsyncIterator[RawServer]:
    proc = await asyncio.create_subprocess_exec(
        cfctl(), "mcp", *args, env=env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        yield RawServer(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def agent_env(cli_env: dict[str, str], agent: str) -> dict[str, str]:
    env = dict(cli_env)
    env["CFLOW_AGENT"] = agent
    env.pop("CLAUDE_CODE_SESSION_ID", None)
    return env


async def test_raw_protocol_only_json_rpc_on_stdout(cli_env: dict[str, str], nats_url: str,
                                                    swarm_name: str) -> None:
    async with raw_server(agent_env(cli_env, "raw-1"), "--capability", "py") as srv:
        info = await srv.initialize()
        assert info["serverInfo"]["name"] == "cflow"
        tools = await srv.request("tools/list")
        assert len(tools["tools"]) <= 12
        assert len(json.dumps(tools["tools"])) / 4 <= TOKEN_BUDGET
        created = await srv.call("task_create", title="via stdio", capabilities=["py"])
        claimed = await srv.call("task_claim")
        assert claimed["task"]["id"] == created["task"]["id"]
        kept = await srv.call("task_create", title="kept on exit")
        held = await srv.call("task_claim", task_id=kept["task"]["id"])
        done = await srv.call("task_update", task_id=created["task"]["id"], action="complete",
                              epoch=claimed["epoch"], text="ok")
        assert done["status"] == "completed"
        # The client goes away: stdin closes, the process exits on its own, releasing nothing.
        assert srv.proc.stdin is not None
        srv.proc.stdin.close()
        assert await asyncio.wait_for(srv.proc.wait(), 30) == 0
        assert srv.proc.stdout is not None
        rest = (await srv.proc.stdout.read()).decode()
        for line in [*srv.lines, *rest.splitlines(keepends=True)]:
            assert json.loads(line)["jsonrpc"] == "2.0"
        assert srv.proc.stderr is not None
        stderr = (await srv.proc.stderr.read()).decode()
        assert "raw-1" in stderr  # logs go to stderr
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="checker") as swarm:
        state = await swarm.tasks.get(kept["task"]["id"])
        assert state.status == "claimed" and state.owner == "raw-1"
        assert state.epoch == held["epoch"]


async def test_sdk_stdio_client(cli_env: dict[str, str]) -> None:
    params = StdioServerParameters(command=cfctl(), args=["mcp"],
                                   env=agent_env(cli_env, "sdk-1"))
    async with Client(params, read_timeout_seconds=START_S) as client:
        listed = await client.list_tools()
        wire = json.dumps([t.model_dump(mode="json", by_alias=True, exclude_none=True)
                           for t in listed.tools])
        assert len(listed.tools) <= 12 and len(wire) / 4 <= TOKEN_BUDGET
        made = await client.call_tool("task_create", {"title": "sdk task"})
        assert made.structured_content is not None
        claim = await client.call_tool("task_claim", {})
        assert claim.structured_content is not None and claim.structured_content["claimed"]
        done = await client.call_tool("task_update", {
            "task_id": made.structured_content["task"]["id"], "action": "complete",
            "epoch": claim.structured_content["epoch"], "text": "fine"})
        assert done.structured_content == {"task_id": made.structured_content["task"]["id"],
                                           "status": "completed"}
        stored = await client.call_tool("memory_store", {"key": "k1", "value": "stdio memory"})
        assert not stored.is_error
        got = await client.call_tool("memory_search", {"key": "k1"})
        assert got.structured_content is not None
        assert got.structured_content["entry"]["value"] == "stdio memory"
        bad = await client.call_tool("task_find", {"task_id": "missing"})
        assert bad.is_error and "NOT_FOUND: " in bad.content[0].text  # type: ignore[union-attr]


async def test_unreachable_nats_fails_fast_and_clearly(cli_env: dict[str, str]) -> None:
    env = agent_env(cli_env, "nowhere")
    env["CFLOW_URL"] = "nats://127.0.0.1:1"
    proc = await asyncio.create_subprocess_exec(
        cfctl(), "mcp", env=env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), START_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode not in (0, None)
    assert out == b""
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "127.0.0.1:1" in lines[0]


@pytest.mark.chaos
async def test_kill_9_lets_the_lease_expire_and_another_agent_reclaims(
        cli_env: dict[str, str], nats_url: str, swarm_name: str) -> None:
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="other") as other:
        reaper = asyncio.create_task(other.tasks.maintain())
        try:
            task = await other.tasks.create("survives a crash", lease_ttl_s=2.0)
            async with raw_server(agent_env(cli_env, "doomed")) as srv:
                await srv.initialize()
                claimed = await srv.call("task_claim", task_id=task.task_id)
                assert claimed["attempt"] == 1
                # Held past several TTLs while the process lives: the keep-alive works.
                assert await other.tasks.claim(wait=5.0) is None
                assert (await other.tasks.get(task.task_id)).owner == "doomed"
                os.kill(srv.proc.pid, signal.SIGKILL)
                assert await srv.proc.wait() == -signal.SIGKILL
            lease = await other.tasks.claim(wait=30.0)
            assert lease is not None and lease.task_id == task.task_id and lease.attempt == 2
            await lease.complete("recovered")
            history = [i.event.data for i in await other.tasks.history(task.task_id)]
            expired = [d for d in history if isinstance(d, ev.TaskLeaseExpired)]
            assert len(expired) == 1 and expired[0].owner == "doomed"
            assert expired[0].epoch == claimed["epoch"]
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper


async def test_streamable_http_on_loopback(cli_env: dict[str, str]) -> None:
    from cflow.server import free_port

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        cfctl(), "mcp", "--http", f"127.0.0.1:{port}", env=agent_env(cli_env, "http-1"),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        while b"listening on" not in (line := await asyncio.wait_for(
                proc.stderr.readline(), START_S)):
            assert line, "cfctl mcp --http exited before serving"
        async with Client(f"http://127.0.0.1:{port}/mcp") as client:
            assert len((await client.list_tools()).tools) == 11
            status = await client.call_tool("swarm_status", {})
            assert status.structured_content is not None
            assert status.structured_content["agent"] == "http-1"
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert proc.stdout is not None
        assert await proc.stdout.read() == b""  # logs never go to stdout
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_http_refuses_non_loopback(cli_env: dict[str, str]) -> None:
    import subprocess

    out = subprocess.run([cfctl(), "mcp", "--http", "0.0.0.0:8765"], env=cli_env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode != 0 and "loopback only" in out.stderr and out.stdout == ""


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # exited, waiting for a reaper


async def test_exits_when_its_parent_dies(cli_env: dict[str, str]) -> None:
    """Claude Code killed: the adapter is re-parented and exits, though stdin stays open."""
    shell = await asyncio.create_subprocess_exec(
        "sh", "-c", f"{cfctl()} mcp 0<&0 & echo $!; wait", env=agent_env(cli_env, "orphan"),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    pid = 0
    try:
        assert shell.stdout is not None and shell.stderr is not None
        pid = int(await asyncio.wait_for(shell.stdout.readline(), START_S))
        while b"serving swarm" not in (line := await asyncio.wait_for(
                shell.stderr.readline(), START_S)):
            assert line, "cfctl mcp exited before serving"
        shell.kill()
        await shell.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not _gone(pid):  # not our child any more: nothing to await but its exit
            assert loop.time() < deadline, "adapter outlived its parent"
            await asyncio.sleep(0.1)
    finally:
        if shell.returncode is None:
            shell.kill()
            await shell.wait()
        if pid and not _gone(pid):
            os.kill(pid, signal.SIGKILL)
