"""The real Claude Code binary (`claude -p`) working a swarm through `cfctl setup claude`.

The model is :mod:`anthropic_stub` on loopback: it answers with scripted tool calls
and records every request. The project is set up exactly as a user does it
(`cfctl setup claude`, then the approval in .claude/settings.local.json), so what
runs is the committed .mcp.json (``alwaysLoad``), the hooks, `cfctl mcp` and NATS.
Skips with a visible reason when no `claude` binary is installed (`.ci/run`
installs it from npm in CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from anthropic_stub import (
    AnthropicStub,
    claude_binary,
    claude_env,
    last_json,
    text,
    tool_results,
    tool_use,
)
from cflow import events as ev
from cflow.swarm import Swarm

CLAUDE = claude_binary()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.skipif(CLAUDE is None, reason="no `claude` binary (npm @anthropic-ai/claude-code; "
                                              ".ci/run installs it as root in CI)"),
]

BIN = str(Path(sys.executable).parent)
CFLOW_TOOLS = {f"mcp__cflow__{name}" for name in (
    "task_create", "task_find", "task_claim", "task_update", "task_cancel", "memory_store",
    "memory_search", "query", "swarm_status", "message", "paths")}
RUN_S = 90.0


def project(tmp_path: Path, cli_env: dict[str, str], name: str = "proj") -> Path:
    """A git project set up for cflow as a user would: setup, then approve the server."""
    root = tmp_path / name
    (root / ".git").mkdir(parents=True)
    (root / "sub").mkdir()
    subprocess.run([f"{BIN}/cfctl", "setup", "claude"], cwd=root / "sub", env=cli_env,
                   check=True, capture_output=True, timeout=60)
    (root / ".claude" / "settings.local.json").write_text(
        json.dumps({"enabledMcpjsonServers": ["cflow"]}))
    return root


def session_env(cli_env: dict[str, str], model_url: str, home: Path) -> dict[str, str]:
    env = claude_env(cli_env, model_url, home)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `cfctl` from PATH, as committed
    env.pop("CFLOW_AGENT", None)  # the name comes from Claude Code's session id
    env["CFLOW_HOOK_TIMEOUT_S"] = "20"  # hooks on a loaded 2-core box
    return env


@contextlib.asynccontextmanager
async def claude(root: Path, env: dict[str, str], prompt: str
                 ) -> AsyncIterator[asyncio.subprocess.Process]:
    assert CLAUDE is not None
    proc = await asyncio.create_subprocess_exec(
        CLAUDE, "-p", prompt, "--output-format", "json",
        "--allowedTools", "mcp__cflow Write", cwd=root, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        yield proc
    finally:  # the whole session: claude, its `cfctl mcp` and any hook still running
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


def work_loop(body: dict[str, Any]) -> list[dict[str, Any]]:
    """claim -> write a file -> note -> complete, read off the conversation so far."""
    done = [name for name, _, _ in tool_results(body)]
    claim = last_json(body, "mcp__cflow__task_claim")
    if not done:
        return [tool_use("mcp__cflow__task_claim")]
    assert claim is not None
    if not claim.get("claimed"):
        return [text(f"nothing to do: {claim.get('reason')}")]
    task_id, epoch = claim["task"]["id"], claim["epoch"]
    path = f"out/{claim['task']['title']}.txt"
    if done[-1] == "mcp__cflow__task_claim":
        cwd = _cwd(body)
        return [tool_use("Write", file_path=f"{cwd}/{path}", content=f"{task_id}\n")]
    if done[-1] == "Write":
        return [tool_use("mcp__cflow__task_update", task_id=task_id, action="note",
                         text=f"wrote {path}", paths=[path])]
    if done.count("mcp__cflow__task_update") == 1:  # the note went in: finish
        return [tool_use("mcp__cflow__task_update", task_id=task_id, action="complete",
                         epoch=epoch, text=f"wrote {path}")]
    return [text("done")]


def _cwd(body: dict[str, Any]) -> str:
    """The session's working directory, as Claude Code tells the model in its system prompt."""
    system = body.get("system")
    blob = json.dumps(system) if not isinstance(system, str) else system
    marker = "Primary working directory: "
    start = blob.index(marker) + len(marker)
    return blob[start:].split("\\n")[0].split("\n")[0].strip()


