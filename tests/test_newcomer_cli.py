"""What a newcomer following the README ran into: a command that stops after its server
went away, usage errors under ``--json``, which projection file a rebuild touches,
``cfctl down`` hints, empty ids and bad swarm names, bad URLs, the status layout."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from faults import RestartableServer
from test_cli_interrupt import CFCTL, Session, assert_clean_stop

pytestmark = pytest.mark.e2e


def cfctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CFCTL, *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_ctrl_c_leaves_top_cleanly_after_the_server_went_away(tmp_path: Path) -> None:
    with RestartableServer(tmp_path / "nats", sync="default") as server:
        env = {**os.environ, "CFLOW_URL": server.url, "CFLOW_SWARM": "gone",
               "XDG_DATA_HOME": str(tmp_path)}
        assert cfctl("init", env=env).returncode == 0
        s = Session(["--json", "top"], env)
        try:
            s.wait_for("swarm")
            server.stop()
            s.wait_for('"connected": false', within=30)
            time.sleep(10)  # nats-py is between reconnect attempts by then
            s.pump(0.1)
            took, below = s.interrupt()
            assert s.proc.returncode == 130, s.text()
            assert_clean_stop(s, took, below, None)
            [line] = s.out["stderr"].decode().strip().splitlines()
            assert json.loads(line) == {"interrupted": "left the live view", "exit_code": 130}
        finally:
            s.close()


def test_ctrl_c_stops_a_projector_cleanly_after_the_server_went_away(tmp_path: Path) -> None:
    with RestartableServer(tmp_path / "nats", sync="default") as server:
        env = {**os.environ, "CFLOW_URL": server.url, "CFLOW_SWARM": "gone",
               "XDG_DATA_HOME": str(tmp_path)}
        s = Session(["projector", "--db", str(tmp_path / "p.duckdb")], env)
        try:
            s.wait_for("projector: swarm")
            server.stop()
            time.sleep(10)  # nats-py is between reconnect attempts by then
            s.pump(0.1)
            took, below = s.interrupt()
            assert s.proc.returncode == 130, s.text()
            assert_clean_stop(s, took, below, "interrupted: stopped the projector")
        finally:
            s.close()


@pytest.mark.parametrize(("args", "message"), [
    (["--json", "tsk"], "No such command 'tsk'. Did you mean 'task'?; see 'cfctl --help'"),
    (["--json", "task", "add", "x", "--bogus"],
     "No such option: --bogus (Possible options: --body); see 'cfctl task add --help'"),
    (["task", "add", "x", "--bogus", "--json"],  # --json after the subcommand too
     "No such option: --bogus (Possible options: --body); see 'cfctl task add --help'"),
    (["task", "add", "--json"], "Missing argument 'TITLE'.; see 'cfctl task add --help'"),
])
def test_usage_errors_under_json_are_one_json_line(args: list[str], message: str,
                                                   tmp_path: Path) -> None:
    done = cfctl(*args, env={**os.environ, "XDG_DATA_HOME": str(tmp_path)})
    assert done.returncode == 2
    assert done.stdout == ""
    assert json.loads(done.stderr) == {"error": message, "exit_code": 2, "kind": "usage"}


def test_usage_errors_without_json_keep_clicks_text(tmp_path: Path) -> None:
    done = cfctl("task", "add", "x", "--bogus", env={**os.environ, "XDG_DATA_HOME": str(tmp_path)})
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "Usage: cfctl task add [OPTIONS] TITLE", "Try 'cfctl task add --help' for help.", "",
        "Error: No such option: --bogus (Possible options: --body)"]


def test_exit_codes_under_json_are_unchanged(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}
    down = cfctl("--json", "--url", "nats://127.0.0.1:1", "status", env=env)
    assert down.returncode == 6
    assert json.loads(down.stderr)["kind"] == "unavailable"
    assert cfctl("--json", "--version", env=env).returncode == 0
    assert cfctl("--json", "task", "--help", env=env).returncode == 0


def test_rebuild_without_db_rebuilds_the_running_projectors_file(
        cli_env: dict[str, str], swarm_name: str, tmp_path: Path) -> None:
    served = tmp_path / "node" / "served.duckdb"
    served.parent.mkdir()
    assert cfctl("task", "add", "x", env=cli_env).returncode == 0
    default = tmp_path / "cflow" / "projections" / swarm_name / "projection.duckdb"
    s = Session(["projector", "--db", str(served)], cli_env)
    try:
        s.wait_for("projector: swarm")
        done = cfctl("--json", "projections", "rebuild", env=cli_env)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert Path(result["path"]).resolve() == served.resolve()
        assert result["background"]
        assert not default.exists()
        s.interrupt()
    finally:
        s.close()
    done = cfctl("projections", "rebuild", env=cli_env)  # no projector runs now
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"no projector of swarm {swarm_name} runs: rebuilding the default file {default}")
    assert done.stdout.startswith(f"rebuilt {default}: ")
    assert default.exists()


def test_a_second_up_names_the_down_that_works_and_down_says_where_no_node_is(
        tmp_path: Path) -> None:
    from cflow.server import free_port

    port, node, xdg = free_port(), tmp_path / "node", tmp_path / "xdg"
    env = {**os.environ, "XDG_DATA_HOME": str(xdg), "CFLOW_URL": f"nats://127.0.0.1:{port}"}
    up = cfctl("up", "--detach", "--port", str(port), "--data-dir", str(node), env=env)
    assert up.returncode == 0, up.stderr
    try:
        for again in (["--data-dir", str(node)], []):  # the same dir, or the default one
            second = cfctl("up", "--detach", "--port", str(port), *again, env=env)
            assert second.returncode != 0
            assert f"stop it with `cfctl down --data-dir {node}`" in second.stderr, second.stderr
        down = cfctl("down", env=env)
        assert down.returncode == 5
        assert down.stderr == (
            f"error: no cflow node was started with data dir {xdg / 'cflow'}; pass the "
            f"--data-dir it was started with (`cfctl down --data-dir {node}` stops the one "
            f"on port {port})\n")
    finally:
        down = cfctl("down", "--data-dir", str(node), env=env)
    assert down.returncode == 0, down.stderr
    gone = cfctl("down", "--data-dir", str(node), "--port", str(port), env=env)
    assert gone.returncode == 5
    assert gone.stderr == (f"error: no cflow node was started on port {port} with data dir "
                           f"{node}; pass the --data-dir it was started with\n")


@pytest.mark.parametrize("args", [
    ["task", "cancel", ""], ["task", "cancel", "  "], ["task", "show", ""],
    ["msg", "ack", ""],
])
def test_an_empty_id_is_a_usage_error(args: list[str], cli_env: dict[str, str]) -> None:
    for _ in range(2):  # several tasks: an empty prefix would match them all
        assert cfctl("task", "add", "x", env=cli_env).returncode == 0
    done = cfctl(*args, env=cli_env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].startswith("Error: an id is required (the ")
    as_json = json.loads(cfctl("--json", *args, env=cli_env).stderr)
    assert as_json["exit_code"] == 2 and as_json["kind"] == "usage"
    assert as_json["error"].startswith("an id is required")


@pytest.mark.parametrize("swarm", ["a.b", "", "x y"])
def test_a_bad_swarm_name_is_a_one_line_usage_error(swarm: str, tmp_path: Path) -> None:
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "CFLOW_URL": "nats://127.0.0.1:1"}
    done = cfctl("--swarm", swarm, "task", "list", env=env)
    assert done.returncode == 2
    assert done.stderr == (f"error: swarm {swarm!r} must be 1-128 characters of letters, "
                           "digits, '-' or '_'\n")
    from_env = cfctl("task", "list", env={**env, "CFLOW_SWARM": swarm or "-."})
    assert from_env.returncode == 2


@pytest.mark.parametrize("url", ["bogus://x", "http://user:secret@host:4222",
                                 "nats://127.0.0.1:4222,ftp://y"])
def test_a_url_that_is_not_nats_is_a_usage_error(url: str, tmp_path: Path) -> None:
    done = cfctl("--url", url, "status", env={**os.environ, "XDG_DATA_HOME": str(tmp_path)})
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.endswith("is not a NATS URL (schemes: nats://, tls://, ws://, wss://)"), line
    assert "secret" not in line and "reachable" not in line


def test_status_labels_line_up(cli_env: dict[str, str]) -> None:
    assert cfctl("init", env=cli_env).returncode == 0
    done = cfctl("status", env=cli_env)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line and not line.startswith(" ")]
    labels = {line.split()[0] for line in rows}
    assert {"server", "jetstream", "swarm", "control", "maint", "queries"} <= labels, rows
    # every value starts in the same column, one past the longest label and a space
    assert {len(line) - len(line[len(line.split()[0]):].lstrip()) for line in rows} == {11}, rows
