"""What a newcomer following the README reads: human words, not internal names."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from cflow.cli.ops_cmds import breaker_line, budget_words
from cflow.errors import InvalidState
from cflow.hooks import Held, briefing, stop_reminder
from cflow.swarm import Swarm

CFCTL = [sys.executable, "-c", "from cflow.cli import main; main()"]


def cfctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``cfctl`` as a user runs it, its stdout and stderr pipes."""
    proc = subprocess.run([*CFCTL, *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_briefing_and_reminder_use_real_plurals() -> None:
    one = briefing("a", "s", [], ready=1, gates=1)
    assert "1 task ready to claim, 1 gate waiting" in one
    many = briefing("a", "s", [], ready=3, gates=2)
    assert "3 tasks ready to claim, 2 gates waiting" in many
    assert "(s)" not in one + many
    assert "hold cflow task t1 " in stop_reminder([Held("t1", 1, "x")])
    assert "hold cflow tasks t1 " in stop_reminder([Held("t1", 1, "x"), Held("t2", 1, "y")])


@pytest.mark.integration
@pytest.mark.parametrize(("first", "second", "said"), [
    ("approve", "reject", "not rejected"), ("reject", "approve", "not approved")])
async def test_a_decided_gate_says_the_past_tense(swarm: Swarm, first: str, second: str,
                                                  said: str) -> None:
    gate = await swarm.tasks.create("review", kind="gate")
    await getattr(swarm.control, first)(gate.task_id, "first")
    with pytest.raises(InvalidState, match=f"; {said}$"):
        await getattr(swarm.control, second)(gate.task_id, "second")


@pytest.mark.integration
async def test_agent_show_prints_labelled_human_lines(swarm: Swarm,
                                                      cli_env: dict[str, str]) -> None:
    import asyncio

    await asyncio.to_thread(cfctl, cli_env, "agent", "register", "w1", "-c", "python,go")
    task = await swarm.tasks.create("parse the logs")
    lease = await swarm.tasks.claim(agent="w1")
    assert lease is not None
    text = (await asyncio.to_thread(cfctl, cli_env, "agent", "show", "w1")).stdout
    lines = text.splitlines()
    assert "capabilities: go, python" in lines
    assert f"leases:       {task.task_id} (epoch {lease.epoch}, attempt 1): parse the logs" \
        in lines
    assert "stats:        0 completed, 0 failed, cost $0.0000" in lines
    assert re.search(r"^registered: +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$", text, re.M)
    assert re.search(r"AgentRegistered +by w1 +name=w1 capabilities=go,python ", text)
    for raw in ("{", "('", "None", "True", "False", "_ms"):
        assert raw not in text, raw
    shown = json.loads((await asyncio.to_thread(cfctl, cli_env, "--json", "agent", "show",
                                                "w1")).stdout)
    assert shown["capabilities"] == ["go", "python"] and shown["task_id"] is None


NOTHING = [  # (command, what it says on stderr, its --json result on stdout)
    (["agent", "list"], "no agents", []),
    (["reservations"], "no reservations", []),
    (["reservations", "--check", "src/a.py"], "ok: none of 1 path is reserved by another agent",
     {"blocked": []}),
    (["release-paths"], "released 0 reservations", {"released": []}),
    (["msg", "inbox"], "no new messages", []),
    (["msg", "overdue"], "nothing overdue", []),
    (["memory", "list"], "no entries", []),
    (["memory", "search", "naming style"], "no matches", []),
    (["gate", "list"], "no pending gates", []),
    (["budget", "show"], "no budgets", {}),
    (["breaker", "list"], "no breakers", []),
    (["merges"], "merge queue empty", []),
    (["task", "list", "--status", "failed"], "no failed tasks", []),
]


@pytest.mark.integration
@pytest.mark.parametrize(("args", "said", "empty"), NOTHING,
                         ids=[" ".join(a) for a, _, _ in NOTHING])
def test_nothing_found_is_said_on_stderr(cli_env: dict[str, str], args: list[str], said: str,
                                         empty: object) -> None:
    human = cfctl(cli_env, *args)
    assert (human.stdout, human.stderr.strip()) == ("", said)
    machine = cfctl(cli_env, "--json", *args)
    assert json.loads(machine.stdout) == empty
    assert said not in machine.stderr


@pytest.mark.integration
def test_tables_in_a_pipe_keep_cells_whole_and_lines_unpadded(cli_env: dict[str, str]) -> None:
    name = "a-worker-with-a-rather-long-descriptive-name"
    cfctl(cli_env, "agent", "register", name, "-c", "python,rust,typescript,documentation")
    cfctl(cli_env, "agent", "register", "w2", "-c", "go")
    out = cfctl(cli_env, "agent", "list").stdout  # stdout is a pipe here
    lines = out.splitlines()
    assert len(lines) == 3, out  # the header and one line per agent
    [row] = [line for line in lines if name in line]
    assert "documentation,python,rust,typescript" in row
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", row)
    assert [line for line in lines if line != line.rstrip()] == []


def test_budget_limits_read_as_words() -> None:
    assert budget_words({"max_spend_usd": 20.0, "window_s": 3600.0}) == (
        "at most $20.00 of spending; claims counted per 1 h")
    assert budget_words({"max_children": 1.0, "max_attempts": 200.0, "window_s": 600.0}) == (
        "at most 1 task under one parent, 200 claims per 10 min")
    assert budget_words({"max_attempts": 5.0, "breaker_failures": 3.0,
                         "breaker_window_s": 90.0}) == (
        "at most 5 claims per 1 h; a capability's breaker opens after 3 failures in a row, "
        "counts failures at most 90 s apart")
    assert budget_words({}) == "no limits"


@pytest.mark.integration
def test_budget_set_and_show_say_it_in_words(cli_env: dict[str, str]) -> None:
    swarm = cli_env["CFLOW_SWARM"]
    said = cfctl(cli_env, "budget", "set", "--max-spend", "20", "--max-attempts", "200",
                 "--window", "3600").stdout
    assert said == f"budget of swarm {swarm}: at most 200 claims per 1 h, $20.00 of spending\n"
    assert cfctl(cli_env, "budget", "show").stdout == said
    assert "_s" not in cfctl(cli_env, "swarm", "state").stdout
    exact = json.loads(cfctl(cli_env, "--json", "budget", "show").stdout)
    assert exact == {"swarm": {"max_spend_usd": 20.0, "max_attempts": 200.0,
                               "window_s": 3600.0}}


def test_merge_summary_reads_as_sentences(capsys: pytest.CaptureFixture[str]) -> None:
    from cflow.cli.merge_cmds import _summary_lines

    _summary_lines({"requests": 3, "queued": 1, "merged": 1, "rejected": 1, "removed": 0,
                    "rejection_rate": 0.5, "causes": {"conflict": 1},
                    "lead_time_median_s": 1.003, "lead_time_max_s": 1.003})
    assert capsys.readouterr().out == ("3 requests: 1 queued, 1 merged, 1 rejected, 0 removed\n"
                                       "rejection rate: 50% (conflict 1)\n"
                                       "lead time: median 1.003 s, max 1.003 s\n")


@pytest.mark.integration
def test_an_empty_merge_summary_has_no_nulls(cli_env: dict[str, str]) -> None:
    human = cfctl(cli_env, "merges", "--summary").stdout
    assert human.splitlines()[-1] == "lead time: nothing merged yet"
    assert "null" not in human and "{" not in human
    assert json.loads(cfctl(cli_env, "--json", "merges", "--summary").stdout)[
        "lead_time_median_s"] is None


def test_a_breaker_reads_as_a_sentence() -> None:
    opened = {"capability": "python", "state": "open", "failures": 5, "opened_ms": 0,
              "until_ms": 1_796_277_600_000, "reason": "5 consecutive failures"}
    assert breaker_line(opened) == ("python: open until 2026-12-03 06:00:00 UTC: "
                                    "5 consecutive failures")
    assert breaker_line({**opened, "reason": ""}) == (
        "python: open until 2026-12-03 06:00:00 UTC after 5 failures")
    closed = {**opened, "state": "closed", "failures": 0, "reason": ""}
    assert breaker_line(closed) == "python: closed"
