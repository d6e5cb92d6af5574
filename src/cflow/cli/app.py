"""The Typer app, its global options, and the one place errors become exit codes.

Commands are thin: parse, ``run(ctx, async_fn)`` an async function that uses the
``Swarm`` facade (or the event log), render. Heavy imports (nats, duckdb,
docker, mcp) happen inside the command bodies so ``cfctl --help`` and
``cfctl hook`` start fast.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable, Collection
from typing import Any, NoReturn, TypeVar

import msgspec
import typer

from cflow.errors import CflowError, LeaseLost, NotFound, Unavailable

T = TypeVar("T")

# Exit codes scripts can rely on.
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOTHING = 3  # e.g. `task claim` found nothing to claim
EXIT_LEASE_LOST = 4
EXIT_NOT_FOUND = 5
EXIT_UNAVAILABLE = 6  # NATS unreachable
EXIT_DOCKER = 7  # the Docker engine unreachable (`worker --docker`)
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM (128 + SIGINT, as shells report it)
EXIT_NAMES = {EXIT_ERROR: "error", EXIT_USAGE: "usage", EXIT_NOTHING: "nothing",
              EXIT_LEASE_LOST: "lease_lost", EXIT_NOT_FOUND: "not_found",
              EXIT_UNAVAILABLE: "unavailable", EXIT_DOCKER: "docker_unavailable",
              EXIT_INTERRUPTED: "interrupted"}

DEFAULT_URL = "nats://127.0.0.1:4222"
NATS_SCHEMES = ("nats", "tls", "ws", "wss")

app = typer.Typer(
    name="cfctl",
    help="cflow: event-sourced coordination for swarms of AI coding agents, on NATS JetStream.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Ctx(msgspec.Struct):  # a Struct: cheaper to define than a dataclass (issue 18)
    url: str
    swarm: str
    json: bool
    debug: bool
    agent: str | None = None


_current: Ctx | None = None  # this process's global options (one command per process)


def _print_version(value: bool) -> None:
    if value:
        # Not importlib.metadata: importing it and reading the installed METADATA costs
        # about 60 ms of this line's cold start; `cflow` is imported already (tests check
        # the two agree).
        from cflow import __version__

        typer.echo(f"cfctl {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    ctx: typer.Context,
    url: str = typer.Option(
        DEFAULT_URL, "--url", envvar="CFLOW_URL",
        help="NATS server URL(s), comma-separated for failover.",
    ),
    swarm: str = typer.Option("default", "--swarm", envvar="CFLOW_SWARM", help="Swarm name."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for unexpected errors."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the version and exit."),
) -> None:
    global _current
    ctx.obj = _current = Ctx(url=url, swarm=swarm, json=as_json, debug=debug)
    from cflow.errors import InvalidInput
    from cflow.events import check_token

    try:
        check_token(swarm, "swarm")  # a usage error, before anything connects
    except InvalidInput as err:
        fail(str(err), EXIT_USAGE)
    for one in url.split(","):
        scheme, sep, rest = one.strip().partition("://")
        if sep and scheme.lower() not in NATS_SCHEMES:  # no scheme: nats-py adds nats://
            shown = f"{scheme}://{rest.rpartition('@')[2]}"  # never a password
            fail(f"--url {shown!r} is not a NATS URL (schemes: "
                 f"{', '.join(s + '://' for s in NATS_SCHEMES)})", EXIT_USAGE)


def state(ctx: typer.Context) -> Ctx:
    obj = ctx.find_root().obj
    assert isinstance(obj, Ctx)
    return obj


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """One line on stderr and an exit code; with ``--json`` the line is a JSON object."""
    if _current is not None and _current.json:
        sys.stderr.write(json.dumps({"error": message, "exit_code": code,
                                     "kind": EXIT_NAMES.get(code, "error")}) + "\n")
    else:
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


GLOBAL_FLAGS = ("--json", "--debug")
GLOBAL_VALUED = ("--url", "--swarm")  # take a value: ``--url X`` or ``--url=X``


def hoist_global_flags(argv: list[str], own: Collection[str] = ()) -> list[str]:
    """The global options work anywhere on the line: ``--json``, ``--debug``, ``--url X``
    and ``--swarm X`` are moved in front of the subcommand, where the global callback
    reads them. Not past a ``--``, and not an option the subcommand has itself (``own``,
    e.g. ``creds create --swarm``)."""
    end = argv.index("--") if "--" in argv else len(argv)
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < end:
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in own:
            rest.append(arg)
        elif arg in GLOBAL_FLAGS:
            if arg not in front:
                front.append(arg)
        elif arg in GLOBAL_VALUED and i + 1 < end:
            front += [arg, argv[i + 1]]
            i += 1
        elif name in GLOBAL_VALUED and "=" in arg:
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return [*front, *rest, *argv[end:]]


def exit_code_for(err: CflowError) -> int:
    if isinstance(err, LeaseLost):
        return EXIT_LEASE_LOST
    if isinstance(err, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(err, Unavailable):
        return EXIT_UNAVAILABLE
    return EXIT_ERROR


def interrupted(what: str) -> NoReturn:
    """The one line a command stopped by Ctrl-C / SIGTERM prints (exit 130)."""
    _interrupted_line(what)
    raise typer.Exit(EXIT_INTERRUPTED)


def _interrupted_line(what: str) -> None:
    if _current is not None and _current.json:
        sys.stderr.write(json.dumps({"interrupted": what, "exit_code": EXIT_INTERRUPTED}) + "\n")
    else:
        sys.stderr.write(f"interrupted: {what}\n")
    sys.stderr.flush()


EXIT_BOUND_S = 5.0  # a clean stop takes well under 2 s (tests/test_cli_interrupt.py)


def exit_soon(what: str, within_s: float = EXIT_BOUND_S) -> None:
    """After a stop signal: a last-resort bound on the clean shutdown.

    If the clean shutdown has not ended within ``within_s``, print the
    interrupted line, saying it was forced, and exit anyway. The clean stop
    ends well within 2 s since cancels are no longer swallowed (the Python 3.11
    ``wait_for`` fixed in :mod:`cflow.streams.cancel_safe` kept a cancelled
    follower running); this only keeps Ctrl-C from waiting forever should a
    shutdown step still hang, and its line makes that visible. Only for
    processes whose state is safe at any instant (the projector commits each
    batch with its checkpoint; a live view only reads).
    """
    import threading

    def give_up() -> None:
        _interrupted_line(f"{what} (forced after {within_s:g} s: a shutdown step hung)")
        os._exit(EXIT_INTERRUPTED)

    timer = threading.Timer(within_s, give_up)
    timer.daemon = True
    timer.start()


def run(ctx: typer.Context, fn: Callable[[], Awaitable[T]],
        reraise: tuple[type[CflowError], ...] = ()) -> T:
    """Run an async command body; our errors become one line on stderr and an exit code.

    ``reraise``: our errors the command handles itself.
    """
    import asyncio

    c = state(ctx)
    try:
        # asyncio itself, not anyio.run: anyio's backend costs ~50 ms of a cold start
        # and most commands never use it (those that do load it on their first call).
        return asyncio.run(fn())  # type: ignore[arg-type]
    except reraise:
        raise
    except CflowError as err:
        if c.debug:
            raise
        fail(str(err), exit_code_for(err))
    except KeyboardInterrupt:
        interrupted("stopped")


def emit(ctx: typer.Context, data: Any, human: Callable[[Any], None] | str | None = None) -> None:
    """Print ``data`` as JSON with ``--json``, else the human rendering."""
    if state(ctx).json:
        sys.stdout.write(json.dumps(data, default=str, indent=None) + "\n")
        return
    if human is None:
        sys.stdout.write(json.dumps(data, default=str, indent=2) + "\n")
    elif isinstance(human, str):
        sys.stdout.write(human + "\n")
    else:
        human(data)


def say(ctx: typer.Context, message: str) -> None:
    """What happened, for a person: on stderr (stdout stays the result), not under --json."""
    if not state(ctx).json:
        sys.stderr.write(message + "\n")


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``1 task``, ``2 tasks``."""
    return f"{n} {noun if n == 1 else (many or noun + 's')}"


