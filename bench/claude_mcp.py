"""Claude Code integration timings: `cfctl mcp` launch to tools/list, and hook run times.

    uv run python -m bench.claude_mcp [--runs N]

Starts its own nats-server on a free loopback port. Reports the median and worst of
N launches of `cfctl mcp` (spawn to the `tools/list` answer, initialize first, as
Claude Code sends them) and of N runs of each `cfctl hook` event with a recorded
payload, plus the size of `tools/list` (tools, characters / 4 as tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CFCTL = str(Path(sys.executable).parent / "cfctl")
FIXTURES = ROOT / "tests" / "fixtures" / "hooks"
HOOKS = ("SessionStart", "PostToolUse_Edit", "PermissionRequest", "UserPromptSubmit", "Stop",
         "TaskCreated", "SessionEnd")


def launch_to_tools_list(env: dict[str, str]) -> tuple[float, int, int]:
    start = time.monotonic()
    proc = subprocess.Popen([CFCTL, "mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    assert proc.stdin is not None
    assert proc.stdout is not None
    for message in ({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                     "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                "clientInfo": {"name": "bench", "version": "0"}}},
                    {"jsonrpc": "2.0", "method": "notifications/initialized"},
                    {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}):
        proc.stdin.write((json.dumps(message) + "\n").encode())
    proc.stdin.flush()
    proc.stdout.readline()
    tools = json.loads(proc.stdout.readline())["result"]["tools"]
    took = time.monotonic() - start
    proc.stdin.close()
    proc.wait(timeout=60)
    return took, len(tools), len(json.dumps(tools)) // 4


def hook_time(event: str, fixture: str, env: dict[str, str]) -> float:
    start = time.monotonic()
    subprocess.run([CFCTL, "hook", event], input=(FIXTURES / f"{fixture}.json").read_text(),
                   env=env, capture_output=True, text=True, timeout=60, check=True)
    return time.monotonic() - start


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:.0f} ms, worst {max(values) * 1000:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from cflow.server import EmbeddedServer, ServerOptions, free_port

    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(ServerOptions(port=free_port(), data_dir=Path(tmp)))
        server.start()
        try:
            report(server.url, args.runs)
        finally:
            server.stop()


def report(url: str, runs: int) -> None:
    env = {**os.environ, "CFLOW_URL": url, "CFLOW_SWARM": "bench", "CFLOW_AGENT": "bench-mcp"}
    launches = [launch_to_tools_list(env) for _ in range(runs)]
    _, tools, tokens = launches[-1]
    print(f"tools/list: {tools} tools, ~{tokens} tokens (characters / 4)")
    print(f"cfctl mcp launch -> tools/list: {summary([t for t, _, _ in launches])}")
    hook_env = {k: v for k, v in env.items() if k != "CFLOW_AGENT"}
    for fixture in HOOKS:
        event = fixture.split("_")[0]
        times = [hook_time(event, fixture, hook_env) for _ in range(runs)]
        print(f"cfctl hook {event}: {summary(times)}")
    # The edit hook relayed through a running `cfctl mcp` of the same agent.
    relay_env = {**env, "CFLOW_AGENT": "bench-relay"}
    proc = subprocess.Popen([CFCTL, "mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=relay_env)
    try:
        assert proc.stderr is not None
        while b"serving swarm" not in proc.stderr.readline():
            pass
        times = [hook_time("PostToolUse", "PostToolUse_Edit", relay_env) for _ in range(runs)]
        print(f"cfctl hook PostToolUse via the session's cfctl mcp: {summary(times)}")
    finally:
        proc.kill()
        proc.wait()

if __name__ == "__main__":
    main()
