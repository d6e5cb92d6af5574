"""`cfctl`, the command-line interface. Entry point only: nothing imports this package."""

from __future__ import annotations

import importlib
import os

# Typer's rich help formatter imports half of rich and pygments (~1 s on a busy
# 2-core machine); plain help keeps `cfctl --help` fast. Tables still use rich.
os.environ.setdefault("TYPER_USE_RICH", "0")

from cflow.cli.app import app  # noqa: E402

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
)


def _register() -> None:
    for name in _COMMAND_MODULES:
        importlib.import_module(f"cflow.cli.{name}")


def main() -> None:
    _register()
    app()


__all__ = ["app", "main"]
