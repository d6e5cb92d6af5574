"""`cfctl hook EVENT` with recorded Claude Code payloads, plus the pure parts of cflow.hooks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cflow import events as ev
from cflow.hooks import HookInput, briefing, claude_agent_name, handle, touched_paths
from cflow.swarm import Swarm

FIXTURES = Path(__file__).parent / "fixtures" / "hooks"
SESSION_AGENT = "claude-demo-7f3c2a9e"  # project dir "demo", session id "7f3c2a9e-..."


def payload(name: str) -> str:
    return (FIXTURES / f"{name}.json").read_text()


def cfctl() -> str:
    return str(Path(sys.executable).parent / "cfctl")


def hook_env(cli_env: dict[str, str]) -> dict[str, str]:
    env = dict(cli_env)
    for name in ("CFLOW_AGENT", "CLAUDE_CODE_SESSION_ID", "CLAUDE_PROJECT_DIR",
                 "CFLOW_CAPABILITIES"):
        env.pop(name, None)
    return env


def run_hook(event: str, fixture: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([cfctl(), "hook", event], input=payload(fixture), env=env,
                          capture_output=True, text=True, timeout=60, check=False)


# ------------------------------------------------------------------ pure


def test_agent_name_rules() -> None:
    assert claude_agent_name("pinned", env={"CFLOW_AGENT": "env"}) == "pinned"
    assert claude_agent_name(env={"CFLOW_AGENT": "env"}) == "env"
    env = {"CLAUDE_CODE_SESSION_ID": "7f3c2a9e-1b4d", "CLAUDE_PROJECT_DIR": "/x/My Proj"}
    assert claude_agent_name(env=env) == "claude-My-Proj-7f3c2a9e"
    assert claude_agent_name(env={}, session_id="abcdef123456",
                             project_dir="/w/demo") == "claude-demo-abcdef12"
    fallback = claude_agent_name(env={}, project_dir="/w/demo")
    assert fallback.startswith("claude-demo-") and fallback.rsplit("-", 1)[1].isdigit()
    assert ev.check_token(claude_agent_name(env={}, session_id="a/b c", project_dir="/é/ü"),
                          "agent")


def test_payload_parsing_and_touched_paths() -> None:
    edit = HookInput.parse("PostToolUse", payload("PostToolUse_Edit"))
    assert edit.tool_name == "Edit" and edit.session_id.startswith("7f3c2a9e")
    assert touched_paths(edit) == ["src/app.py"]
    multi = HookInput.parse("PostToolUse", payload("PostToolUse_MultiEdit"))
    assert touched_paths(multi) == ["src/util.py"]
    assert touched_paths(multi, "/elsewhere") == ["/work/demo/src/util.py"]
    assert touched_paths(HookInput.parse("PostToolUse", payload("PostToolUse_Bash"))) == []
    junk = HookInput.parse("Stop", "not json at all")
    assert junk.event == "Stop" and junk.session_id == "" and not junk.stop_hook_active
    assert HookInput.parse("", payload("Stop_active")).stop_hook_active
    assert HookInput.parse("", payload("SessionEnd")).event == "SessionEnd"


def test_briefing_text() -> None:
    from cflow.hooks import Held

    text = briefing("a1", "s1", [Held("t1", 7, "fix bug")], ready=3, gates=1)
    assert "'a1'" in text and "t1" in text and "epoch 7" in text
    assert "3 tasks ready" in text and "1 gate waiting" in text
    assert "no task ready" in briefing("a1", "s1", [], 0, 0)


@pytest.mark.parametrize("fixture", ["PreToolUse", "PostToolUse_Bash", "Stop_active",
                                     "SubagentStop", "Notification_idle"])
def test_events_without_backend_work_return_at_once(fixture: str) -> None:
    event = json.loads(payload(fixture))["hook_event_name"]
    # An unreachable URL proves nothing was attempted: no error, no output.
    result = handle(event, payload(fixture), {"CFLOW_URL": "nats://127.0.0.1:1"})
    assert (result.stdout, result.stderr, result.exit_code) == ("", "", 0)


def test_hook_fast_path_skips_heavy_imports() -> None:
    code = (
        "import sys\n"
        "sys.argv = ['cfctl', 'hook', 'Notification']\n"
        "from cflow.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = [m for m in ('typer', 'rich', 'mcp', 'duckdb', 'nats') if m in sys.modules]\n"
        "print(code, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], input=payload("Notification_idle"),
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "0 []"


def test_bad_usage_never_blocks() -> None:
    out = subprocess.run([cfctl(), "hook"], input="", capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 1 and "usage: cfctl hook EVENT" in out.stderr  # 2 would block


def test_backend_down_is_a_note_not_a_failure(cli_env: dict[str, str]) -> None:
    env = hook_env(cli_env)
    env["CFLOW_URL"] = "nats://127.0.0.1:1"
    for event, fixture in (("SessionStart", "SessionStart"), ("PostToolUse", "PostToolUse_Edit"),
                           ("Stop", "Stop"), ("SessionEnd", "SessionEnd")):
        out = run_hook(event, fixture, env)
        assert out.returncode == 0 and out.stdout == ""
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "ignored" in lines[0], out.stderr


# ------------------------------------------------------------------ against NATS


@pytest.mark.integration
async def test_session_lifecycle_with_recorded_payloads(
        cli_env: dict[str, str], nats_url: str, swarm_name: str) -> None:
    env = hook_env(cli_env)
    first = run_hook("SessionStart", "SessionStart", env)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)["hookSpecificOutput"]
    assert out["hookEventName"] == "SessionStart"
    assert SESSION_AGENT in out["additionalContext"]
    assert "no task ready" in out["additionalContext"]

    async with Swarm.connect(nats_url, swarm=swarm_name, agent=SESSION_AGENT) as swarm:
        agent = await swarm.agents.get(SESSION_AGENT)
        assert agent.runtime == "claude" and agent.labels["claude_session"].startswith("7f3c")
        task = await swarm.tasks.create("fix the failing test")
        await swarm.tasks.create("another one")
        lease = await swarm.tasks.claim(task.task_id)
        assert lease is not None

        again = run_hook("SessionStart", "SessionStart", env)
        context = json.loads(again.stdout)["hookSpecificOutput"]["additionalContext"]
        assert task.task_id in context and "fix the failing test" in context
        assert "1 task ready" in context

        for fixture in ("PostToolUse_Edit", "PostToolUse_Write", "PostToolUse_MultiEdit",
                        "PostToolUse_Bash"):
            done = run_hook("PostToolUse", fixture, env)
            assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), done.stderr
        notes = [i.event.data for i in await swarm.tasks.history(task.task_id)
                 if isinstance(i.event.data, ev.TaskNoted)]
        assert [n.paths for n in notes] == [("src/app.py",), ("docs/notes.md",),
                                            ("src/util.py",)]
        assert all(n.epoch == lease.epoch for n in notes)

        stop = run_hook("Stop", "Stop", env)
        decision = json.loads(stop.stdout)
        assert decision["decision"] == "block" and task.task_id in decision["reason"]
        assert "task_update" in decision["reason"]
        assert run_hook("Stop", "Stop_active", env).stdout == ""  # never loops

        for event, fixture in (("UserPromptSubmit", "UserPromptSubmit"),
                               ("PreToolUse", "PreToolUse"), ("SubagentStop", "SubagentStop"),
                               ("Notification", "Notification")):
            quiet = run_hook(event, fixture, env)
            assert (quiet.returncode, quiet.stdout) == (0, "")

        await lease.complete("fixed")
        # The lease delete is a core publish nobody waits for; let it leave before
        # run_hook (a blocking subprocess call) stops this event loop.
        await swarm.nc.flush()
        assert run_hook("Stop", "Stop", env).stdout == ""  # nothing held: no reminder

        end = run_hook("SessionEnd", "SessionEnd", env)
        assert end.returncode == 0 and end.stdout == "", end.stderr
        agent = await swarm.agents.get(SESSION_AGENT)
        assert agent.status == "offline" and agent.reason == "prompt_input_exit"


def waiting_gauge(items: Any, state: str | None = None) -> int:
    """``cflow_agents_waiting_on_human`` (or ``cflow_agents_presence{state}``) as the
    metrics fold renders it from agent events."""
    from cflow.metrics import MetricsFold, parse_text, value_of

    fold = MetricsFold()
    for item in items:
        fold.apply(item.seq, item.event)
    text = fold.render(swarm="s", stream_last_seq=None, projected_seq=None, now_ms=0)
    if state is not None:
        return int(value_of(parse_text(text), "cflow_agents_presence", state=state))
    return int(value_of(parse_text(text), "cflow_agents_waiting_on_human"))


def test_presence_states() -> None:
    from cflow.agents import AgentInfo, presence_state

    def agent(status: str, present: bool = True, reason: str = "") -> AgentInfo:
        return AgentInfo(name="a", status=status, present=present, reason=reason)

    assert presence_state(agent("online"), holds_lease=False) == "idle"
    assert presence_state(agent("online"), holds_lease=True) == "working"
    assert presence_state(agent("busy", reason="working"), holds_lease=False) == "working"
    assert presence_state(agent("busy", reason="waiting on a human: permission for Bash"),
                          holds_lease=True) == "waiting_on_human"
    assert presence_state(agent("idle"), holds_lease=False) == "idle"
    assert presence_state(agent("online", present=False), holds_lease=False) == "offline"
    assert presence_state(agent("offline", present=False), holds_lease=True) == "dead"
    assert presence_state(agent("busy", present=False), holds_lease=True) == "dead"


@pytest.mark.integration
async def test_presence_and_agent_team_events(cli_env: dict[str, str], nats_url: str,
                                              swarm_name: str) -> None:
    from cflow.agents import Agent, presence_state
    from cflow.status import collect_status
    from cflow.streams import names

    env = hook_env(cli_env)
    assert run_hook("SessionStart", "SessionStart", env).returncode == 0
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="observer") as swarm:
        async def presence() -> str:
            return presence_state(await swarm.agents.get(SESSION_AGENT), holds_lease=False)

        # The session's `cfctl mcp` keeps the agent present; here a handle of our own does.
        session = Agent(swarm.agents, SESSION_AGENT, "test", (), {}, "mcp")
        async with session.present():
            for event, fixture, want in (
                    ("PermissionRequest", "PermissionRequest", "waiting_on_human"),
                    ("UserPromptSubmit", "UserPromptSubmit", "working"),
                    ("Notification", "Notification", "waiting_on_human"),
                    ("Stop", "Stop", "idle")):
                done = run_hook(event, fixture, env)
                assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), done.stderr
                assert await presence() == want, event
                agent_events = await swarm.log.read(names.events_filter(swarm_name, "agent"))
                assert waiting_gauge(agent_events) == (want == "waiting_on_human")
                assert waiting_gauge(agent_events, want) == 1, event
                assert (await collect_status(swarm))["agents"][want] == 1, event  # cfctl status
            assert (await swarm.agents.get(SESSION_AGENT)).reason == "session waits for a prompt"
        assert await presence() == "offline"  # presence gone, holding nothing

        for event in ("TaskCreated", "TaskCompleted", "TeammateIdle"):
            done = run_hook(event, event, env)
            assert (done.returncode, done.stderr) == (0, ""), done.stderr
        sent = [i.event for i in await swarm.log.read(names.events_filter(swarm_name, "message"))
                if isinstance(i.event.data, ev.MessageSent)]
        records = [json.loads(e.data.text) for e in sent if e.data.topic == "team-parser-team"]
        assert [(r["team_event"], r.get("task_id"), r["teammate_name"]) for r in records] == [
            ("TaskCreated", "3", "tester"), ("TaskCompleted", "3", "tester"),
            ("TeammateIdle", None, "tester")]
        assert all(r["agent"] == SESSION_AGENT for r in records)
