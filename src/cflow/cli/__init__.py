"""`cfctl`, the command-line interface. Entry point only: nothing imports this package."""

from __future__ import annotations

import os

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
        command.main(args=argv, prog_name="cfctl")
    except KeyboardInterrupt:  # Ctrl-C before a command installed its own handling
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None


__all__ = ["app", "main"]
