"""What a newcomer following the README ran into with `cfctl task` and `cfctl worker`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from test_cli_tasks import CFCTL, cfctl

pytestmark = pytest.mark.e2e



def test_a_comma_in_capabilities_separates_them_everywhere(
        cli_env: dict[str, str], tmp_path: Path) -> None:
    both = cfctl(cli_env, "task", "add", "both", "--needs", "python, rust,").stdout.strip()
    shown = json.loads(cfctl(cli_env, "--json", "task", "show", both).stdout)
    assert shown["capabilities"] == ["python", "rust"]
    worked = cfctl(cli_env, "worker", "--name", "w1", "-c", "python,rust", "--max-tasks", "1",
                   "--exec", "echo done")
    assert "stopped: 1 completed" in worked.stderr
    assert "[w1] start: w1 claiming with 1 slot\n" in worked.stderr
    assert "[w1] drain: draining; 0 tasks running\n" in worked.stderr
    assert "(s)" not in worked.stderr
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


def claims_by(env: dict[str, str], task_ids: list[str], agent: str) -> dict[str, int]:
    """TaskClaimed events by ``agent``, per task, from each task's event timeline."""
    out = {}
    for task_id in task_ids:
        timeline = json.loads(cfctl(env, "--json", "task", "show", task_id).stdout)["timeline"]
        out[task_id] = sum(1 for row in timeline
                           if row["type"] == "TaskClaimed" and row["actor"] == agent)
    return out


@pytest.mark.parametrize(("concurrency", "max_tasks"), [(2, 1), (3, 2)])
def test_max_tasks_caps_the_claims_of_concurrent_slots(
        cli_env: dict[str, str], concurrency: int, max_tasks: int) -> None:
    ids = [cfctl(cli_env, "task", "add", f"t{i}").stdout.strip() for i in range(5)]
    worked = cfctl(cli_env, "worker", "--name", "w1", "--concurrency", str(concurrency),
                   "--max-tasks", str(max_tasks), "--exec", "sleep 0.2; echo done")
    assert f"stopped: {max_tasks} completed, 0 failed" in worked.stderr
    assert f"claiming with {concurrency} slots\n" in worked.stderr
    claims = claims_by(cli_env, ids, "w1")
    assert sum(claims.values()) == max_tasks and max(claims.values()) == 1
    statuses = [json.loads(cfctl(cli_env, "--json", "task", "show", t).stdout)["status"]
                for t in ids]
    assert statuses.count("completed") == max_tasks
    assert statuses.count("ready") == 5 - max_tasks


