"""What a newcomer following the README ran into with `cfctl task` and `cfctl worker`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

CFCTL = [sys.executable, "-c", "from cflow.cli import main; main()"]


def cfctl(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CFCTL, *args], env=env, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"cfctl {args} -> {proc.returncode}: {proc.stderr}")
    return proc


def test_a_comma_in_capabilities_separates_them_everywhere(
        cli_env: dict[str, str], tmp_path: Path) -> None:
    both = cfctl(cli_env, "task", "add", "both", "--needs", "python, rust,").stdout.strip()
    shown = json.loads(cfctl(cli_env, "--json", "task", "show", both).stdout)
    assert shown["capabilities"] == ["python", "rust"]
    worked = cfctl(cli_env, "worker", "--name", "w1", "-c", "python,rust", "--max-tasks", "1",
                   "--exec", "echo done")
    assert "stopped: 1 completed" in worked.stderr
    assert json.loads(cfctl(cli_env, "--json", "task", "show", both).stdout)["status"] == (
        "completed")

    again = cfctl(cli_env, "task", "add", "again", "--needs", "rust", "--needs", "python,go"
                  ).stdout.strip()
    caps = json.loads(cfctl(cli_env, "--json", "task", "show", again).stdout)["capabilities"]
    assert caps == ["go", "python", "rust"]
    assert cfctl(cli_env, "task", "claim", "-c", "python,rust", check=False).returncode == 3
    claimed = cfctl(cli_env, "task", "claim", "-c", "python,rust", "-c", "go").stdout.split()
    assert claimed[0] == again

    jsonl = tmp_path / "tasks.jsonl"
    jsonl.write_text(json.dumps({"title": "imported", "needs": ["python,rust"]}) + "\n")
    imported = cfctl(cli_env, "task", "import", str(jsonl)).stdout.strip()
    caps = json.loads(cfctl(cli_env, "--json", "task", "show", imported).stdout)["capabilities"]
    assert caps == ["python", "rust"]
