"""Claude Code hooks: ``cfctl hook EVENT`` reads the hook JSON on stdin and records it.

Claude Code runs a hook command at points of a session and passes a JSON object
on stdin (``session_id``, ``transcript_path``, ``cwd``, ``hook_event_name`` and
per-event fields such as ``tool_name``/``tool_input``/``tool_response``,
``source``, ``reason`` or ``stop_hook_active``). What each event does here:

* ``SessionStart``: register the session's agent and answer a short briefing
  (the task this agent holds, how much work is ready) as ``additionalContext``.
* ``PostToolUse`` of a file edit (Edit, Write, MultiEdit, NotebookEdit): record
  the touched paths as a ``TaskNoted(paths=...)`` on each task the agent holds.
* ``Stop``: if the agent still holds a task, block the stop once with a
  reminder (``decision: block``); never when ``stop_hook_active`` is set, so
  the session cannot loop.
* ``SessionEnd``: mark the agent offline. Its leases are not released: the MCP
  adapter's heartbeats stop with the session and the leases expire.
* Presence: ``PermissionRequest`` and a ``Notification`` of a permission prompt
  mark the agent *waiting on a human* (status busy, reason ``waiting on a
  human: ...``); ``UserPromptSubmit`` marks it working; a ``Stop`` without held
  work marks it idle (see :func:`cflow.agents.presence_state`).
* Agent teams: ``TaskCreated``, ``TaskCompleted`` and ``TeammateIdle`` are
  recorded as messages on the topic ``team-<team>`` (one JSON object each), so
  a team's tasks and idleness are in the swarm's audit trail and in the
  projection's ``messages`` table, whichever machine its teammates run on.
* Other events are accepted and ignored.

**A hook never fails the user's session.** Backend errors (NATS down, swarm
missing, a timeout) end with exit code 0, nothing on stdout and one line on
stderr, which Claude Code shows only in verbose mode. A hook that exited
non-zero would put an error in front of the user on every tool call for a
coordination backend being down, and exit code 2 would even block the tool.

Cold start matters (Claude Code waits for every hook), so this module imports
only the standard library at load. An edit note first goes to the session's own
``cfctl mcp`` over a local Unix socket (:func:`hook_socket_path`; it holds the
NATS connection and knows its leases), and only without one to NATS directly.
NATS and the facade are imported when an event needs the backend, and events
that do not never import them. The CLI's
``main()`` dispatches ``cfctl hook`` here before importing Typer.

The agent name must match the MCP adapter's (same Claude Code session, same
name), so both use :func:`claude_agent_name`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import contextlib

    from cflow.swarm import Swarm

EVENTS = (
    "SessionStart", "UserPromptSubmit", "PreToolUse", "PostToolUse", "Stop", "SubagentStop",
    "SessionEnd", "Notification", "PreCompact", "PermissionRequest", "TaskCreated",
    "TaskCompleted", "TeammateIdle",
)
TEAM_EVENTS = ("TaskCreated", "TaskCompleted", "TeammateIdle")
WAITING = "waiting on a human"  # the reason prefix cflow.agents.presence_state reads
EDIT_NOTE = "edited via {tool}"  # the MCP server keeps these apart from the model's notes
EDIT_TOOLS = frozenset({"Edit", "Write", "MultiEdit", "NotebookEdit"})
DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_TIMEOUT_S = 5.0
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


# --------------------------------------------------------------------- identity


def _token(text: str) -> str:
    return _UNSAFE.sub("-", text).strip("-")


def claude_agent_name(
    explicit: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    session_id: str | None = None,
    project_dir: str | None = None,
) -> str:
    """The agent name of a Claude Code session (pure apart from the fallbacks).

    ``explicit`` (``--agent``), else ``CFLOW_AGENT``, else
    ``claude-<project dir name>-<first 8 characters of the session id>`` with the
    session id from ``CLAUDE_CODE_SESSION_ID`` (set by Claude Code for hooks,
    Bash and stdio MCP servers) or the hook payload; without a session id,
    ``claude-<project>-<host>-<parent pid>``. The project dir is
    ``CLAUDE_PROJECT_DIR``, else ``project_dir``, else the working directory.
    """
    env = os.environ if env is None else env
    name = explicit or env.get("CFLOW_AGENT")
    if name:
        return name
    sid = env.get("CLAUDE_CODE_SESSION_ID") or session_id
    project = env.get("CLAUDE_PROJECT_DIR") or project_dir or os.getcwd()
    base = _token(Path(project).name)[:48] or "project"
    if sid:
        return f"claude-{base}-{_token(sid)[:8]}"
    return f"claude-{base}-{_token(socket.gethostname())[:32]}-{os.getppid()}"


def capabilities_from_env(env: Mapping[str, str] | None = None) -> list[str]:
    """``CFLOW_CAPABILITIES`` as a list (comma or space separated)."""
    env = os.environ if env is None else env
    raw = env.get("CFLOW_CAPABILITIES", "")
    return sorted({c for c in re.split(r"[,\s]+", raw) if c})


# ---------------------------------------------------------------------- payload


@dataclass
class HookResult:
    """What the hook process writes and how it exits."""

    stdout: str = ""
    stderr: str = ""
    exit_code: int = 0


@dataclass
class HookInput:
    """The fields of a hook payload this module uses (the rest is ignored)."""

    event: str
    session_id: str = ""
    cwd: str = ""
    tool_name: str = ""
    tool_input: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    reason: str = ""
    stop_hook_active: bool = False
    message: str = ""
    notification_type: str = ""
    team: dict[str, str] = field(default_factory=dict)  # agent-team event fields

    @classmethod
    def parse(cls, event: str, raw: str) -> HookInput:
        try:
            data = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        tool_input = data.get("tool_input")
        return cls(
            event=event or str(data.get("hook_event_name", "")),
            session_id=str(data.get("session_id") or ""),
            cwd=str(data.get("cwd") or ""),
            tool_name=str(data.get("tool_name") or ""),
            tool_input=tool_input if isinstance(tool_input, dict) else {},
            source=str(data.get("source") or ""),
            reason=str(data.get("reason") or ""),
            stop_hook_active=bool(data.get("stop_hook_active")),
            message=str(data.get("message") or ""),
            notification_type=str(data.get("notification_type") or ""),
            team={k: str(data[k])[:500] for k in ("task_id", "task_subject", "task_description",
                                                   "teammate_name", "team_name") if data.get(k)},
        )


def touched_paths(hook: HookInput, project_dir: str | None = None) -> list[str]:
    """Files a PostToolUse of an edit tool touched, relative to the project if inside it."""
    if hook.tool_name not in EDIT_TOOLS:
        return []
    raw = [hook.tool_input.get(k) for k in ("file_path", "notebook_path", "path")]
    out: list[str] = []
    root = Path(project_dir or hook.cwd or ".").resolve()
    for item in raw:
        if not isinstance(item, str) or not item:
            continue
        path = Path(item)
        if not path.is_absolute():
            path = root / path
        try:
            text = str(path.resolve().relative_to(root))
        except ValueError:
            text = str(path)
        if text not in out:
            out.append(text)
    return out


# ---------------------------------------------------------------------- relay


def hook_socket_path(swarm: str, agent: str) -> str:
    """Where a session's ``cfctl mcp`` listens for its hooks (pure but for the env)."""
    import hashlib
    import tempfile

    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    digest = hashlib.sha256(f"{swarm}\0{agent}".encode()).hexdigest()[:20]
    return os.path.join(base, f"cflow-{os.getuid()}", f"{digest}.sock")


