"""``cfctl setup claude``: the ``.mcp.json`` server entry and the hook entries (pure merges).

Both files belong to the user, so they are merged, never clobbered: other
servers, other hooks and unknown keys stay as they are; our own entries (the
``cflow`` server, hook commands that run ``cfctl ... hook <Event>``) are
updated in place, so running setup twice changes nothing the second time.

The files are meant to be committed, so they name no path of one machine: the
server and the hooks run ``cfctl`` from ``PATH``, and the NATS URL and swarm are
``${CFLOW_URL:-<default>}`` and ``${CFLOW_SWARM:-<default>}``, which Claude
Code expands from each user's environment (in ``.mcp.json``) and the shell
expands in hook commands. The server entry has ``"alwaysLoad": true``: Claude
Code then connects it before the first model request, also in ``claude -p``,
and never defers its tools behind tool search.
"""

from __future__ import annotations

import copy
import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cflow.errors import InvalidInput

SERVER_NAME = "cflow"
CFCTL = ("cfctl",)  # from PATH: a committed file names no machine's install path
DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_SWARM = "default"
# Every tool of Claude Code that writes a file (PostToolUse records the paths).
EDIT_MATCHER = "Edit|Write|MultiEdit|NotebookEdit"
# (event, matcher, timeout seconds): what Claude Code calls `cfctl hook` for.
HOOKS: tuple[tuple[str, str | None, int], ...] = (
    ("SessionStart", None, 15),
    ("PostToolUse", EDIT_MATCHER, 10),
    ("Stop", None, 10),
    ("SessionEnd", None, 10),
    # Presence: waiting on a human at a permission prompt, working again after a prompt.
    ("PermissionRequest", None, 10),
    ("Notification", "permission_prompt", 10),
    ("UserPromptSubmit", None, 10),
    # Agent teams: a team's tasks and idleness recorded in the swarm.
    ("TaskCreated", None, 10),
    ("TaskCompleted", None, 10),
    ("TeammateIdle", None, 10),
)
# Hooks whose answer the session does not need run in the background ("async": true)
# and never delay it. SessionStart (briefing), Stop (reminder), PostToolUse (the edit
# note must land while the lease is held) and SessionEnd (before exit) stay in line.
BACKGROUND = frozenset({"PermissionRequest", "Notification", "UserPromptSubmit",
                        "TaskCreated", "TaskCompleted", "TeammateIdle"})


def hook_entry(event: str, command: str, timeout: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "command", "command": command, "timeout": timeout}
    if event in BACKGROUND:
        entry["async"] = True
    return entry
# What marks a project's root, looked for from the working directory upwards.
ROOT_MARKERS = (".mcp.json", ".claude", ".git")


def find_project_root(start: Path) -> Path:
    """The nearest ancestor of ``start`` (itself included) with a root marker, else ``start``."""
    start = start.resolve()
    for folder in (start, *start.parents):
        if any((folder / marker).exists() for marker in ROOT_MARKERS):
            return folder
    return start


def cfctl_command(project_dir: Path | None = None) -> list[str]:
    """How the committed files run cfctl: ``cfctl`` from PATH (``project_dir`` unused)."""
    return list(CFCTL)


def env_refs(env: Mapping[str, str]) -> dict[str, str]:
    """``{"CFLOW_URL": "${CFLOW_URL:-nats://...}", ...}``: each user's own value, else ours."""
    return {key: f"${{{key}:-{value}}}" for key, value in env.items()}


def server_entry(command: Sequence[str], env: Mapping[str, str]) -> dict[str, Any]:
    return {"type": "stdio", "command": command[0], "args": [*command[1:], "mcp"],
            "env": env_refs(env), "alwaysLoad": True}


def hook_command(command: Sequence[str], event: str, env: Mapping[str, str]) -> str:
    """A shell command line: ``KEY="${KEY:-value}" ... cfctl hook <Event>``."""
    for value in env.values():
        if any(c in value for c in '"$`\\\n'):
            raise InvalidInput(f"{value!r} cannot go into a hook command line")
    assigns = [f'{k}="${{{k}:-{v}}}"' for k, v in env.items()]
    return " ".join([*assigns, shlex.join([*command, "hook", event])])


def _is_ours(command: Any, event: str) -> bool:
    return (isinstance(command, str) and "cfctl" in command
            and command.rstrip().endswith(f"hook {event}"))