def utc_text(ms: int) -> str:
    """A time in ms since the epoch as a person reads it: ``2026-12-03 05:44:14`` (UTC)."""
    import datetime

    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def human_time(hlc: str) -> str:
    """An event's time from its HLC stamp: ``2026-12-03 05:44:14Z`` (--json keeps the
    whole stamp)."""
    from cflow.hlc import Timestamp

    stamp = Timestamp.parse(hlc)
    try:
        return utc_text(stamp.wall_ms) + "Z"
    except (ValueError, OverflowError, OSError):  # past year 9999: no calendar form
        return stamp.readable()


def fields_summary(data: dict[str, Any]) -> str:
    """An event's fields for a person: ``key=value`` for those with a value, lists
    comma-joined, a long value cut with an ellipsis."""
    parts = []
    for key, value in data.items():
        if value in (None, "", [], {}):
            continue
        if isinstance(value, list | tuple):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, dict):
            text = ",".join(f"{k}={v}" for k, v in value.items())
        else:
            text = str(value)
        parts.append(f"{key}={text if len(text) <= 40 else text[:39] + '…'}")
    return " ".join(parts)


def console(*, stderr: bool = False) -> Any:
    """A rich Console; to a pipe or file it never wraps (whole ids, no cut words) and its
    lines carry no trailing spaces (rich pads every table cell to its column's width)."""
    import io
    from typing import IO, cast

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)

    class Trimmed(io.TextIOBase):
        """Passes whole lines on to ``stream``, each without its trailing spaces."""

        def __init__(self) -> None:
            self.pending = ""

        def write(self, text: str) -> int:
            *lines, self.pending = (self.pending + text).split("\n")
            stream.write("".join(line.rstrip(" ") + "\n" for line in lines))
            return len(text)

        def flush(self) -> None:
            stream.write(self.pending)  # a print(end="") goes on later: kept as it is
            self.pending = ""
            stream.flush()

    return Console(file=cast("IO[str]", Trimmed()), width=100_000, soft_wrap=True)