def relay(path: str, request: dict[str, Any], timeout_s: float = 3.0) -> dict[str, Any] | None:
    """Send one request to the session's ``cfctl mcp``; its answer (``ok`` true or false),
    or None if nobody listens there."""
    if not os.path.exists(path):
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        answer = json.loads(data or b"null")
    except (OSError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


# ---------------------------------------------------------------------- outputs


def session_start_output(context: str) -> str:
    return json.dumps({"hookSpecificOutput": {"hookEventName": "SessionStart",
                                              "additionalContext": context}})


def stop_block_output(reason: str) -> str:
    return json.dumps({"decision": "block", "reason": reason})


@dataclass
class Held:
    task_id: str
    epoch: int
    title: str = ""


def briefing(agent: str, swarm: str, held: Sequence[Held], ready: int, gates: int) -> str:
    """The SessionStart briefing (pure)."""
    lines = [f"cflow: you are agent '{agent}' in swarm '{swarm}'."]
    for h in held:
        lines.append(f"You hold task {h.task_id} \"{h.title}\" (epoch {h.epoch}); finish it with "
                     "task_update (complete/fail/release) or it expires when this session ends.")
    work = (f"{ready} {'task' if ready == 1 else 'tasks'} ready to claim" if ready
            else "no task ready to claim")
    if gates:
        work += f", {gates} {'gate' if gates == 1 else 'gates'} waiting for a human"
    lines.append(f"Swarm: {work}. Use the cflow MCP tools: task_claim, task_update, "
                 "swarm_status, memory_search.")
    return " ".join(lines)


def stop_reminder(held: Sequence[Held]) -> str:
    tasks = ", ".join(f"{h.task_id} \"{h.title}\" (epoch {h.epoch})" for h in held)
    noun = "task" if len(held) == 1 else "tasks"
    return (f"You still hold cflow {noun} {tasks}. Before stopping, record the outcome with "
            "task_update: action=complete with a result, action=fail with the error, or "
            "action=release to hand it back.")


# ---------------------------------------------------------------------- backend


async def open_swarm(stack: contextlib.AsyncExitStack, url: str, swarm: str, agent: str, *,
                     ensure: bool = True, timeout_s: float = 3.0) -> Swarm:
    """``Swarm.connect`` bounded in time: a missing server is ``Unavailable`` after ``timeout_s``.

    The connection retries forever once established (a coordinator outlives server
    restarts), but the first connect must fail fast so a hook or the MCP adapter
    can say so instead of hanging.

    Raises:
        Unavailable: no server answered (or the swarm could not be set up) in time.
    """
    import asyncio

    from cflow.errors import Unavailable
    from cflow.swarm import Swarm

    try:
        return await asyncio.wait_for(
            stack.enter_async_context(Swarm.connect(url, swarm=swarm, agent=agent, ensure=ensure,
                                                    connect_timeout=timeout_s)),
            timeout_s)
    except TimeoutError:
        raise Unavailable(f"no NATS server answered at {url} within {timeout_s:g} s "
                          "(start one with `cfctl up`)", url=url) from None


async def held_tasks(swarm: Swarm, agent: str, *, titles: bool = True) -> list[Held]:
    """The tasks whose live lease names ``agent`` (read from the leases bucket)."""
    from cflow.errors import NotFound
    from cflow.leases import _decode_lease
    from cflow.streams import names

    bucket = swarm.log.bucket(names.LEASES)
    held: list[Held] = []
    for entry in await swarm.log.kv_keys(bucket):
        record = _decode_lease(entry)
        if record is None or record.owner != agent:
            continue
        epoch, title = record.epoch, ""
        if titles or not epoch:  # a lease names its claim by key; the epoch is the claim's
            try:
                state = await swarm.tasks.get(record.task_id)
            except NotFound:
                continue
            if state.status != "claimed" or state.owner != agent:
                continue
            epoch, title = state.epoch, state.title
        held.append(Held(record.task_id, epoch, title))
    return held


async def _register(swarm: Swarm, agent: str, hook: HookInput) -> None:
    labels = {"claude_session": hook.session_id, "project": hook.cwd, "via": "hook"}
    await swarm.agents.register(agent, capabilities_from_env(), labels, runtime="claude")


async def _registered(swarm: Swarm, agent: str) -> Any:
    """The agent's record, or None if it never registered (e.g. `claude mcp list`
    runs SessionEnd hooks without a session: no agent is made up for it)."""
    from cflow.errors import NotFound

    try:
        return await swarm.agents.get(agent)
    except NotFound:
        return None


async def _set_offline(swarm: Swarm, agent: str, reason: str) -> None:
    if await _registered(swarm, agent) is not None:
        await swarm.agents.set_status(agent, "offline", reason=reason or "session ended")


async def _presence(swarm: Swarm, agent: str, status: str, reason: str) -> None:
    """Set the agent's status and reason unless both are already so (one event)."""
    info = await _registered(swarm, agent)
    if info is not None and (info.status, info.reason) != (status, reason):
        await swarm.agents.set_status(agent, status, info.task_id,  # type: ignore[arg-type]
                                      reason=reason, force=True)


async def clear_waiting(swarm: Swarm, agent: str) -> None:
    """A tool ran, so the permission prompt was answered: working again (if it waited)."""
    info = await _registered(swarm, agent)
    if info is not None and (info.reason or "").startswith(WAITING):
        await swarm.agents.set_status(agent, "busy", info.task_id,
                                      reason="working", force=True)


def team_topic(team: str) -> str:
    return "team-" + (_token(team)[:48] or "default")


def team_record(hook: HookInput, agent: str) -> str:
    """The JSON an agent-team hook event is recorded as (pure)."""
    return json.dumps({"team_event": hook.event, "agent": agent, **hook.team},
                      ensure_ascii=False)


async def handle_async(hook: HookInput, env: Mapping[str, str]) -> HookResult:
    """Do what ``hook`` asks against the backend. Raises our errors; the caller absorbs them."""
    import contextlib

    agent = claude_agent_name(env=env, session_id=hook.session_id or None,
                              project_dir=hook.cwd or None)
    url = env.get("CFLOW_URL") or DEFAULT_URL
    swarm_name = env.get("CFLOW_SWARM") or "default"
    ensure = hook.event == "SessionStart"
    async with contextlib.AsyncExitStack() as stack:
        swarm = await open_swarm(stack, url, swarm_name, agent, ensure=ensure, timeout_s=1.5)
        match hook.event:
            case "SessionStart":
                await _register(swarm, agent, hook)
                held = await held_tasks(swarm, agent)
                board = await swarm.tasks.ensure_board()
                ready = sum(1 for s in board.tasks.values()
                            if s.status == "ready" and s.kind == "task")
                gates = sum(1 for s in board.tasks.values()
                            if s.status == "ready" and s.kind == "gate")
                return HookResult(stdout=session_start_output(
                    briefing(agent, swarm_name, held, ready, gates)))
            case "PostToolUse":
                paths = touched_paths(hook, env.get("CLAUDE_PROJECT_DIR"))
                if not paths:
                    return HookResult()
                for h in await held_tasks(swarm, agent, titles=False):
                    await swarm.tasks.note(h.task_id, EDIT_NOTE.format(tool=hook.tool_name),
                                           epoch=h.epoch, paths=paths)
                await clear_waiting(swarm, agent)
                return HookResult()
            case "Stop":
                held = await held_tasks(swarm, agent)
                if held:
                    return HookResult(stdout=stop_block_output(stop_reminder(held)))
                await _presence(swarm, agent, "idle", "session waits for a prompt")
                return HookResult()
            case "PermissionRequest":
                await _presence(swarm, agent, "busy",
                                f"{WAITING}: permission for {hook.tool_name or 'a tool'}")
                return HookResult()
            case "Notification":
                await _presence(swarm, agent, "busy", f"{WAITING}: {hook.message[:200]}")
                return HookResult()
            case "UserPromptSubmit":
                await _presence(swarm, agent, "busy", "working")
                return HookResult()
            case "TaskCreated" | "TaskCompleted" | "TeammateIdle":
                await swarm.messages.send(None, team_record(hook, agent),
                                          topic=team_topic(hook.team.get("team_name", "")))
                return HookResult()
            case "SessionEnd":
                await _set_offline(swarm, agent, hook.reason)
                return HookResult()
    return HookResult()


def needs_backend(hook: HookInput) -> bool:
    """Whether the event does anything at all (others return before importing NATS)."""
    match hook.event:
        case "SessionStart" | "SessionEnd":
            return True
        case "PostToolUse":
            return bool(touched_paths(hook))
        case "Stop":
            return not hook.stop_hook_active
        case "Notification":
            return hook.notification_type == "permission_prompt"
        case "PermissionRequest" | "UserPromptSubmit" | "TaskCreated" | "TaskCompleted" | \
                "TeammateIdle":
            return True
    return False


def handle(event: str, raw: str, env: Mapping[str, str] | None = None) -> HookResult:
    """Handle one hook invocation; never raises, always exit code 0."""
    env = os.environ if env is None else env
    hook = HookInput.parse(event, raw)
    if not needs_backend(hook):
        return HookResult()
    try:
        timeout = float(env.get("CFLOW_HOOK_TIMEOUT_S") or DEFAULT_TIMEOUT_S)
    except ValueError:
        timeout = DEFAULT_TIMEOUT_S

    if hook.event == "PostToolUse":
        agent = claude_agent_name(env=env, session_id=hook.session_id or None,
                                  project_dir=hook.cwd or None)
        path = hook_socket_path(env.get("CFLOW_SWARM") or "default", agent)
        if relay(path, {"event": "PostToolUse", "tool_name": hook.tool_name,
                        "paths": touched_paths(hook, env.get("CLAUDE_PROJECT_DIR"))},
                 timeout) is not None:
            # The session's cfctl mcp answered: it noted the edit, or the backend is
            # down for it too (then trying NATS here would only add seconds in-line).
            return HookResult()

    import asyncio  # only events that reach the backend pay for it

    async def bounded() -> HookResult:
        return await asyncio.wait_for(handle_async(hook, env), timeout)

    try:
        return asyncio.run(bounded())
    except TimeoutError:
        return HookResult(stderr=f"cflow hook {hook.event}: no answer within {timeout:g} s "
                                 "(ignored; the session goes on)")
    except Exception as exc:  # a hook must never break the user's session (see module doc)
        return HookResult(stderr=f"cflow hook {hook.event}: {exc} (ignored; the session goes on)")


USAGE = "usage: cfctl hook EVENT < payload.json   (EVENT: " + ", ".join(EVENTS) + ")"


def main(argv: Sequence[str], stdin: TextIO | None = None) -> int:
    """``cfctl hook EVENT``: the fast path the CLI dispatches to before loading Typer."""
    args = [a for a in argv if not a.startswith("-")]
    if any(a in ("-h", "--help") for a in argv):
        sys.stdout.write(USAGE + "\n")
        return 0
    if len(args) != 1:
        sys.stderr.write(USAGE + "\n")
        return 1  # not 2: exit code 2 would make Claude Code block the action
    raw = (stdin or sys.stdin).read()
    result = handle(args[0], raw)
    if result.stdout:
        sys.stdout.write(result.stdout + "\n")
    if result.stderr:
        sys.stderr.write(result.stderr + "\n")
    return result.exit_code


__all__ = [
    "EDIT_TOOLS",
    "EVENTS",
    "HookInput",
    "HookResult",
    "briefing",
    "capabilities_from_env",
    "claude_agent_name",
    "handle",
    "main",
    "touched_paths",
]
