"""`cfctl --help` for people: commands grouped in panels, one line each, plain
metavars (``TEXT``, ``N``, ``TASK_ID``) instead of Python types.

Plain (not rich) help keeps ``cfctl --help`` fast; Typer's ``rich_help_panel``
needs the rich formatter, so the panels are drawn here. A command not listed
lands in "Other commands" with the first line of its docstring.
"""

from __future__ import annotations

from typing import Any

# (panel, [(command, one line that fits 80 columns)])
PANELS: list[tuple[str, list[tuple[str, str]]]] = [
    ("Start here", [
        ("demo", "A task DAG drained by real workers, one killed -9 half-way"),
        ("up", "Start a node: nats-server, projector, query service, maintenance"),
        ("down", "Stop the node `cfctl up --detach` started"),
        ("status", "Servers, streams, pauses and maintaining processes"),
        ("top", "Live view of the swarm"),
        ("ui", "The web console; prints its URL and the token actions need"),
    ]),
    ("Work", [
        ("task", "Create, claim, finish and inspect tasks"),
        ("worker", "Claim tasks and run them (command, container, claude -p)"),
        ("merge-queue", "Merge finished task branches, one merger at a time"),
        ("merges", "The merge queue: waiting, merged and rejected requests"),
        ("merge-gate", "A gate that opens once a task's work is merged"),
        ("agent", "Agents: registry, presence, what they hold"),
        ("memory", "Shared memory with namespaces, TTL, history and search"),
        ("msg", "Messages between agents: direct, topics, threads"),
        ("reserve", "Reserve paths before editing them"),
        ("reservations", "List live reservations, or check paths"),
        ("release-paths", "Release this agent's reservations"),
    ]),
    ("Views and analytics", [
        ("query", "Read-only SQL on the DuckDB projection"),
        ("report", "An analytics view as a table"),
        ("export", "Every projection table as Parquet"),
        ("projector", "Fold events into DuckDB and serve queries"),
        ("projections", "Rebuild the DuckDB projection"),
        ("metrics", "Prometheus metrics (once, or served)"),
    ]),
    ("Operating", [
        ("swarm", "Pause, resume or stop the swarm (or one parent task)"),
        ("gate", "Approve or reject human gates"),
        ("budget", "Budgets of the swarm or of one parent task"),
        ("breaker", "Circuit breakers per capability"),
        ("init", "Create the swarm's streams and buckets"),
        ("join", "Start a server that joins a cluster"),
        ("creds", "Per-agent credentials and auth.conf"),
        ("bench", "Benchmarks against the SQLite design"),
    ]),
    ("Claude Code and other tools", [
        ("setup", "Wire cflow into Claude Code and git"),
        ("mcp", "Serve the swarm over MCP (stdio or HTTP)"),
        ("permissions", "Answer permission prompts relayed from Claude Code"),
        ("hook", "Record a Claude Code hook event"),
        ("import", "Import data from claude-flow"),
    ]),
]

_TYPES = {"str": "TEXT", "int": "N", "float": "NUMBER", "path": "PATH", "bool": "BOOLEAN"}


def _metavar(param: Any) -> str | None:
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return None
    if type(param).__name__.endswith("Argument"):
        name = str(param.name).upper()
        return f"{name}..." if param.nargs != 1 else name
    try:
        shown = str(param.display_type(None)).strip("<>")
    except (AttributeError, TypeError):
        return None
    if shown.startswith("list[") and shown.endswith("]"):
        shown = shown[5:-1]
    if "|" in shown:  # choices: keep them
        return f"[{shown}]"
    return _TYPES.get(shown, shown.upper())


def _plain_argument(param: Any) -> None:
    """``TASK_ID`` / ``[TASK_ID]`` / ``ARGS...`` in usage, no ``<str>`` beside it."""
    name = str(param.name).upper()
    usage = name if param.required else f"[{name}]"
    usage += "..." if param.nargs != 1 else ""
    param.metavar = name + ("..." if param.nargs != 1 else "")
    param._usage_display_name = lambda: usage
    param.display_type_rich = lambda ctx=None: None


def tidy(command: Any) -> None:
    """Plain metavars on every parameter of ``command`` and its subcommands."""
    for param in getattr(command, "params", []):
        if type(param).__name__.endswith("Argument"):
            _plain_argument(param)
        elif getattr(param, "metavar", None) is None:
            metavar = _metavar(param)
            if metavar is not None:
                param.metavar = metavar
    for sub in getattr(command, "commands", {}).values():
        tidy(sub)


def format_commands(group: Any, ctx: Any, formatter: Any) -> None:
    """The top-level command list, in panels; the rest of a group's help is Typer's."""
    from cflow.cli.commands import HIDDEN

    # Not get_command for each: that would import every command module.
    names = {n for n in group.list_commands(ctx) if n not in HIDDEN
             and not getattr(group.commands.get(n), "hidden", False)}
    listed: set[str] = set()
    for panel, entries in PANELS:
        rows = [(name, line) for name, line in entries if name in names]
        listed.update(name for name, _ in rows)
        if rows:
            with formatter.section(panel):
                formatter.write_dl(rows)
    rest = sorted(names - listed)
    if rest:
        rows = [(n, group.get_command(ctx, n).get_short_help_str(60)) for n in rest]
        with formatter.section("Other commands"):
            formatter.write_dl(rows)
