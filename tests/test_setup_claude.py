"""`cfctl setup claude`: merges .mcp.json and .claude/settings.json, never clobbers, idempotent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cflow.errors import InvalidInput
from cflow.mcp.claude import HOOKS, hook_command, merge_mcp_json, merge_settings, read_json

CFCTL = str(Path(sys.executable).parent / "cfctl")
FIXTURES = Path(__file__).parent / "fixtures" / "hooks"

EXISTING_MCP = {"mcpServers": {"github": {"command": "gh-mcp", "args": ["serve"]}},
                "other": True}
EXISTING_SETTINGS = {
    "permissions": {"allow": ["Bash(npm test)"]},
    "hooks": {
        "PostToolUse": [{"matcher": "Write", "hooks": [
            {"type": "command", "command": "prettier --write \"$FILE\""}]}],
        "Notification": [{"hooks": [{"type": "command", "command": "notify-send hi"}]}],
    },
}


URL_REF = "${CFLOW_URL:-nats://127.0.0.1:4333}"
SWARM_REF = "${CFLOW_SWARM:-proj}"


def setup(project: Path | None, *args: str, json_out: bool = False, cwd: Path | None = None
          ) -> subprocess.CompletedProcess[str]:
    command = [CFCTL, *(["--json"] if json_out else []), "--url", "nats://127.0.0.1:4333",
               "--swarm", "proj", "setup", "claude",
               *(["--project", str(project)] if project else []), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False,
                          cwd=cwd)


def path_env() -> dict[str, str]:
    """The environment Claude Code gives hooks: cfctl found on PATH."""
    return {**os.environ, "PATH": f"{Path(CFCTL).parent}{os.pathsep}{os.environ['PATH']}"}


def write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def test_keeps_existing_entries_and_is_idempotent(tmp_path: Path) -> None:
    mcp_path, settings_path = tmp_path / ".mcp.json", tmp_path / ".claude" / "settings.json"
    write(mcp_path, EXISTING_MCP)
    write(settings_path, EXISTING_SETTINGS)

    first = setup(tmp_path)
    assert first.returncode == 0, first.stderr
    mcp = json.loads(mcp_path.read_text())
    assert mcp["mcpServers"]["github"] == EXISTING_MCP["mcpServers"]["github"]
    assert mcp["other"] is True
    server = mcp["mcpServers"]["cflow"]
    assert server["command"] == "cfctl" and server["args"] == ["mcp"]
    assert server["alwaysLoad"] is True  # Claude Code waits for it before the first request
    assert server["env"] == {"CFLOW_URL": URL_REF, "CFLOW_SWARM": SWARM_REF}

    settings = json.loads(settings_path.read_text())
    assert settings["permissions"] == EXISTING_SETTINGS["permissions"]
    hooks = settings["hooks"]
    assert hooks["Notification"][0] == EXISTING_SETTINGS["hooks"]["Notification"][0]
    assert hooks["Notification"][1]["matcher"] == "permission_prompt"
    assert hooks["Notification"][1]["hooks"][0]["async"] is True  # never delays the session
    for event in ("SessionStart", "PostToolUse", "Stop", "SessionEnd"):
        assert all("async" not in h for g in hooks[event] for h in g["hooks"])  # answers count
    post = hooks["PostToolUse"]
    assert post[0] == EXISTING_SETTINGS["hooks"]["PostToolUse"][0]
    assert set(post[1]["matcher"].split("|")) == {"Edit", "Write", "MultiEdit", "NotebookEdit"}
    assert post[1]["hooks"][0]["command"].endswith(" cfctl hook PostToolUse")
    for event in ("SessionStart", "Stop", "SessionEnd"):
        (group,) = hooks[event]
        assert "matcher" not in group
        assert group["hooks"][0]["command"] == (
            f'CFLOW_URL="{URL_REF}" CFLOW_SWARM="{SWARM_REF}" cfctl hook {event}')
    # Commit-able: no path of this machine anywhere in either file.
    for text in (mcp_path.read_text(), settings_path.read_text()):
        assert str(tmp_path) not in text and str(Path(CFCTL).parent) not in text
    assert "approve" in first.stdout and "enabledMcpjsonServers" in first.stdout

    before = (mcp_path.read_bytes(), settings_path.read_bytes())
    second = setup(tmp_path)
    assert second.returncode == 0 and "already set up" in second.stdout
    assert (mcp_path.read_bytes(), settings_path.read_bytes()) == before


def test_print_writes_nothing(tmp_path: Path) -> None:
    out = setup(tmp_path, "--print")
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / ".mcp.json").exists() and not (tmp_path / ".claude").exists()
    assert '"cflow"' in out.stdout and "claude mcp add" in out.stdout
    assert "-- cfctl mcp" in out.stdout and f"CFLOW_URL={URL_REF}" in out.stdout


def test_json_output_and_pinned_agent(tmp_path: Path) -> None:
    out = setup(tmp_path, "--agent", "team-bot", "--capability", "py,docs", json_out=True)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert sorted(data["written"]) == sorted([str(tmp_path / ".mcp.json"),
                                              str(tmp_path / ".claude" / "settings.json")])
    env = json.loads((tmp_path / ".mcp.json").read_text())["mcpServers"]["cflow"]["env"]
    assert env["CFLOW_AGENT"] == "${CFLOW_AGENT:-team-bot}"
    assert env["CFLOW_CAPABILITIES"] == "${CFLOW_CAPABILITIES:-docs,py}"
    assert "CFLOW_AGENT=${CFLOW_AGENT:-team-bot}" in data["claude_mcp_add"]


def test_finds_the_project_root_from_a_subdirectory(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    deep = tmp_path / "src" / "pkg"
    deep.mkdir(parents=True)
    out = setup(None, cwd=deep)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / ".mcp.json").exists() and (tmp_path / ".claude" / "settings.json").exists()
    assert not (deep / ".mcp.json").exists()


def test_invalid_json_is_never_overwritten(tmp_path: Path) -> None:
    broken = tmp_path / ".mcp.json"
    broken.write_text("{ not json")
    out = setup(tmp_path)
    assert out.returncode != 0 and "not valid JSON" in out.stderr
    assert broken.read_text() == "{ not json"
    assert not (tmp_path / ".claude").exists()


def test_merge_updates_our_entries_in_place() -> None:
    old = "CFLOW_SWARM=a /old/venv/bin/cfctl hook Stop"  # what older versions wrote
    settings = {"hooks": {"Stop": [{"hooks": [{"type": "command", "command": old},
                                              {"type": "command", "command": "say done"}]}]}}
    new_cmds = {e: hook_command(["/new/cfctl"], e, {"CFLOW_SWARM": "b"})
                for e, _, _ in HOOKS}
    merged, changed = merge_settings(settings, new_cmds)
    assert changed
    stop = merged["hooks"]["Stop"]
    assert len(stop) == 1 and stop[0]["hooks"][0]["command"] == new_cmds["Stop"]
    assert stop[0]["hooks"][1]["command"] == "say done"
    assert settings["hooks"]["Stop"][0]["hooks"][0]["command"] == old  # input untouched
    again, changed_again = merge_settings(merged, new_cmds)
    assert again == merged and not changed_again
    entry = {"type": "stdio", "command": "/new/cfctl", "args": ["mcp"], "env": {}}
    first, c1 = merge_mcp_json({}, entry)
    assert c1 and merge_mcp_json(first, entry) == (first, False)
    with pytest.raises(InvalidInput, match="mcpServers"):
        merge_mcp_json({"mcpServers": []}, entry)


def test_read_json_refuses_non_objects(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    assert read_json(path) == {}
    path.write_text("[1, 2]")
    with pytest.raises(InvalidInput, match="JSON object"):
        read_json(path)


@pytest.mark.integration
def test_written_hook_command_runs(tmp_path: Path, nats_url: str, swarm_name: str) -> None:
    """The command line setup writes is what Claude Code runs: run it through a shell."""
    out = subprocess.run([CFCTL, "--url", nats_url, "--swarm", swarm_name, "setup", "claude",
                          "--project", str(tmp_path)], capture_output=True, text=True,
                         timeout=60, check=True)
    assert "wrote" in out.stdout
    settings = json.loads((tmp_path / ".claude" / "settings.json").read_text())
    command = settings["hooks"]["SessionStart"][0]["hooks"][0]["command"]
    ran = subprocess.run(command, shell=True, input=(FIXTURES / "SessionStart.json").read_text(),
                         capture_output=True, text=True, timeout=60, check=False, env=path_env())
    assert ran.returncode == 0, ran.stderr
    context = json.loads(ran.stdout)["hookSpecificOutput"]["additionalContext"]
    assert f"swarm '{swarm_name}'" in context
    # A user's own $CFLOW_SWARM wins over the default written into the file.
    mine = subprocess.run(command, shell=True, input=(FIXTURES / "SessionStart.json").read_text(),
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**path_env(), "CFLOW_SWARM": f"{swarm_name}-other"})
    assert mine.returncode == 0, mine.stderr
    assert f"swarm '{swarm_name}-other'" in mine.stdout