def group(name: str, help: str) -> typer.Typer:
    """The sub-app ``cfctl <name>``, created by whichever command module asks first.

    Lets several modules add commands to one group (``cfctl setup claude`` and
    ``cfctl setup git-guard``) whatever their import order.
    """
    for registered in app.registered_groups:
        if registered.name == name and registered.typer_instance is not None:
            return registered.typer_instance
    sub = typer.Typer(help=help, no_args_is_help=True)
    app.add_typer(sub, name=name)
    return sub


def identity(explicit: str | None = None) -> str:
    """Who a person at this shell is, the same for every command: ``--agent``, else
    ``$CFLOW_AGENT``, else ``<user>-<host>`` (inside Claude Code: its session's agent).

    A subject token. Inside a Claude Code session it is the name its MCP adapter uses,
    so ``git commit`` from the session's shell is the agent holding the reservations.
    """
    name = explicit or os.environ.get("CFLOW_AGENT")
    if name:
        return name
    if os.environ.get("CLAUDE_CODE_SESSION_ID"):
        from cflow.hooks import claude_agent_name

        return claude_agent_name()
    import getpass
    import re
    import socket

    fallback = f"{getpass.getuser()}-{socket.gethostname()}"
    return re.sub(r"[^A-Za-z0-9_-]+", "-", fallback).strip("-")[:128] or "cfctl"


def agent_name(explicit: str | None = None) -> str:
    """A worker's name: it is its own agent, so one per process (``<user>-<host>-<pid>``)."""
    return explicit or os.environ.get("CFLOW_AGENT") or f"{identity()}-{os.getpid()}"
