"""`cfctl`, the command-line interface. Entry point only: nothing imports this package."""

from __future__ import annotations

import os
from typing import Any, NoReturn

# Typer's rich help formatter imports half of rich and pygments (~1 s on a busy
# 2-core machine); plain help keeps `cfctl --help` fast. Tables still use rich.
os.environ.setdefault("TYPER_USE_RICH", "0")


def __getattr__(name: str) -> object:
    # `app` (Typer) loads on first use, so `cfctl hook` never imports Typer.
    if name == "app":
        from cflow.cli.app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register() -> None:
    """Import every command module (each registers its commands on `app`)."""
    from cflow.cli.commands import load

    load(None)


def main() -> None:
    import sys

    if sys.argv[1:2] == ["hook"]:  # Claude Code waits on every hook: skip Typer entirely
        from cflow.hooks import main as hook_main

        raise SystemExit(hook_main(sys.argv[2:]))
    if sys.argv[1:2] == ["mcp"]:  # Claude Code waits for tools/list: answer before Typer loads
        from cflow.mcp.runtime import fast_main

        code = fast_main(sys.argv[2:])
        if code is not None:
            raise SystemExit(code)
    try:
        import typer.main

        from cflow.cli import commands
        from cflow.cli import help as cli_help
        from cflow.cli.app import app, hoist_global_flags

        commands.plain_coercion()
        name = commands.command_name(sys.argv[1:])
        if name is not None:
            commands.load(name)  # only the modules this line needs
        with commands.only_invoked(app, sys.argv[1:]):
            command = typer.main.get_command(app)
        commands.lazy_root(command, lambda: typer.main.get_command(app), cli_help.tidy)
        argv = hoist_global_flags(sys.argv[1:], commands.own_options(command, sys.argv[1:]))
        cli_help.tidy(command)
        command.format_commands = (  # type: ignore[attr-defined]
            lambda ctx, formatter: cli_help.format_commands(command, ctx, formatter))
        end = argv.index("--") if "--" in argv else len(argv)
        if "--json" in argv[:end]:
            _main_json(command, argv)
        command.main(args=argv, prog_name="cfctl")
    except KeyboardInterrupt:  # Ctrl-C before a command installed its own handling
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None


def _main_json(command: Any, argv: list[str]) -> NoReturn:
    """``command.main`` under ``--json``: a usage error is one JSON line on stderr, in
    the shape of every other error (:func:`cflow.cli.app.fail`), exit 2."""
    import json
    import sys

    # Typer vendors click; its errors are this copy's classes.
    from typer import Abort
    from typer._click import exceptions as click

    from cflow.cli.app import EXIT_NAMES

    try:
        # Not standalone: click would print its usage block for a usage error itself.
        code = command.main(args=argv, prog_name="cfctl", standalone_mode=False)
    except click.NoArgsIsHelpError as err:  # a bare group: its help is what was asked for
        err.show()
        raise SystemExit(err.exit_code) from None
    except click.UsageError as err:
        message = err.format_message()
        if err.ctx is not None:
            message += f"; see '{err.ctx.command_path} --help'"
        sys.stderr.write(json.dumps({"error": message, "exit_code": err.exit_code,
                                     "kind": EXIT_NAMES.get(err.exit_code, "error")}) + "\n")
        raise SystemExit(err.exit_code) from None
    except click.ClickException as err:
        err.show()
        raise SystemExit(err.exit_code) from None
    except Abort:
        sys.stderr.write("Aborted!\n")
        raise SystemExit(1) from None
    # A command's return value is no exit code; an Exit it raised comes back as one.
    raise SystemExit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
