"""`cfctl` cold start (issue 18): a command line imports only the modules defining its
command, and plain parameter values are coerced without pydantic. Speed itself is
measured in bench/cli_start.py, never here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cflow.cli import commands

PROBE = """
import atexit, sys
def report():
    mods = sorted(m for m in sys.modules if m.startswith(("cflow.cli.", "pydantic")))
    sys.stderr.write("MODULES " + " ".join(mods) + "\\n")
atexit.register(report)
sys.argv = ["cfctl", *sys.argv[1:]]
from cflow.cli import main
main()
"""


def loaded(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                          text=True, timeout=60, check=False)
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("MODULES "))
    return proc, set(line.split()[1:])


def test_the_command_map_matches_what_each_module_registers() -> None:
    from cflow.cli import _register
    from cflow.cli.app import app

    _register()
    found: dict[str, set[str]] = {}
    for info in app.registered_commands:
        assert info.callback is not None
        name = info.name or info.callback.__name__.replace("_", "-")
        found.setdefault(name, set()).add(info.callback.__module__)
    for group in app.registered_groups:
        assert group.name is not None and group.typer_instance is not None
        for sub in group.typer_instance.registered_commands:
            assert sub.callback is not None
            found.setdefault(group.name, set()).add(sub.callback.__module__)
    assert set(found) == set(commands.COMMANDS), "update cflow.cli.commands.COMMANDS"
    for name, modules in found.items():
        short = {m.removeprefix("cflow.cli.") for m in modules}
        # in registration order: the module creating a shared group comes first
        assert commands.COMMANDS[name] == tuple(m for m in commands.MODULES if m in short), name


@pytest.mark.parametrize(("argv", "name"), [
    (["task", "add", "x"], "task"),
    (["--url", "nats://h:1", "--swarm", "s", "--json", "status"], "status"),
    (["--url=nats://h:1", "msg", "ack", "01"], "msg"),
    (["--help"], None), (["--version"], None), ([], None), (["--bogus", "task"], None),
])
def test_the_command_name_is_read_past_the_global_options(argv: list[str],
                                                          name: str | None) -> None:
    assert commands.command_name(argv) == name


def test_a_command_loads_only_its_modules_and_no_pydantic() -> None:
    proc, modules = loaded("--swarm", "s", "task", "show", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage: cfctl task show" in proc.stdout
    assert not {m for m in modules if m.startswith("pydantic")}, modules
    assert "cflow.cli.task_cmds" in modules and "cflow.cli.merge_cmds" in modules
    assert not modules & {"cflow.cli.worker_cmds", "cflow.cli.ui_cmds", "cflow.cli.ops_cmds"}
    # no command name: no module, the panels list every command; a typo: all of them
    for line in (["--help"], [], ["--version"]):
        proc, modules = loaded(*line)
        assert proc.returncode == (2 if not line else 0), proc.stderr
        assert not {f"cflow.cli.{m}" for m in commands.MODULES} & modules
    proc, modules = loaded("tsk")
    assert proc.returncode == 2 and "No such command 'tsk'" in proc.stderr
    assert {f"cflow.cli.{m}" for m in commands.MODULES} <= modules


def test_typer_builds_only_the_invoked_command() -> None:
    import typer.main

    from cflow.cli import _register
    from cflow.cli.app import app

    _register()

    def built(*argv: str) -> Any:
        with commands.only_invoked(app, argv):
            return typer.main.get_command(app)

    everything = built()
    assert len(everything.commands["task"].commands) > 10
    root = built("--swarm", "s", "task", "--json", "add", "x", "--priority", "1")
    assert list(root.commands) == ["task"]
    assert list(root.commands["task"].commands) == ["add"]
    assert list(built("status", "--json").commands) == ["status"]
    # no subcommand named, help, an option first, a typo: the level keeps every command
    for argv in (["task"], ["task", "--help"], ["merges", "--all", "remove", "x"],
                 ["task", "ad"]):
        group = built(*argv).commands[argv[0]]
        assert set(group.commands) == set(everything.commands[argv[0]].commands), argv
    assert set(built("tsk").commands) == set(everything.commands)
    # the registrations are back for the next build
    assert set(built().commands) == set(everything.commands)
    proc, _ = loaded("task", "ad")
    assert proc.returncode == 2 and "Did you mean 'add'?" in proc.stderr


def test_top_level_help_lists_every_command_without_loading_one() -> None:
    from cflow.cli import _register, help
    from cflow.cli.app import app

    _register()
    hidden = {i.name for i in app.registered_commands if i.hidden}
    hidden |= {g.name for g in app.registered_groups if g.hidden}
    assert hidden == commands.HIDDEN
    in_panels = {name for _, rows in help.PANELS for name, _ in rows}
    assert set(commands.COMMANDS) - commands.HIDDEN == in_panels
    proc, _ = loaded("--help")
    for name in in_panels:
        assert f"  {name} " in proc.stdout, name


def test_bad_values_are_usage_errors_as_before() -> None:
    proc, _ = loaded("task", "add", "x", "--priority", "high")
    assert proc.returncode == 2
    assert "Invalid value for '--priority' / '-p': 'high' is not a valid integer" in proc.stderr
    proc, modules = loaded("report", "agents", "--limit", "0")
    assert proc.returncode == 2
    assert "Invalid value for '--limit': 0 is not in the range x>=1" in proc.stderr
    assert not {m for m in modules if m.startswith("pydantic")}
    proc, _ = loaded("report", "nosuch")  # `report merges` is known without the rest
    assert proc.returncode == 2 and "merges" in proc.stderr.split("one of:")[1]


def descriptor(annotation: Any, **info: Any) -> Any:
    from typer._coercion import resolve_type_descriptor
    from typer.models import OptionInfo

    return resolve_type_descriptor(annotation, OptionInfo(**info))


def test_plain_parsers_convert_like_typer() -> None:
    def parse(annotation: Any, value: Any, **info: Any) -> Any:
        parser = commands._plain_parser(descriptor(annotation, **info))
        assert parser is not None
        return parser(value, None, None)

    assert parse(str, b"caf\xc3\xa9") == "café"
    assert parse(int, " 42 ") == 42 and parse(float, "0.5") == 0.5
    assert parse(bool, "yes") is True and parse(bool, "0") is False
    assert parse(Path, "a/b") == Path("a/b")
    assert parse(list[str], ("a", "b")) == ["a", "b"]
    assert parse(int, "9", max=5, clamp=True) == 5
    with pytest.raises(ValueError, match="'x' is not a valid number"):
        parse(float, "x")
    with pytest.raises(ValueError, match="7 is not in the range x>=1 and x<=5"):
        parse(int, "7", min=1, max=5)


def test_other_types_stay_with_typer() -> None:
    import enum

    class Mode(enum.Enum):
        a = "a"

    assert commands._plain_parser(descriptor(Mode)) is None
    assert commands._plain_parser(descriptor(int, parser=int)) is None
