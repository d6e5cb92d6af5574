"""The global options (``--url``, ``--swarm``, ``--json``, ``--debug``) work before or
after the subcommand, as a newcomer types them (issue 18)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cflow.cli.app import hoist_global_flags

CFCTL = [sys.executable, "-c", "from cflow.cli import main; main()"]


@pytest.mark.parametrize(("argv", "own", "hoisted"), [
    (["task", "list", "--url", "nats://h:1", "--swarm", "s"], (),
     ["--url", "nats://h:1", "--swarm", "s", "task", "list"]),
    (["task", "add", "x", "--swarm=s", "--json", "--url=nats://h:1"], (),
     ["--swarm=s", "--json", "--url=nats://h:1", "task", "add", "x"]),
    (["--json", "status", "--json"], (), ["--json", "status"]),
    # the subcommand's own --swarm stays its own
    (["creds", "create", "a", "--swarm", "s"], {"--swarm"},
     ["creds", "create", "a", "--swarm", "s"]),
    # nothing moves past --, and a trailing --url without a value is left to click
    (["worker", "--", "cmd", "--url", "x"], (), ["worker", "--", "cmd", "--url", "x"]),
    (["task", "list", "--url"], (), ["task", "list", "--url"]),
])
def test_global_options_move_in_front(argv: list[str], own: set[str],
                                      hoisted: list[str]) -> None:
    assert hoist_global_flags(argv, own) == hoisted


def test_own_options_of_the_invoked_command() -> None:
    import typer.main

    from cflow.cli import _register, commands
    from cflow.cli.app import app

    _register()
    root = typer.main.get_command(app)
    assert "--swarm" in commands.own_options(root, ["creds", "create", "a", "--swarm", "s"])
    task_add = commands.own_options(root, ["--url", "u", "task", "add", "x", "--swarm", "s"])
    assert "--priority" in task_add and "--swarm" not in task_add
    assert commands.own_options(root, ["nosuch", "--swarm", "s"]) == set()


@pytest.mark.e2e
def test_url_and_swarm_after_the_subcommand(cli_env: dict[str, str]) -> None:
    url, swarm = cli_env["CFLOW_URL"], cli_env["CFLOW_SWARM"]
    wrong = {**cli_env, "CFLOW_URL": "nats://127.0.0.1:1", "CFLOW_SWARM": "elsewhere"}

    def cfctl(*args: str) -> str:
        proc = subprocess.run([*CFCTL, *args], env=wrong, capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    task = cfctl("task", "add", "placed after", "--url", url, "--swarm", swarm).strip()
    listed = json.loads(cfctl("task", "list", f"--swarm={swarm}", "--json", f"--url={url}"))
    assert [t["task_id"] for t in listed] == [task]
    assert json.loads(cfctl("--url", url, "task", "show", task[:13], "--swarm", swarm,
                            "--json"))["title"] == "placed after"
