"""`cfctl demo` end to end, and its DAG planner."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from cflow.demo import plan_dag, worker_caps

CFCTL = [sys.executable, "-c", "from cflow.cli import main; main()"]


@pytest.mark.parametrize("n", [5, 30, 40, 200])
def test_plan_dag_shape(n: int) -> None:
    plan = plan_dag(n, 1.0, random.Random(1))
    assert len(plan.titles) == n
    assert plan.titles[0] == "plan the release" and plan.titles[-1] == "release"
    assert all(all(d < i for d in deps) for i, deps in enumerate(plan.deps))  # a DAG
    needed = {c for caps in plan.capabilities for c in caps}
    offered = set(worker_caps(0)) | set(worker_caps(1))
    assert needed <= offered
    assert any(b.split()[1] != "0" for b in plan.bodies)  # some tasks fail first


@pytest.mark.e2e
def test_cfctl_demo_completes_and_prints_summary(cli_env: dict[str, str]) -> None:
    proc = subprocess.run([*CFCTL, "demo", "--agents", "3", "--tasks", "30", "--work", "0.6",
                           "--seed", "7"], env=cli_env, capture_output=True, timeout=240,
                          check=False)
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode() + out
    assert "cflow demo summary" in out
    assert "30 created, 29 completed, 1 failed for good" in out
    assert "kill -9 demo-w" in out
    assert "expired and reclaimed" in out and "cycle time" in out
    assert "(retried)" not in out and " 1 final)" in out  # the final failure is no retry
    assert not any(len(line) > 80 and " " not in line for line in out.splitlines())


@pytest.mark.e2e
def test_cfctl_demo_json(cli_env: dict[str, str]) -> None:
    proc = subprocess.run([*CFCTL, "--json", "demo", "--agents", "2", "--tasks", "8",
                           "--work", "0.2", "--no-kill"], env=cli_env, capture_output=True,
                          timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    summary = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert summary["tasks"] == 8 and summary["completed"] == 7 and summary["failed_tasks"] == 1
    assert summary["reclaims"] == 0 and summary["killed"] is None
