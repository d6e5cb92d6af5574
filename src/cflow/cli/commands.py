"""Which module defines each `cfctl` command, and the two things that keep a cold start
short (issue 18: every common command within 300 ms).

Theory of operation. A command module registers its commands on the Typer ``app``
when imported, and Typer builds click commands for everything registered. Building
all 37 top-level commands (about 90 with their subcommands) and importing the 14
modules costs more than the goal by itself, so ``main`` reads the command name from
the line first and imports only the modules that define it (``COMMANDS``); the
definitions stay where they are, one source of truth for options and help. A line
without a command name (``cfctl``, ``cfctl --help``, ``--version``) loads none:
the root lists every name (``lazy_root``) and the panels come from ``help.PANELS``;
an unknown name loads them all, for click's error. Of the modules loaded, Typer
builds only the command the line invokes (``only_invoked``): ``cfctl task add``
builds ``add``, not the 16 other ``task`` commands (about 3 M instructions each).

Typer 0.29 coerces every parameter value through a pydantic ``TypeAdapter``:
importing pydantic and building the schemas is some 200 ms per process. Our
parameters are plain ``str``, ``int``, ``float``, ``bool``, ``Path`` and lists of
them; ``plain_coercion`` gives those a direct conversion and leaves anything else
(choices, files, custom parsers) to Typer.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# The modules in registration order: a group several modules add to ("task",
# "setup") is created by the first.
MODULES = (
    "server_cmds", "task_cmds", "projection_cmds", "bench_cmds", "agent_cmds",
    "worker_cmds", "memory_cmds", "msg_cmds", "reserve_cmds", "import_cmds",
    "mcp_cmds", "ops_cmds", "merge_cmds", "ui_cmds",
)

# Top-level command -> the modules that register it, or add to it (tests/test_cli_start.py
# checks this against what importing each module registers).
COMMANDS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("status", "up", "down", "join", "init", "creds", "node-services"),
                    ("server_cmds",)),
    "task": ("task_cmds", "merge_cmds"),
    **dict.fromkeys(("projector", "projections", "query", "export"), ("projection_cmds",)),
    "report": ("projection_cmds",),
    "bench": ("bench_cmds",),
    "agent": ("agent_cmds",),
    "demo": ("worker_cmds",), "worker": ("worker_cmds",),
    "memory": ("memory_cmds",),
    "msg": ("msg_cmds",),
    **dict.fromkeys(("reserve", "reservations", "release-paths"), ("reserve_cmds",)),
    "setup": ("reserve_cmds", "mcp_cmds"),
    "import": ("import_cmds",),
    **dict.fromkeys(("hook", "permissions", "mcp"), ("mcp_cmds",)),
    **dict.fromkeys(("swarm", "gate", "budget", "breaker", "metrics", "top"), ("ops_cmds",)),
    **dict.fromkeys(("merges", "merge-gate", "merge-queue"), ("merge_cmds",)),
    "ui": ("ui_cmds",),
}

# Registered but not shown in `cfctl --help` (checked by the same test).
HIDDEN = frozenset({"node-services"})

# Root options that take a value (the command name comes after them).
VALUED_ROOT_OPTIONS = ("--url", "--swarm")
ROOT_FLAGS = ("--json", "--debug")


def command_name(argv: Sequence[str]) -> str | None:
    """The top-level command ``argv`` names, past the root options; None if none does."""
    args = iter(argv)
    for arg in args:
        if arg in VALUED_ROOT_OPTIONS:
            next(args, None)
        elif arg in ROOT_FLAGS or arg.startswith(tuple(o + "=" for o in VALUED_ROOT_OPTIONS)):
            continue
        elif arg.startswith("-"):
            return None  # --help, --version, a typo: the whole app answers
        else:
            return arg
    return None


def own_options(root: Any, argv: Sequence[str]) -> set[str]:
    """The options of the (sub)command ``argv`` invokes (``creds create`` has its own
    ``--swarm``); empty when the line names no known command."""
    name = command_name(argv)
    command = getattr(root, "commands", {}).get(name)
    if command is None:
        return set()
    rest = iter(argv[list(argv).index(str(name)) + 1:])
    for arg in rest:
        if not hasattr(command, "commands"):
            break
        if arg in VALUED_ROOT_OPTIONS:
            next(rest, None)
        elif not arg.startswith("-"):
            sub = command.commands.get(arg)
            if sub is None:
                break
            command = sub
    return {opt for param in command.params
            for opt in (*param.opts, *param.secondary_opts)}


def load(name: str | None) -> None:
    """Import the modules defining ``name`` (all of them for None or an unknown name)."""
    for module in COMMANDS.get(name or "", MODULES):
        importlib.import_module(f"cflow.cli.{module}")


@contextlib.contextmanager
def only_invoked(app: Any, argv: Sequence[str]) -> Iterator[None]:
    """While Typer builds ``app``, register only the (sub)command ``argv`` invokes at
    each level it names. A level whose name is missing, unknown or behind an option of
    its own (``cfctl task``, ``task --help``, a typo) keeps every command, so its help,
    click's errors and suggestions are as before; the root's other commands are built
    on first use (``lazy_root``)."""
    from typer.main import get_command_name

    saved: list[tuple[Any, list[Any], list[Any]]] = []
    try:
        level, args = app, iter(argv)
        for arg in args:
            if arg in VALUED_ROOT_OPTIONS:
                next(args, None)
                continue
            if arg in ROOT_FLAGS or arg.startswith(tuple(o + "=" for o in VALUED_ROOT_OPTIONS)):
                continue
            if arg.startswith("-"):
                break
            named = [c for c in level.registered_commands
                     if (c.name or get_command_name(c.callback.__name__)) == arg]
            groups = [g for g in level.registered_groups if g.name == arg]
            if not named and not groups:
                break
            saved.append((level, level.registered_commands, level.registered_groups))
            level.registered_commands, level.registered_groups = named, groups
            if not groups:
                break
            level = groups[0].typer_instance
        yield
    finally:
        for level, named, groups in reversed(saved):
            level.registered_commands, level.registered_groups = named, groups


def lazy_root(root: Any, build: Callable[[], Any], tidy: Callable[[Any], None]) -> None:
    """Let ``root`` (built from the modules loaded so far) name every command and build
    one on first use: ``cfctl --help`` lists the panels without importing a module.

    ``build`` builds the root again from what is registered; ``tidy`` fixes the help
    of a command built late as ``main`` fixed the rest.
    """
    built = root.get_command

    def get_command(ctx: Any, name: str) -> Any:
        if name not in root.commands and name in COMMANDS:
            load(name)
            late = build().commands[name]
            tidy(late)
            root.commands[name] = late
        return built(ctx, name)

    root.get_command = get_command
    root.list_commands = lambda ctx: sorted(set(root.commands) | set(COMMANDS))


# ------------------------------------------------------------------ coercion


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off", ""}


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{value!r} is not a valid boolean")


def _number(kind: type[int] | type[float], info: Any) -> Callable[[Any], Any]:
    noun = "integer" if kind is int else "number"
    low: Any = getattr(info, "min", None)
    high: Any = getattr(info, "max", None)
    clamp = bool(getattr(info, "clamp", False))
    bounds = " and ".join([*([f"x>={low}"] if low is not None else []),
                           *([f"x<={high}"] if high is not None else [])])

    def parse(value: Any) -> Any:
        if isinstance(value, kind) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = kind(_text(value).strip())
            except ValueError:
                raise ValueError(f"{value!r} is not a valid {noun}") from None
        if (low is not None and number < low) or (high is not None and number > high):
            if not clamp:
                raise ValueError(f"{number} is not in the range {bounds}")
            number = kind(low) if low is not None and number < low else kind(high)
        return number

    return parse


def _plain_parser(descriptor: Any) -> Callable[[Any, Any, Any], Any] | None:
    """A direct conversion for a plain parameter type, or None (Typer's own then)."""
    from typing import get_args, get_origin

    info = descriptor.parameter_info
    if (getattr(info, "parser", None) is not None or descriptor.file_annotation is not None
            or descriptor.is_choice):
        return None
    annotation = descriptor.annotation
    if get_origin(annotation) is list and len(get_args(annotation)) == 1:
        item = _scalar(get_args(annotation)[0], info)
        if item is None:
            return None
        scalar = item

        def many(value: Any, param: Any, ctx: Any) -> Any:
            values = value if isinstance(value, (list, tuple)) else [value]
            return [scalar(v, param, ctx) for v in values]

        return many
    return _scalar(annotation, info)


def _scalar(annotation: Any, info: Any) -> Callable[[Any, Any, Any], Any] | None:
    simple: dict[Any, Callable[[Any], Any]] = {
        str: _text, bool: _bool, int: _number(int, info), float: _number(float, info)}
    if annotation in simple:
        convert = simple[annotation]
        return lambda value, param, ctx: convert(value)
    if annotation is Path and getattr(info, "path_type", None) is None:
        from typer._param_types import coerce_cli_path

        def path(value: Any, param: Any, ctx: Any) -> Any:
            given = value if isinstance(value, Path) else Path(_text(value))
            return coerce_cli_path(given, info, path_type=Path, param=param, ctx=ctx)

        return path
    return None


def plain_coercion() -> None:
    """Coerce plain parameter types without pydantic (see the module docstring).

    Does nothing on a Typer without per-parameter runtime coercion.
    """
    try:
        import typer.core as typer_core
        from typer._click.exceptions import BadParameter
        from typer._coercion import RuntimeParam
    except ImportError:
        return
    typers_own = getattr(typer_core, "build_runtime_param", None)
    if typers_own is None or getattr(typers_own, "plain", False):
        return

    class PlainRuntimeParam(RuntimeParam):
        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            try:
                return self.parse(value, param, ctx)  # type: ignore[attr-defined]
            except ValueError as err:
                raise BadParameter(str(err), ctx=ctx, param=param) from None

    def build_runtime_param(descriptor: Any) -> Any:
        parse = _plain_parser(descriptor)
        if parse is None:
            return typers_own(descriptor)
        runtime = PlainRuntimeParam(parameter_info=descriptor.parameter_info,
                                    annotation=descriptor.annotation)
        object.__setattr__(runtime, "parse", parse)  # a frozen dataclass
        return runtime

    build_runtime_param.plain = True  # type: ignore[attr-defined]
    typer_core.build_runtime_param = build_runtime_param  # type: ignore[attr-defined]