def merge_mcp_json(existing: Mapping[str, Any], entry: Mapping[str, Any]
                   ) -> tuple[dict[str, Any], bool]:
    """``existing`` with ``mcpServers.cflow`` set to ``entry``; (merged, changed)."""
    merged = copy.deepcopy(dict(existing))
    servers = merged.setdefault("mcpServers", {})
    if not isinstance(servers, dict):
        raise InvalidInput(".mcp.json: 'mcpServers' is not an object; fix it by hand")
    changed = servers.get(SERVER_NAME) != entry
    servers[SERVER_NAME] = copy.deepcopy(dict(entry))
    return merged, changed


def merge_settings(existing: Mapping[str, Any], commands: Mapping[str, str]
                   ) -> tuple[dict[str, Any], bool]:
    """``existing`` settings with our hook commands present once each; (merged, changed)."""
    merged = copy.deepcopy(dict(existing))
    hooks = merged.setdefault("hooks", {})
    if not isinstance(hooks, dict):
        raise InvalidInput(".claude/settings.json: 'hooks' is not an object; fix it by hand")
    changed = False
    for event, matcher, timeout in HOOKS:
        command = commands[event]
        groups = hooks.setdefault(event, [])
        if not isinstance(groups, list):
            raise InvalidInput(f".claude/settings.json: hooks.{event} is not a list")
        found = False
        for group in groups:
            if not isinstance(group, dict):
                continue
            for hook in group.get("hooks") or []:
                if isinstance(hook, dict) and _is_ours(hook.get("command"), event):
                    if found:
                        continue
                    found = True
                    want = hook_entry(event, command, timeout)
                    if any(hook.get(k) != v for k, v in want.items()):
                        hook.update(want)
                        changed = True
                    if matcher is not None and group.get("matcher") != matcher:
                        group["matcher"] = matcher
                        changed = True
        if not found:
            group_new: dict[str, Any] = {}
            if matcher is not None:
                group_new["matcher"] = matcher
            group_new["hooks"] = [hook_entry(event, command, timeout)]
            groups.append(group_new)
            changed = True
    return merged, changed


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` ({} if absent).

    Raises:
        InvalidInput: the file is not a JSON object (we never overwrite such a file).
    """
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                           "fix it by hand, nothing was written") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{path} does not hold a JSON object; nothing was written")
    return data


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".cflow-tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def claude_mcp_add_line(command: Sequence[str], env: Mapping[str, str]) -> str:
    """The equivalent ``claude mcp add`` command line."""
    parts = ["claude", "mcp", "add", "--transport", "stdio", "--scope", "project"]
    for key, value in env_refs(env).items():
        parts += ["--env", f"{key}={value}"]
    parts += [SERVER_NAME, "--", *command, "mcp"]
    return shlex.join(parts)


def plan(project: Path, env: Mapping[str, str], command: Sequence[str] | None = None
         ) -> dict[str, Any]:
    """What setup would write: merged files, whether each changes, the CLI equivalent."""
    command = list(command or cfctl_command(project))
    mcp_path = project / ".mcp.json"
    settings_path = project / ".claude" / "settings.json"
    mcp_json, mcp_changed = merge_mcp_json(read_json(mcp_path), server_entry(command, env))
    hook_cmds = {event: hook_command(command, event, env) for event, _, _ in HOOKS}
    settings, settings_changed = merge_settings(read_json(settings_path), hook_cmds)
    return {
        "files": {
            str(mcp_path): {"content": mcp_json, "changed": mcp_changed},
            str(settings_path): {"content": settings, "changed": settings_changed},
        },
        "claude_mcp_add": claude_mcp_add_line(command, env),
    }


def apply(planned: Mapping[str, Any]) -> list[str]:
    """Write the files of ``planned`` that change; returns their paths."""
    written = []
    for path, item in planned["files"].items():
        if item["changed"]:
            write_json(Path(path), item["content"])
            written.append(path)
    return written


__all__ = [
    "HOOKS",
    "SERVER_NAME",
    "apply",
    "cfctl_command",
    "claude_mcp_add_line",
    "hook_command",
    "merge_mcp_json",
    "merge_settings",
    "plan",
    "read_json",
    "server_entry",
]
