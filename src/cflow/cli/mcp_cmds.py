"""`cfctl mcp`, `cfctl setup claude`, `cfctl hook EVENT`: the Claude Code integration.

``cfctl hook`` normally never reaches this module: ``cflow.cli.main()`` sends it
to ``cflow.hooks.main`` before Typer loads (cold start). The command is
registered here too so it shows in ``--help`` and works behind global options.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from cflow.cli.app import EXIT_USAGE, app, exit_code_for, fail, group, state
from cflow.errors import CflowError
from cflow.permissions import answer_permission, pending_permissions

setup_app = group("setup", "Wire cflow into agent tools (Claude Code, git).")


@app.command("mcp")
def mcp_serve(
    ctx: typer.Context,
    agent: str | None = typer.Option(
        None, "--agent", help="Agent name (default: $CFLOW_AGENT, else derived from "
                              "$CLAUDE_CODE_SESSION_ID and the project directory)."),
    capability: list[str] = typer.Option(
        [], "--capability", "-c", help="A capability (repeat or comma-separate; "
                                       "default: $CFLOW_CAPABILITIES)."),
    http: str | None = typer.Option(
        None, "--http", help="Serve streamable HTTP on HOST:PORT (loopback) instead of stdio."),
) -> None:
    """Serve the swarm over MCP (stdio, for Claude Code). This process is the agent."""
    from cflow.mcp import runtime

    c = state(ctx)
    try:
        opts = runtime.Options(
            url=c.url, swarm=c.swarm, agent=runtime.resolve_agent(agent),
            capabilities=runtime.resolve_capabilities(capability),
            http=runtime.parse_http(http) if http else None)
        runtime.run(opts)
    except CflowError as err:
        if c.debug:
            raise
        fail(str(err), exit_code_for(err))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@setup_app.command("claude")
def setup_claude(
    ctx: typer.Context,
    project: Path | None = typer.Option(
        None, "--project", help="The project directory (default: the nearest folder upwards "
                                "with .git, .claude or .mcp.json)."),
    agent: str | None = typer.Option(
        None, "--agent", help="Pin the agent name (all sessions of this project share it)."),
    capability: list[str] = typer.Option(
        [], "--capability", "-c", help="Capabilities of the project's agents (repeatable)."),
    print_only: bool = typer.Option(False, "--print", help="Show the entries, write nothing."),
) -> None:
    """Add the cflow MCP server to .mcp.json and cflow hooks to .claude/settings.json.

    Both files can be committed: they run `cfctl` from PATH and read the URL and
    swarm from $CFLOW_URL / $CFLOW_SWARM, defaulting to --url / --swarm.
    """
    from cflow.mcp import claude

    c = state(ctx)
    if project is not None and not project.is_dir():
        fail(f"--project {project} is not a directory", EXIT_USAGE)
    root = project.resolve() if project is not None else claude.find_project_root(Path.cwd())
    env = {"CFLOW_URL": c.url, "CFLOW_SWARM": c.swarm}
    if agent:
        env["CFLOW_AGENT"] = agent
    caps = sorted({x.strip() for item in capability for x in item.split(",") if x.strip()})
    if caps:
        env["CFLOW_CAPABILITIES"] = ",".join(caps)
    try:
        planned = claude.plan(root, env)
        written = [] if print_only else claude.apply(planned)
    except CflowError as err:
        fail(str(err), exit_code_for(err))
    if c.json:
        out = {"written": written, "print": print_only, **planned}
        sys.stdout.write(json.dumps(out) + "\n")
        return
    if print_only:
        for path, item in planned["files"].items():
            sys.stdout.write(f"# {path}\n{json.dumps(item['content'], indent=2)}\n\n")
        sys.stdout.write(f"# or, for the server alone:\n{planned['claude_mcp_add']}\n")
        return
    for path, item in planned["files"].items():
        sys.stdout.write(f"{'wrote' if path in written else 'unchanged'} {path}"
                         f"{'' if item['changed'] or path in written else ' (already set up)'}\n")
    sys.stdout.write(
        f"Project: {root}. Commit .mcp.json and .claude/settings.json; cfctl must be on PATH.\n"
        "Next: start Claude Code in the project and approve the 'cflow' MCP server when asked "
        "(headless `claude -p` never asks: add \"enabledMcpjsonServers\": [\"cflow\"] to "
        ".claude/settings.local.json). `claude mcp list` shows it connected.\n")


@app.command("hook", context_settings={"ignore_unknown_options": True})
def hook(
    ctx: typer.Context,
    event: str = typer.Argument(..., help="The Claude Code hook event name."),
) -> None:
    """Record a Claude Code hook event read from stdin (always exits 0)."""
    import os

    from cflow.hooks import main as hook_main

    c = state(ctx)
    os.environ["CFLOW_URL"], os.environ["CFLOW_SWARM"] = c.url, c.swarm
    raise typer.Exit(hook_main([event]))


permissions_app = group("permissions", "Permission prompts relayed from Claude Code sessions.")


@permissions_app.command("list")
def permissions_list(ctx: typer.Context) -> None:
    """Permission prompts waiting for an answer, oldest first."""
    from cflow.cli.app import emit, run
    from cflow.swarm import Swarm

    c = state(ctx)

    async def body() -> list[dict[str, Any]]:
        async with Swarm.connect(c.url, swarm=c.swarm, agent="cfctl") as swarm:
            found: list[dict[str, Any]] = await pending_permissions(swarm)
            return found

    pending = run(ctx, body)

    def human(_: Any) -> None:
        if not pending:
            typer.echo("no permission prompt waiting")
        for p in pending:
            typer.echo(f"{p['id']}  {p['agent']}  {p['tool_name']}: {p['description']}"
                       f"  ({p['waiting_s']}s)")

    emit(ctx, pending, human)


def _answer(ctx: typer.Context, request_id: str, behavior: str) -> None:
    from cflow.cli.app import emit, identity, run
    from cflow.swarm import Swarm

    c = state(ctx)
    operator = identity()

    async def body() -> dict[str, Any]:
        async with Swarm.connect(c.url, swarm=c.swarm, agent=operator) as swarm:
            return await answer_permission(swarm, request_id, behavior, actor=operator)

    answer = run(ctx, body)
    emit(ctx, answer, f"{behavior} sent to {answer['agent']} for {request_id}")


@permissions_app.command("allow")
def permissions_allow(ctx: typer.Context,
                      request_id: str = typer.Argument(..., help="The id `list` shows.")) -> None:
    """Allow a relayed permission prompt: the session goes on with the tool call."""
    _answer(ctx, request_id, "allow")


@permissions_app.command("deny")
def permissions_deny(ctx: typer.Context,
                     request_id: str = typer.Argument(..., help="The id `list` shows.")) -> None:
    """Deny a relayed permission prompt: the session is told no."""
    _answer(ctx, request_id, "deny")
