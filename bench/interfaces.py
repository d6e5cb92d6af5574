"""Sections "coldstart" (7: cfctl wall time vs ``python -c pass``) and "mcp"
(9: size of the MCP ``tools/list`` answer in tokens, characters / 4)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from bench.context import Ctx
from bench.stats import Goal

PY = sys.executable
CFCTL = str(Path(sys.executable).parent / "cfctl")


def wall(cmd: list[str], env: dict[str, str], stdin: str = "") -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no stderr"])[-1]
        raise RuntimeError(f"{' '.join(cmd[-3:])} exited {proc.returncode}: {tail}")
    return took, proc.returncode


def cfctl_help() -> str:
    proc = subprocess.run([CFCTL, "--help"], capture_output=True, text=True, timeout=60,
                          check=False)
    return proc.stdout


def has_command(help_text: str, name: str) -> bool:
    return any(line.strip().startswith(("│ " + name + " ", name + " ")) or
               line.strip().split(" ")[:2] == ["│", name]
               for line in help_text.splitlines())


async def coldstart(ctx: Ctx) -> None:
    n = ctx.reps(3, 15)
    url = ctx.servers.url("default")
    env = dict(os.environ)
    env.update({"CFLOW_URL": url, "CFLOW_SWARM": f"cold{uuid.uuid4().hex[:8]}",
                "XDG_DATA_HOME": str(ctx.tmp / "xdg"), "CFLOW_AGENT": "bench-cold"})
    help_text = await asyncio.to_thread(cfctl_help)
    cases: list[tuple[str, list[str], str, str]] = [
        ("python", [PY, "-c", "pass"], "", "python -c pass"),
        ("help", [CFCTL, "--help"], "", "cfctl --help"),
        ("task_add", [CFCTL, "task", "add", "cold start"], "", "cfctl task add (to a server)"),
    ]
    if has_command(help_text, "hook"):
        payload = json.dumps({"hook_event_name": "SessionStart", "session_id": "bench",
                              "cwd": str(ctx.tmp)})
        cases.append(("hook", [CFCTL, "hook", "SessionStart"], payload,
                      "cfctl hook SessionStart"))
    else:
        ctx.rec.na("coldstart.hook.s", "`cfctl hook` does not exist yet",
                   label="cfctl hook", unit="ms", section="7 cold start")
    # warm the page cache once, then measure interleaved so drift hits all alike
    for _, cmd, stdin, _ in cases:
        await asyncio.to_thread(wall, cmd, env, stdin)
    for _ in range(n):
        for key, cmd, stdin, label in cases:
            took, _ = await asyncio.to_thread(wall, cmd, env, stdin)
            goals = [Goal("value", "<=", 300.0, "<= 300 ms")] if key in ("help", "hook") else []
            ctx.rec.add(f"coldstart.{key}.ms", took * 1000, label=label, unit="ms",
                        section="7 cold start", is_baseline=key == "python",
                        baseline=None if key == "python" else "coldstart.python.ms",
                        goals=goals, note="subprocess wall time; each run is one sample")


async def mcp(ctx: Ctx) -> None:
    help_text = await asyncio.to_thread(cfctl_help)
    if not has_command(help_text, "mcp"):
        ctx.rec.na("mcp.tools_list.tokens", "no MCP server (`cfctl mcp`) yet",
                   label="MCP tools/list size", unit="tokens", section="9 mcp")
        return
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    url = ctx.servers.url("default")
    params = StdioServerParameters(
        command=CFCTL, args=["mcp"],
        env={"CFLOW_URL": url, "CFLOW_SWARM": f"mcp{uuid.uuid4().hex[:8]}",
             "XDG_DATA_HOME": str(ctx.tmp / "xdg"), "CFLOW_AGENT": "bench-mcp"})
    with open(ctx.tmp / "mcp-stderr.log", "w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            result = await session.list_tools()
    text = result.model_dump_json(by_alias=True, exclude_none=True)
    ctx.rec.add("mcp.tools_list.tokens", len(text) / 4, label="MCP tools/list size",
                unit="tokens", section="9 mcp",
                goals=[Goal("value", "<=", 2000.0, "<= 2,000 tokens")],
                note=f"{len(result.tools)} tools; JSON characters / 4")
    ctx.rec.add("mcp.tools_list.count", len(result.tools), label="MCP tools", unit="tools",
                section="9 mcp", goals=[Goal("value", "<=", 12.0, "<= 12 tools")])
