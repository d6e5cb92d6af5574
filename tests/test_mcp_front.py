"""`cfctl mcp` start and end as Claude Code sees them: early tool list, signals, health checks."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import pytest

from cflow import events as ev
from cflow.errors import NotFound
from cflow.mcp.catalog import PROMPTS, RESOURCE_TEMPLATES, RESOURCES, TOOLS
from cflow.mcp.server import live_lists
from cflow.swarm import Swarm
from test_mcp_stdio import agent_env, cfctl, raw_server

FIXTURES = Path(__file__).parent / "fixtures" / "hooks"
TOKEN_BUDGET = 2000
MAX_TOOLS = 12


def test_catalog_is_the_live_tool_list() -> None:
    """The lists the front answers before the SDK loads are exactly the full server's."""
    live = live_lists()
    assert live == {"tools": TOOLS, "prompts": PROMPTS, "resources": RESOURCES,
                    "resourceTemplates": RESOURCE_TEMPLATES}, \
        "run `uv run python -m cflow.mcp.server --write-catalog`"
    assert len(TOOLS) <= MAX_TOOLS
    assert len(json.dumps(TOOLS)) / 4 <= TOKEN_BUDGET


@pytest.mark.integration
async def test_tools_are_listed_before_the_backend_is_reached(cli_env: dict[str, str]) -> None:
    """No NATS at all: initialize and the lists are still answered; a signal while it is
    still trying to connect ends it at once (the exit code 6 of a server that never
    answers is tested in test_mcp_stdio)."""
    env = agent_env(cli_env, "early")
    env["CFLOW_URL"] = "nats://127.0.0.1:1"
    async with raw_server(env) as srv:
        info = await srv.initialize()
        assert info["capabilities"]["experimental"]["claude/channel"] == {}
        assert info["protocolVersion"] == "2025-06-18"
        listed = await srv.request("tools/list")
        assert listed["tools"] == TOOLS
        assert (await srv.request("prompts/list"))["prompts"] == PROMPTS
        assert (await srv.request("resources/list"))["resources"] == RESOURCES
        srv.proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(srv.proc.wait(), 5) == 0


@pytest.mark.integration
async def test_health_checks_and_signals(cli_env: dict[str, str], nats_url: str,
                                         swarm_name: str) -> None:
    """`claude mcp list` connects, lists and leaves: no agent. A session ended by SIGINT or
    SIGTERM (stdin still open, as under Claude Code) exits at once and releases nothing."""
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="watcher") as watcher:
        task = await watcher.tasks.create("held across a SIGTERM", lease_ttl_s=30)
        async with raw_server(agent_env(cli_env, "health-check")) as srv:
            await srv.initialize()
            await srv.request("tools/list")
            srv.proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(srv.proc.wait(), 10) == 0
        async with raw_server(agent_env(cli_env, "sig-term")) as srv:
            await srv.initialize()
            claimed = await srv.call("task_claim", task_id=task.task_id)
            # The session's edit hook goes through this process: the hook itself is
            # pointed at a dead NATS port, so a recorded note proves the relay.
            hook_env = {**agent_env(cli_env, "sig-term"), "CFLOW_URL": "nats://127.0.0.1:1"}
            edit = await asyncio.to_thread(
                subprocess.run, [cfctl(), "hook", "PostToolUse"], env=hook_env, text=True,
                input=(FIXTURES / "PostToolUse_Edit.json").read_text(), capture_output=True,
                timeout=60)
            assert (edit.returncode, edit.stdout, edit.stderr) == (0, "", "")
            srv.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(srv.proc.wait(), 10) == 0
        state = await watcher.tasks.get(task.task_id)
        assert state.status == "claimed" and state.owner == "sig-term"  # nothing released
        assert state.epoch == claimed["epoch"]
        view = await watcher.tasks.lease_view(state)  # the lease key itself is still live
        assert view is not None and view.op == "PUT" and view.epoch in (None, state.epoch)
        notes = [i.event for i in await watcher.tasks.history(task.task_id)
                 if isinstance(i.event.data, ev.TaskNoted)]
        assert [(n.actor, n.data.text, n.data.paths) for n in notes] == [
            ("sig-term", "edited via Edit", ("src/app.py",))]
        with pytest.raises(NotFound):
            await watcher.agents.get("health-check")
        assert (await watcher.agents.get("sig-term")).runtime == "mcp"  # a session registers