def test_a_claim_that_came_back_empty_is_given_back_to_max_tasks(
        cli_env: dict[str, str]) -> None:
    worker = subprocess.Popen(
        [*CFCTL, "worker", "--name", "w1", "--concurrency", "2", "--max-tasks", "1",
         "--claim-wait", "0.2", "--exec", "echo done"],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            worker.wait(1.5)  # several empty claims, none counted
        ids = [cfctl(cli_env, "task", "add", f"t{i}").stdout.strip() for i in range(3)]
        _, err = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, err
    assert "stopped: 1 completed" in err
    assert sum(claims_by(cli_env, ids, "w1").values()) == 1


def test_reimport_says_how_many_tasks_are_new(cli_env: dict[str, str], tmp_path: Path) -> None:
    jsonl = tmp_path / "tasks.jsonl"
    lines = [json.dumps({"id": "a", "title": "build"}),
             json.dumps({"title": "test", "after": ["a"]})]
    jsonl.write_text("\n".join(lines) + "\n")
    first = cfctl(cli_env, "task", "import", str(jsonl))
    assert first.stderr == f"imported 2 tasks from {jsonl}\n"
    again = cfctl(cli_env, "task", "import", str(jsonl))
    assert again.stderr == f"imported 0 new tasks from {jsonl} (2 already there)\n"
    assert again.stdout == first.stdout and len(first.stdout.split()) == 2
    jsonl.write_text("\n".join([*lines, json.dumps({"title": "docs"})]) + "\n")
    more = cfctl(cli_env, "task", "import", str(jsonl))
    assert more.stderr == f"imported 1 new task from {jsonl} (2 already there)\n"
    ids = more.stdout.split()
    assert ids[:2] == first.stdout.split() and len(ids) == 3
    as_json = cfctl(cli_env, "--json", "task", "import", str(jsonl))
    assert as_json.stderr == ""
    assert json.loads(as_json.stdout) == {"created": ids, "new": 0, "existing": 3}


def test_an_unknown_dependency_in_an_import_is_not_found(
        cli_env: dict[str, str], tmp_path: Path) -> None:
    jsonl = tmp_path / "tasks.jsonl"
    jsonl.write_text("\n".join([json.dumps({"title": "fine"}),
                                json.dumps({"title": "lost", "after": ["nosuch"]})]) + "\n")
    out = cfctl(cli_env, "task", "import", str(jsonl), check=False)
    assert out.returncode == 5, out.stderr
    assert out.stderr == (f"error: {jsonl}:2: dependency not found: nosuch "
                          "(no task, nor an earlier line's id)\n")
    whole = "0" * 8 + "-0000-5000-8000-" + "0" * 12  # a whole id no task has
    jsonl.write_text("\n".join([json.dumps({"title": "fine"}),
                                json.dumps({"title": "orphan", "parent": whole})]) + "\n")
    out = cfctl(cli_env, "task", "import", str(jsonl), check=False)
    assert out.returncode == 5, out.stderr
    assert out.stderr.startswith(f"error: {jsonl}:2: parent task not found: {whole} ")
    assert json.loads(cfctl(cli_env, "--json", "task", "list").stdout) == []


def test_task_show_prints_labels_and_human_times(cli_env: dict[str, str]) -> None:
    import datetime
    import re

    from cflow.hlc import Timestamp

    task = cfctl(cli_env, "task", "add", "labelled", "--label", "area=core", "--label",
                 "team=db").stdout.strip()
    text = cfctl(cli_env, "task", "show", task).stdout
    assert re.search(r"^ *labels +area=core, team=db *$", text, re.MULTILINE), text
    assert "@" not in text  # no raw HLC stamp
    shown = json.loads(cfctl(cli_env, "--json", "task", "show", task).stdout)
    assert shown["labels"] == {"area": "core", "team": "db"}
    created = shown["timeline"][0]
    assert Timestamp.parse(created["hlc"]).readable() == created["at"]  # --json: exact stamp
    wall_s = Timestamp.parse(created["hlc"]).wall_ms / 1000
    when = datetime.datetime.fromtimestamp(wall_s, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    row = next(line for line in text.splitlines() if "TaskCreated" in line)
    assert row.split()[-2:] == when.split()
    unlabelled = cfctl(cli_env, "task", "add", "plain").stdout.strip()
    text = cfctl(cli_env, "task", "show", unlabelled).stdout
    assert re.search(r"^ *labels +- *$", text, re.MULTILINE), text


def test_sigterm_drains_a_worker_then_says_so_and_exits_130(
        cli_env: dict[str, str], tmp_path: Path) -> None:
    import signal

    from test_cli_interrupt import Session

    task = cfctl(cli_env, "task", "add", "short job").stdout.strip()
    s = Session(["worker", "--name", "w1", "--exec", "sleep 1; echo done"], cli_env)
    try:
        s.wait_for("[w1] claimed:", within=30)
        s.proc.send_signal(signal.SIGTERM)  # a supervisor, not a terminal: the worker alone
        s.wait_for("interrupted: drained worker", within=30)
        s.proc.wait(30)
        while s.sel.get_map():
            s.pump(1.0)
    finally:
        s.close()
    text = s.out["stderr"].decode()
    assert s.proc.returncode == 130, text
    assert "[w1] drain: draining; 1 task running\n" in text and "Traceback" not in text
    assert text.splitlines()[-1] == (
        "interrupted: drained worker w1 (1 completed, 0 failed, 0 lost, 0 released)")
    assert s.out["stdout"] == b""
    assert json.loads(cfctl(cli_env, "--json", "task", "show", task).stdout)["status"] == (
        "completed")
