"""`cfctl swarm / gate / budget / breaker / metrics / top` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from cflow.cli.ops_cmds import LiveState, control_lines, render_live
from cflow.metrics import MetricsFold, parse_text, value_of

CFCTL = [sys.executable, "-c", "from cflow.cli import main; main()"]


def cfctl(env: dict[str, str], *args: str, check: bool = True,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CFCTL, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"cfctl {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


def test_control_lines_make_a_stop_prominent() -> None:
    lines = control_lines({"mode": "stopped", "actor": "alice", "reason": "runaway",
                           "paused_scopes": [], "open_breakers": [], "budgets": {},
                           "pending_gates": [{"task_id": "g1", "title": "review",
                                              "waiting_for_deps": False}]})
    assert lines[0] == "*** SWARM STOPPED by alice: runaway ***"
    assert "  g1  review" in lines


def test_render_live_shows_pause_banner_and_gates() -> None:
    live = LiveState("s1", MetricsFold())
    live.control = {"mode": "paused", "actor": "bob", "reason": "lunch",
                    "paused_scopes": [], "open_breakers": []}
    console = Console(record=True, width=120)
    console.print(render_live(live.snapshot()))
    text = console.export_text()
    assert "SWARM PAUSED by bob: lunch" in text
    assert "projection lag 0" in text


@pytest.mark.integration
def test_cli_pause_gate_budget_metrics_and_top(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "CFLOW_AGENT": "carol"}
    gate = json.loads(cfctl(env, "--json", "task", "add", "review the release",
                            "--gate").stdout)
    gate_id = gate["task_id"]
    cfctl(env, "swarm", "pause", "--reason", "release freeze")
    state = json.loads(cfctl(env, "--json", "swarm", "state").stdout)
    assert (state["mode"], state["actor"], state["reason"]) == ("paused", "carol",
                                                                "release freeze")
    assert [g["task_id"] for g in state["pending_gates"]] == [gate_id]
    status = cfctl(env, "status").stdout
    assert "*** SWARM PAUSED by carol: release freeze ***" in status
    assert gate_id in status

    top = cfctl(env, "top", "--for", "1.5")
    assert "SWARM PAUSED by carol: release freeze" in top.stdout

    out = cfctl(env, "budget", "set", "--max-depth", "3", "--breaker-cooldown", "5").stdout
    assert out == ("budget of swarm " + env["CFLOW_SWARM"] + ": at most sub-tasks 3 levels "
                   "deep; a capability's breaker stays open 5 s\n")
    bad = cfctl(env, "budget", "set", "--scope", "nope", "--max-depth", "1", check=False)
    assert bad.returncode == 5 and "not found" in bad.stderr

    approved = cfctl(env, "gate", "approve", gate_id, "--note", "ship it").stdout
    assert f"gate {gate_id} approved by carol" in approved
    again = cfctl(env, "gate", "reject", gate_id, check=False)
    assert again.returncode == 1 and "already completed" in again.stderr
    cfctl(env, "swarm", "resume")
    stopped = cfctl(env, "swarm", "stop", "--now", "--reason", "drill").stdout
    assert "swarm STOPPED by carol, 0 claimed tasks cancelled: drill" in stopped

    samples = parse_text(cfctl(env, "metrics").stdout)
    assert value_of(samples, "cflow_completions_total") == 1
    assert value_of(samples, "cflow_swarm_paused", mode="stopped") == 1
    assert value_of(samples, "cflow_events_total", type="SwarmPaused") == 1


@pytest.mark.integration
def test_projector_serves_metrics_on_its_port(cli_env: dict[str, str], tmp_path: Path) -> None:
    import time
    import urllib.error
    import urllib.request

    from cflow.server import free_port

    cfctl(cli_env, "task", "add", "one")
    port = free_port()
    errors = (tmp_path / "projector.err").open("w")
    proc = subprocess.Popen([*CFCTL, "projector", "--db", str(tmp_path / "p.duckdb"),
                             "--metrics-port", str(port)], env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=errors)
    try:
        deadline = time.monotonic() + 30
        body = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=2) as resp:
                    body = resp.read().decode()
                samples = parse_text(body)
                if value_of(samples, "cflow_projection_lag") == 0:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)  # a subprocess binding its port is not an event we can await
        samples = parse_text(body)
        assert body, (tmp_path / "projector.err").read_text()
        assert value_of(samples, "cflow_tasks_created_total") == 1
        assert value_of(samples, "cflow_projection_lag") == 0
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        errors.close()