def test_a_client_that_stops_reading_never_blocks_the_writer() -> None:
    """Claude Code stops reading stdout: writes return at once (heartbeats go on), pushes
    beyond the bound are dropped, answers are kept and come out whole and in order."""
    import os
    import threading
    import time

    from cflow.mcp.front import OUT_QUEUE_MAX, Front

    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    front = Front(in_r, out_w, divert=False)
    push = json.dumps({"jsonrpc": "2.0", "method": "notifications/claude/channel",
                       "params": {"content": "x" * 1000, "meta": {}}})
    done = threading.Event()

    def flood() -> None:
        for _ in range(OUT_QUEUE_MAX * 4):  # far beyond what the pipe buffer holds
            front.write(push, droppable=True)
        front.write('{"jsonrpc":"2.0","id":7,"result":{}}')
        done.set()

    started = time.monotonic()
    threading.Thread(target=flood, daemon=True).start()
    try:
        assert done.wait(5.0), "write blocked on a client that does not read"
        assert time.monotonic() - started < 2.0
        assert front.dropped > 0
        got = b""
        while not got.endswith(b'"id":7,"result":{}}\n'):
            got += os.read(out_r, 1 << 20)
        lines = got.decode().splitlines()
        assert all(json.loads(line) for line in lines)  # whole messages only
        assert len(lines) == OUT_QUEUE_MAX * 4 - front.dropped + 1
        assert front.flush(5.0)
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)


@pytest.mark.integration
async def test_edit_hook_during_an_outage_returns_at_once(cli_env: dict[str, str],
                                                          nats_url: str) -> None:
    """The session's cfctl mcp relays edit notes; after a permission prompt the edit clears
    "waiting on a human"; when NATS goes down the in-line PostToolUse hook still returns
    within about a second (the relay answers, the hook does not try NATS itself)."""
    import time

    from faults import Proxy

    def hook(env: dict[str, str], event: str, fixture: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([cfctl(), "hook", event], env=env, text=True, timeout=60,
                              input=(FIXTURES / f"{fixture}.json").read_text(),
                              capture_output=True, check=False)

    with Proxy(nats_url) as proxy:
        env = {**agent_env(cli_env, "edit-out"), "CFLOW_URL": proxy.url}
        async with Swarm.connect(nats_url, swarm=env["CFLOW_SWARM"], agent="w") as watcher, \
                raw_server(env) as srv:
            await srv.initialize()
            task = await watcher.tasks.create("edited in an outage")
            await srv.call("task_claim", task_id=task.task_id)
            await asyncio.to_thread(hook, env, "PermissionRequest", "PermissionRequest")
            assert (await watcher.agents.get("edit-out")).reason.startswith("waiting on")
            edit = await asyncio.to_thread(hook, env, "PostToolUse", "PostToolUse_Edit")
            assert (edit.returncode, edit.stderr) == (0, "")
            assert (await watcher.agents.get("edit-out")).reason == "working"
            proxy.down()
            started = time.monotonic()
            edit = await asyncio.to_thread(hook, env, "PostToolUse", "PostToolUse_Edit")
            took = time.monotonic() - started
            assert edit.returncode == 0 and edit.stdout == ""
            assert took < 3.0, f"the in-line edit hook took {took:.1f} s in an outage"


@pytest.mark.integration
async def test_calls_after_the_tool_list_are_answered_during_an_outage(
        cli_env: dict[str, str], nats_url: str) -> None:
    """NATS is unreachable after the early tool list: calls get BACKEND_UNAVAILABLE (not
    silence and exit 6), and once NATS is back the same process serves them."""
    from faults import Proxy

    with Proxy(nats_url) as proxy:
        proxy.down()
        async with raw_server({**agent_env(cli_env, "late-nats"), "CFLOW_URL": proxy.url}) as srv:
            await srv.initialize()
            await srv.request("tools/list")
            down = await srv.request("tools/call", {"name": "task_find", "arguments": {}})
            assert down["isError"]
            assert down["content"][0]["text"].startswith("BACKEND_UNAVAILABLE: ")
            proxy.heal()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while True:  # the process reconnects by itself (backoff at most 5 s)
                got = await srv.request("tools/call", {"name": "task_find", "arguments": {}})
                if not got.get("isError"):
                    break
                assert loop.time() < deadline, got
                await asyncio.sleep(0.2)
            assert got["structuredContent"]["tasks"] == []
            assert srv.proc.returncode is None
