"""`cfctl`, the command-line interface. Entry point only: nothing imports this package."""

from __future__ import annotations

import importlib
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


# Each module registers its commands on `app` when imported.
_COMMAND_MODULES = (
    "server_cmds",
    "task_cmds",
    "projection_cmds",
    "bench_cmds",
    "agent_cmds",
    "worker_cmds",
    "memory_cmds",
    "msg_cmds",
    "reserve_cmds",
    "import_cmds",
    "mcp_cmds",
    "ops_cmds",
    "merge_cmds",
    "ui_cmds",
)


def _register() -> None:
    for name in _COMMAND_MODULES:
        importlib.import_module(f"cflow.cli.{name}")


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
    from cflow.cli.app import app

    _register()
    app()


__all__ = ["app", "main"]
