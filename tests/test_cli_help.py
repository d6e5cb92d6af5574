"""`cfctl --help` and friends as a newcomer reads them: panels, one line per command,
plain metavars, `--version`; the Docker engine's own exit code."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

CFCTL = [sys.executable, "-c", "from cflow.cli import main; main()"]


def cfctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CFCTL, *args], capture_output=True, text=True, timeout=60,
                          env=env, check=False)


def test_top_level_help_is_grouped_and_fits() -> None:
    out = cfctl("--help")
    assert out.returncode == 0, out.stderr
    for panel in ("Start here:", "Work:", "Views and analytics:", "Operating:"):
        assert panel in out.stdout
    lines = out.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [ln for ln in lines if len(ln) > 80]
    assert "..." not in out.stdout.split("Start here:")[1]  # no cut descriptions
    assert "node-services" not in out.stdout  # internal


@pytest.mark.parametrize("command", [
    ["task", "add"], ["task", "show"], ["msg", "send"], ["worker"], ["up"], ["budget", "set"],
    ["task", "import"], ["memory", "set"], ["reserve"],
])
def test_command_help_has_no_python_types_or_placeholders(command: list[str]) -> None:
    out = cfctl(*command, "--help")
    assert out.returncode == 0, out.stderr
    assert not re.search(r"<(str|int|float|list\[str\]|path|bool)>", out.stdout), out.stdout
    assert "{" not in out.stdout.splitlines()[0], out.stdout


def test_version_is_the_installed_distribution_version() -> None:
    from importlib.metadata import version

    out = cfctl("--version")
    assert out.returncode == 0 and re.fullmatch(r"cfctl \d+\.\d+\.\d+\S*\n", out.stdout)
    assert out.stdout == f"cfctl {version('cflow')}\n"  # cflow.__version__ = pyproject's


def test_docker_unreachable_has_its_own_exit_code(tmp_path: object) -> None:
    env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock",
           "CFLOW_URL": "nats://127.0.0.1:1"}
    out = cfctl("worker", "--docker", "busybox", env=env)
    assert out.returncode == 7, out.stderr
    assert out.stderr.startswith("error: no Docker engine reachable")
    assert out.stderr.count("\n") == 1