async def test_three_sessions_claim_edit_note_complete(
        tmp_path: Path, cli_env: dict[str, str], nats_url: str, swarm_name: str) -> None:
    root = project(tmp_path, cli_env)
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="lead") as lead:
        tasks = [await lead.tasks.create(f"task-{n}") for n in range(3)]
        with AnthropicStub(work_loop) as stub:
            env = session_env(cli_env, stub.url, tmp_path / "home")
            async with contextlib.AsyncExitStack() as stack:
                procs = [await stack.enter_async_context(claude(root, env, "work the swarm"))
                         for _ in range(3)]
                results = await asyncio.wait_for(
                    asyncio.gather(*(p.communicate() for p in procs)), RUN_S)
            assert not stub.errors, stub.errors
            for proc, (out, err) in zip(procs, results, strict=True):
                assert proc.returncode == 0, err.decode()[-2000:]
                assert json.loads(out)["result"] == "done", out
            mains = stub.main_requests()
            firsts = [b for b in mains if not tool_results(b)]
            assert len(firsts) == 3
            for body in firsts:  # cflow's tools are there from the very first request
                names = {t["name"] for t in body["tools"]}
                assert names >= CFLOW_TOOLS, sorted(names)
        owners = set()
        for task in tasks:
            state = await lead.tasks.get(task.task_id)
            assert state.status == "completed" and state.attempt == 1, state
            owners.add(state.owner)
            assert (root / "out" / f"{task.title}.txt").read_text() == f"{task.task_id}\n"
            history = [i.event for i in await lead.tasks.history(task.task_id)]
            claims = [e for e in history if isinstance(e.data, ev.TaskClaimed)]
            completes = [e for e in history if isinstance(e.data, ev.TaskCompleted)]
            assert len(claims) == 1 and len(completes) == 1
            notes = [e.data for e in history if isinstance(e.data, ev.TaskNoted)]
            # The model's own note, and the PostToolUse hook's edit note, by the same agent.
            assert any(n.text == f"wrote out/{task.title}.txt" for n in notes)
            assert any(n.text.startswith("edited via Write")
                       and n.paths == (f"out/{task.title}.txt",) for n in notes), notes
        assert len(owners) == 3 and all(o and o.startswith("claude-proj-") for o in owners)
        agents = {a.name: a for a in await lead.agents.list()}
        for owner in owners:  # registered by the session, offline after SessionEnd
            assert agents[owner].status == "offline", agents[owner]


async def test_a_session_killed_mid_task_has_its_task_reclaimed(
        tmp_path: Path, cli_env: dict[str, str], nats_url: str, swarm_name: str) -> None:
    root = project(tmp_path, cli_env)
    claimed, release = threading.Event(), threading.Event()

    def stall_after_claim(body: dict[str, Any]) -> list[dict[str, Any]]:
        if not tool_results(body):
            return [tool_use("mcp__cflow__task_claim")]
        claimed.set()
        release.wait(RUN_S)  # the model "thinks" until the session is killed
        return [text("late")]

    async with Swarm.connect(nats_url, swarm=swarm_name, agent="rescuer") as rescuer:
        task = await rescuer.tasks.create("survives kill -9", lease_ttl_s=2.0)
        # First a health check, as `claude mcp list` does it: connected, and no agent.
        home = tmp_path / "home"
        env = session_env(cli_env, "http://127.0.0.1:9", home)  # no model request is made
        (home / ".claude.json").write_text(json.dumps(
            {"projects": {str(root): {"hasTrustDialogAccepted": True}}}))
        assert CLAUDE is not None
        listed = await asyncio.to_thread(
            subprocess.run, [CLAUDE, "mcp", "list"], cwd=root, env=env, capture_output=True,
            text=True, timeout=RUN_S, stdin=subprocess.DEVNULL)
        assert "cflow: cfctl mcp - ✔ Connected" in listed.stdout, listed.stdout + listed.stderr
        assert [(a.name, a.runtime, a.labels) for a in await rescuer.agents.list()] == []
        reaper = asyncio.create_task(rescuer.tasks.maintain())
        try:
            with AnthropicStub(stall_after_claim) as stub:
                env = session_env(cli_env, stub.url, tmp_path / "home")
                try:
                    async with claude(root, env, "work") as proc:
                        loop = asyncio.get_running_loop()
                        assert await loop.run_in_executor(None, claimed.wait, RUN_S)
                        state = await rescuer.tasks.get(task.task_id)
                        assert state.status == "claimed" and state.owner != "rescuer"
                        os.kill(proc.pid, signal.SIGKILL)  # claude only: its server is orphaned
                        assert await proc.wait() == -signal.SIGKILL
                finally:
                    release.set()
            lease = await rescuer.tasks.claim(wait=30.0)
            assert lease is not None and lease.task_id == task.task_id and lease.attempt == 2
            await lease.complete("recovered")
            history = [i.event.data for i in await rescuer.tasks.history(task.task_id)]
            expired = [d for d in history if isinstance(d, ev.TaskLeaseExpired)]
            assert len(expired) == 1 and expired[0].owner == state.owner
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
