"""`cfctl task ...` as a user runs it: real subprocesses against the test server."""

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


def test_task_lifecycle_from_the_shell(cli_env: dict[str, str]) -> None:
    first = cfctl(cli_env, "task", "add", "first", "--priority", "2", "--label", "area=docs"
                  ).stdout.strip()
    second = cfctl(cli_env, "task", "add", "second", "--after", first).stdout.strip()
    assert first != second
    claimed = cfctl(cli_env, "task", "claim", "--agent", "me").stdout.split()
    assert claimed[0] == first and int(claimed[1]) > 0
    epoch = claimed[1]
    assert cfctl(cli_env, "task", "heartbeat", first, "--epoch", epoch, "--agent", "me"
                 ).stdout.strip() == "ok"
    stale = cfctl(cli_env, "task", "complete", first, "--epoch", "999", "--agent", "me",
                  check=False)
    assert stale.returncode == 4
    assert stale.stderr.count("\n") == 1 and stale.stderr.startswith("error: lease lost")
    assert cfctl(cli_env, "task", "complete", first, "--epoch", epoch, "--result", "ok",
                 "--agent", "me").stdout.strip() == "completed"
    shown = json.loads(cfctl(cli_env, "--json", "task", "show", second).stdout)
    assert shown["status"] == "ready"
    assert [row["type"] for row in shown["timeline"]] == ["TaskCreated", "TaskReady"]
    listed = json.loads(cfctl(cli_env, "--json", "task", "list", "--status", "completed").stdout)
    assert [t["task_id"] for t in listed] == [first]
    assert listed[0]["labels"] == {"area": "docs"}


def test_claim_exit_codes_and_one_line_errors(cli_env: dict[str, str]) -> None:
    nothing = cfctl(cli_env, "task", "claim", check=False)
    assert nothing.returncode == 3 and nothing.stdout.strip() == ""
    missing = cfctl(cli_env, "task", "show", "no-such-task", check=False)
    assert missing.returncode == 5 and missing.stderr == "error: task not found: no-such-task\n"
    bad = cfctl(cli_env, "task", "add", "x", "--lease-ttl", "0.1", check=False)
    assert bad.returncode == 1 and "lease TTL must be at least 1 s" in bad.stderr
    cycle = cfctl(cli_env, "task", "add", "x", "--after", "ghost", check=False)
    assert cycle.returncode == 5 and cycle.stderr == "error: dependency not found: ghost\n"
    down = cfctl({**cli_env, "CFLOW_URL": "nats://127.0.0.1:1"}, "task", "list", check=False)
    assert down.returncode == 6 and "cfctl up" in down.stderr and down.stderr.count("\n") == 1


def test_cancel_fail_release_and_import(cli_env: dict[str, str], tmp_path: Path) -> None:
    jsonl = tmp_path / "tasks.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in [
        {"id": "a", "title": "build", "priority": 5},
        {"id": "b", "title": "test", "after": ["a"], "needs": ["py"]},
        {"title": "docs", "labels": {"kind": "docs"}},
    ]) + "\n")
    ids = cfctl(cli_env, "task", "import", str(jsonl)).stdout.split()
    again = cfctl(cli_env, "task", "import", str(jsonl)).stdout.split()
    assert len(ids) == 3 and ids == again
    build = cfctl(cli_env, "task", "claim").stdout.split()
    assert build[0] == ids[0]
    assert cfctl(cli_env, "task", "release", ids[0], "--epoch", build[1]).stdout.strip() == "ready"
    build = cfctl(cli_env, "task", "claim", ids[0]).stdout.split()
    assert cfctl(cli_env, "task", "fail", ids[0], "--epoch", build[1], "--no-retry",
                 "--error", "compiler exploded").stdout.strip() == "failed"
    assert cfctl(cli_env, "task", "cancel", ids[2]).stdout.strip() == "cancelled"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"title": "ok"}\nnot json\n')
    out = cfctl(cli_env, "task", "import", str(broken), check=False)
    assert out.returncode == 1 and out.stderr.startswith(f"error: {broken}:2: not JSON")


async def test_task_list_reads_the_projection_when_a_projector_serves(
    cli_env: dict[str, str], nats_url: str, swarm_name: str, tmp_path: Path
) -> None:
    import asyncio

    from cflow.projections.projector import run_projector

    stop = asyncio.Event()
    projector = asyncio.create_task(
        run_projector(nats_url, swarm_name, tmp_path / "p.duckdb", stop))

    async def acfctl(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            *CFCTL, *args, env=cli_env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        return out.decode()

    try:
        task_id = (await acfctl("task", "add", "projected", "--label", "k=v")).strip()
        rows = json.loads(await acfctl("--json", "task", "list"))
        # `last_seq` and `reclaims` exist only in the projection's table: the rows came
        # from DuckDB, and read-your-writes made the fresh task visible at once.
        assert [(r["task_id"], r["status"], r["labels"]) for r in rows] == [
            (task_id, "ready", {"k": "v"})]
        assert rows[0]["last_seq"] >= 1 and rows[0]["reclaims"] == 0
    finally:
        stop.set()
        await asyncio.wait_for(projector, 30)


def test_writes_take_a_request_id_and_a_retry_writes_nothing_new(
        cli_env: dict[str, str]) -> None:
    first = cfctl(cli_env, "task", "add", "once", "--request-id", "r-1").stdout.strip()
    again = cfctl(cli_env, "task", "add", "once", "--request-id", "r-1").stdout.strip()
    assert again == first
    listed = json.loads(cfctl(cli_env, "--json", "task", "list").stdout)
    assert [t["task_id"] for t in listed] == [first]
    v1 = json.loads(cfctl(cli_env, "--json", "memory", "set", "k", "v", "--request-id", "m-1"
                          ).stdout)["version"]
    v2 = json.loads(cfctl(cli_env, "--json", "memory", "set", "k", "v", "--request-id", "m-1"
                          ).stdout)["version"]
    assert v1 == v2
    history = json.loads(cfctl(cli_env, "--json", "memory", "history", "k").stdout)
    assert [h["version"] for h in history] == [v1]


def test_an_unanswered_write_names_the_request_id_to_retry_with() -> None:
    from cflow.cli.task_cmds import maybe_stored
    from cflow.errors import Unavailable

    with pytest.raises(Unavailable) as err, maybe_stored("task", "cli-123"):
        raise Unavailable("no answer from NATS within 5 s")
    assert str(err.value) == (
        "no answer from NATS within 5 s; the task may have been stored: run the same command "
        "again with --request-id cli-123 (that retry never writes twice)")
    assert err.value.request_id == "cli-123"  # type: ignore[attr-defined]
