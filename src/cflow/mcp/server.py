"""The MCP server: nine tools, one resource, one prompt, over the ``Swarm`` facade.

Tools are thin: validate, call the facade through the :class:`Adapter`, shape a
compact result. Results are structured content (plus the same JSON, compact, as
text), with ``truncated`` and a ``next_cursor`` where lists are long. Failures
raise ``ToolError("CODE: message. Hint: ...")`` (see ``faults.py``), which the
SDK returns with ``isError`` set.

The whole ``tools/list`` answer is kept under 2,000 tokens (characters / 4):
short descriptions, and input schemas stripped of pydantic's titles and
``anyOf [T, null]`` noise by :func:`compact_schema`; no output schemas.
"""

from __future__ import annotations

import contextlib
import functools
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any, Literal, ParamSpec, cast

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, Tool, ToolAnnotations
from pydantic import Field, ValidationError

from cflow.errors import CflowError, InvalidInput, InvalidState, LeaseLost, NotFound, Unavailable
from cflow.keepalive import check_deadline
from cflow.mcp.catalog import INSTRUCTIONS
from cflow.mcp.faults import CODES, describe, describe_error

if TYPE_CHECKING:
    from cflow.mcp.adapter import Adapter
    from cflow.tasks import TaskState

P = ParamSpec("P")

FIND_LIMIT = 100
QUERY_ROW_CAP = 200
QUERY_TEXT_CAP = 16_000  # characters of rows returned to the model
BODY_CAP = 2_000
RESULT_CAP = 300
CLAIM_WAIT_MAX_S = 60.0
NOTES_IN_CONTEXT = 5
EDITED_PATHS_IN_CONTEXT = 20
STRING_CAP = 4_000  # no string in an answer is longer (a 200k-character title stays small)
STALE = "backend unreachable: read from the state cached before the outage; it may be old"
EDIT_NOTE_PREFIX = "edited via "  # notes the PostToolUse hook writes (cflow.hooks)

# (read-only, destructive, idempotent) per tool: Claude Code runs read-only tools
# concurrently and shows the others to the user as changes.
ANNOTATIONS: dict[str, tuple[bool, bool, bool]] = {
    "task_create": (False, False, False),
    "task_find": (True, False, True),
    "task_claim": (False, False, False),
    "task_update": (False, True, False),
    "task_cancel": (False, True, True),
    "memory_store": (False, True, True),
    "memory_search": (True, False, True),
    "query": (True, False, True),
    "swarm_status": (True, False, True),
    "message": (False, False, False),
    "paths": (False, False, False),
}




# ------------------------------------------------------------------ plumbing


def clipped(value: Any, limit: int = STRING_CAP) -> Any:
    """``value`` with every string in it (keys too) at most ``limit`` characters (pure)."""
    if isinstance(value, str):
        return clip(value, limit)
    if isinstance(value, dict):
        return {clipped(k, 200): clipped(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clipped(v, limit) for v in value]
    return value


def result(data: dict[str, Any]) -> CallToolResult:
    """Structured content plus the same JSON, compact, as the text block; strings clipped."""
    data = clipped(data)
    text = json.dumps(data, separators=(",", ":"), default=str, ensure_ascii=False)
    return CallToolResult(content=[TextContent(type="text", text=text)],
                          structured_content=data)


def refuse(code: str, message: str, hint: str | None = None) -> ToolError:
    return ToolError(describe(code, message, hint))


def mapped(fn: Callable[P, Awaitable[CallToolResult]]) -> Callable[P, Awaitable[CallToolResult]]:
    """Turn our errors into ``ToolError("CODE: ...")`` (a crash stays a crash)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> CallToolResult:
        try:
            return await fn(*args, **kwargs)
        except CflowError as err:
            raise ToolError(describe_error(err)) from None

    return wrapper


RETRY_ID = "retry with the id an error gave you; same id, written once"


def new_request_id() -> str:
    return f"mcp-{uuid.uuid4().hex}"


@contextlib.contextmanager
def maybe_stored(tool: str, *, request_id: str | None,
                 idempotency_key: str | None = None) -> Iterator[None]:
    """A write that timed out may still land (NATS delivers it after a reconnect): say so,
    and hand back the id that makes the retry safe."""
    try:
        yield
    except Unavailable as err:
        arg, value = (("request_id", request_id) if request_id is not None
                      else ("idempotency_key", idempotency_key))
        if value is None:
            raise
        message = str(err)
        if "may have been stored" not in message:
            message += "; the write may have been stored"
        raise ToolError(describe(
            "BACKEND_UNAVAILABLE", message,
            f"call {tool} again with the same arguments and {arg}={json.dumps(value)} once "
            "the backend is back; that retry never writes twice")) from None


def compact_schema(schema: Any) -> Any:
    """Drop ``title`` keys and collapse ``anyOf: [T, {"type": "null"}]`` to ``T`` (pure)."""
    if isinstance(schema, list):
        return [compact_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key == "properties" and isinstance(value, dict):
            out[key] = {name: compact_schema(prop) for name, prop in value.items()}
            continue
        out[key] = compact_schema(value)
    any_of = out.get("anyOf")
    if isinstance(any_of, list):
        rest = [s for s in any_of if s != {"type": "null"}]
        if len(rest) == 1 and len(rest) < len(any_of):
            del out["anyOf"]
            out = {**rest[0], **out}
    if out.get("default", 0) is None:
        del out["default"]
    return out


def clip(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def concise(state: TaskState) -> dict[str, Any]:
    """A task in one short row: only the fields that are set."""
    row: dict[str, Any] = {"id": state.task_id, "title": clip(state.title, RESULT_CAP),
                           "status": state.status}
    if state.priority:
        row["priority"] = state.priority
    if state.owner and state.status == "claimed":
        row["owner"] = state.owner
    if state.capabilities:
        row["caps"] = list(state.capabilities)
    if state.kind != "task":
        row["kind"] = state.kind
    return row


def detailed(state: TaskState) -> dict[str, Any]:
    row = concise(state)
    row.update({
        "body": clip(state.body, BODY_CAP) or "",
        "labels": dict(state.labels),
        "attempt": state.attempt,
        "max_attempts": state.max_attempts,
        "lease_ttl_s": state.lease_ttl_s,
    })
    for name in ("parent_id", "result", "error", "reason", "owner"):
        value = getattr(state, name)
        if value:
            row[name] = clip(str(value), RESULT_CAP)
    if state.depends_on:
        row["depends_on"] = list(state.depends_on)
    if state.epoch:
        row["epoch"] = state.epoch
    return row


def parse_label(label: str) -> tuple[str, str | None]:
    key, sep, value = label.partition("=")
    return key.strip(), (value.strip() if sep else None)


def matches(state: TaskState, *, status: str | None, capability: str | None,
            label: str | None, text: str | None) -> bool:
    if status and state.status != status:
        return False
    if capability and capability not in state.capabilities:
        return False
    if label:
        key, value = parse_label(label)
        if key not in state.labels or (value is not None and state.labels[key] != value):
            return False
    if text:
        needle = text.lower()
        if needle not in state.title.lower() and needle not in state.body.lower():
            return False
    return True


# ------------------------------------------------------------------ the server


def validation_text(err: ValidationError) -> str:
    """pydantic's multi-line report as one short line: ``field: problem; ...`` (pure)."""
    parts = []
    for item in err.errors()[:5]:
        where = ".".join(str(x) for x in item.get("loc", ()) if x != "arguments") or "arguments"
        parts.append(f"{where}: {str(item.get('msg', 'invalid')).rstrip('.')}")
    return "; ".join(parts)


class CflowMCP(MCPServer):
    """``MCPServer`` with compacted schemas, strict arguments and one-line errors."""

    on_call: Callable[[], Awaitable[None]] | None = None

    async def list_tools(self) -> list[Tool]:
        tools = await super().list_tools()
        return [t.model_copy(update={"input_schema": {**compact_schema(t.input_schema),
                                                      "additionalProperties": False}})
                for t in tools]

    async def call_tool(self, name: str, arguments: dict[str, Any],
                        context: Any = None) -> Any:
        tool = self._tool_manager.get_tool(name)
        if tool is None:
            known = ", ".join(t.name for t in self._tool_manager.list_tools())
            raise refuse("INVALID_ARGUMENT", f"no tool named {name!r}", f"call one of {known}")
        if not isinstance(arguments, dict):
            raise refuse("INVALID_ARGUMENT", f"{name} takes an object of named arguments")
        allowed = set(tool.parameters.get("properties", {}))
        unknown = sorted(set(arguments) - allowed)
        if unknown:
            raise refuse("INVALID_ARGUMENT",
                         f"{name} has no argument {', '.join(map(repr, unknown))}",
                         f"its arguments are {', '.join(sorted(allowed)) or 'none'}")
        if self.on_call is not None:
            await self.on_call()
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as err:
            if isinstance(err.__cause__, ValidationError):
                raise refuse("INVALID_ARGUMENT",
                             f"{name}: {validation_text(err.__cause__)}") from None
            text = str(err)
            prefix = f"Error executing tool {name}: "
            if text.startswith(prefix) and text[len(prefix):].split(":")[0] in CODES:
                raise ToolError(text[len(prefix):]) from err.__cause__  # our own, as written
            raise


def build_server(adapter: Adapter) -> CflowMCP:
    """The MCP server for one adapter (one agent)."""
    srv = CflowMCP("cflow", instructions=INSTRUCTIONS, version="0.1.0")
    srv.on_call = adapter.engage
    tasks_of = _Tools(adapter)
    for name in ("task_create", "task_find", "task_claim", "task_update", "task_cancel",
                 "memory_store", "memory_search", "query", "swarm_status", "message", "paths"):
        fn = getattr(tasks_of, name)
        read_only, destructive, idempotent = ANNOTATIONS[name]
        srv.add_tool(mapped(fn), name=name, description=(fn.__doc__ or "").strip(),
                     structured_output=False,
                     annotations=ToolAnnotations(read_only_hint=read_only,
                                                 destructive_hint=destructive,
                                                 idempotent_hint=idempotent,
                                                 open_world_hint=False))

    @srv.resource("cflow://schema", name="schema", mime_type="text/markdown",
                  description="Tables and views of the swarm's SQL projection (for `query`).")
    def schema() -> str:
        return schema_markdown()

    @srv.prompt(name="work_next", description="Claim the next ready task and work it to the end.")
    def work_next(capability: str | None = None) -> str:
        return work_next_text(adapter.agent, capability)

    return srv


class _Tools:
    """The tool bodies. Each docstring is the tool's description (keep them short)."""

    def __init__(self, adapter: Adapter) -> None:
        self.a = adapter

    @property
    def swarm(self) -> Any:
        return self.a.swarm

    def _marked_stale(self, out: dict[str, Any]) -> dict[str, Any]:
        """``out``, saying so when it was read from the board cached before an outage."""
        if not getattr(self.swarm.nc, "is_connected", True):
            out["stale"] = STALE
        return out

    async def task_create(
        self,
        title: str,
        body: str = "",
        priority: int = 0,
        capabilities: list[str] | None = None,
        depends_on: Annotated[list[str] | None, Field(description="task ids")] = None,
        parent_id: str | None = None,
        labels: dict[str, str] | None = None,
        lease_ttl_s: float = 60.0,
        max_attempts: int = 3,
        idempotency_key: Annotated[str | None, Field(description="same key, same task")] = None,
        request_id: Annotated[str | None, Field(description=RETRY_ID)] = None,
    ) -> CallToolResult:
        """Create a task. Higher priority is claimed first; capabilities are required skills."""
        # An idempotency key already names the task; otherwise every call gets a request
        # id, so the retry an outage error asks for cannot make a second task.
        rid = request_id or (None if idempotency_key else new_request_id())
        with maybe_stored("task_create", request_id=rid, idempotency_key=idempotency_key):
            state = await self.swarm.tasks.create(
                title, body=body, priority=priority, capabilities=capabilities or (),
                depends_on=depends_on or (), parent_id=parent_id, labels=labels,
                lease_ttl_s=lease_ttl_s, max_attempts=max_attempts,
                idempotency_key=idempotency_key, request_id=rid)
        return result({"task": concise(state)})

    async def task_find(
        self,
        task_id: Annotated[str | None, Field(description="get this one task in full")] = None,
        status: Literal["pending", "ready", "claimed", "expired", "completed", "failed",
                        "blocked", "cancelled"] | None = None,
        capability: str | None = None,
        label: Annotated[str | None, Field(description="key or key=value")] = None,
        text: Annotated[str | None, Field(description="substring of title/body")] = None,
        limit: int = 20,
        cursor: str | None = None,
        verbose: bool = False,
    ) -> CallToolResult:
        """Find tasks (oldest first, paged by cursor), or get one by task_id with its notes."""
        svc = self.swarm.tasks
        if task_id:
            state = await svc.get(task_id)
            return result({"task": detailed(state), **await self._notes(task_id)})
        if not 1 <= limit <= FIND_LIMIT:
            raise InvalidInput(f"limit must be 1..{FIND_LIMIT}")
        after = 0
        if cursor:
            try:
                after = int(cursor)
            except ValueError:
                raise InvalidInput(f"cursor {cursor!r} is not one this tool returned") from None
        board = await svc.ensure_board()
        found = [s for s in sorted(board.tasks.values(), key=lambda s: s.created_seq)
                 if s.created_seq > after and matches(s, status=status, capability=capability,
                                                       label=label, text=text)]
        page = found[:limit]
        shape = detailed if verbose else concise
        out: dict[str, Any] = {"tasks": [shape(s) for s in page],
                               "truncated": len(found) > limit}
        if out["truncated"]:
            out["next_cursor"] = str(page[-1].created_seq)
        return result(self._marked_stale(out))

    async def _notes(self, task_id: str) -> dict[str, Any]:
        """The latest notes written by agents, and the paths edits touched, kept apart.

        Edit notes (one per file edit, from the PostToolUse hook) never push an
        agent's own notes out: they are folded into ``edited_paths``.
        """
        from cflow import events as ev

        notes: list[dict[str, Any]] = []
        edited: list[str] = []
        for item in await self.swarm.tasks.history(task_id):
            data = item.event.data
            if not isinstance(data, ev.TaskNoted):
                continue
            if (data.text or "").startswith(EDIT_NOTE_PREFIX):
                for path in data.paths:
                    if path in edited:
                        edited.remove(path)
                    edited.append(path)
                continue
            note: dict[str, Any] = {"by": item.event.actor}
            if data.text:
                note["text"] = clip(data.text, RESULT_CAP)
            if data.paths:
                note["paths"] = list(data.paths)
            notes.append(note)
        out: dict[str, Any] = {}
        if notes:
            out["notes"] = notes[-NOTES_IN_CONTEXT:]
        if edited:
            out["edited_paths"] = edited[-EDITED_PATHS_IN_CONTEXT:]
        return out

    async def task_claim(
        self,
        task_id: Annotated[str | None, Field(description="omit: best ready task for me")] = None,
        capabilities: Annotated[list[str] | None, Field(
            description="use only these of my capabilities")] = None,
        wait_s: Annotated[float, Field(description="wait up to this for work (max 60)")] = 0.0,
        idempotency_key: str | None = None,
    ) -> CallToolResult:
        """Claim a task; returns it with the epoch to pass to task_update, and short context."""
        earlier = self.a.remembered("task_claim", idempotency_key)
        if earlier is not None and self.a.held(earlier["task"]["id"]) is not None:
            return result(earlier)
        if task_id and (mine := self.a.held(task_id)) is not None and not mine.lost.is_set():
            return result(await self._claimed(mine))  # we hold it already: same answer
        if not 0 <= wait_s <= CLAIM_WAIT_MAX_S:
            raise InvalidInput(f"wait_s must be 0..{CLAIM_WAIT_MAX_S:g}")
        caps = self.a.capabilities
        if capabilities is not None:
            lacking = sorted(set(capabilities) - set(caps))
            if lacking:
                raise InvalidInput(f"this agent lacks capabilities {lacking} "
                                   f"(it has {caps or 'none'})")
            caps = sorted(set(capabilities))
        if task_id:
            state = await self.swarm.tasks.get(task_id)
            needs = sorted(set(state.capabilities) - set(caps))
            if needs:
                raise refuse("INVALID_STATE",
                             f"task {task_id} needs capabilities {needs} that "
                             f"{'this claim leaves out' if capabilities else 'this agent lacks'}"
                             f" (claiming with {caps or 'none'})",
                             "claim another task (task_claim without task_id) or leave it "
                             "to an agent with those capabilities")
        lease = await self.swarm.tasks.claim(task_id, capabilities=caps, wait=wait_s)
        if lease is None:
            return result(await self._nothing(caps))
        if check_deadline(lease):
            # The claim came back after this holder's own deadline (a slow link): the
            # lease may be gone and the task another agent's; the session must not
            # start on it.
            released = await lease.release_late()
            return result({"claimed": False, "task_id": lease.task_id,
                           "reason": f"the claim came back too late ({lease.lost_reason}); "
                                     + ("released" if released else "left to expire")
                                     + ", not started",
                           "hint": "call task_claim again"})
        self.a.hold(lease)
        answer = await self._claimed(lease)
        return result(self.a.remember("task_claim", idempotency_key, answer))

    async def _nothing(self, caps: list[str]) -> dict[str, Any]:
        """Why nothing was claimed: no ready work, or ready work needs what we lack."""
        board = await self.swarm.tasks.ensure_board()
        ready = [s for s in board.ready() if s.kind == "task"]
        out: dict[str, Any] = {"claimed": False, "ready": len(ready)}
        if not ready:
            out["reason"] = "no ready work in the swarm"
            out["hint"] = "pass wait_s (up to 60) to wait for work, or create tasks"
            return out
        lacking: dict[str, int] = {}
        for state in ready:
            for cap in sorted(set(state.capabilities) - set(caps)):
                lacking[cap] = lacking.get(cap, 0) + 1
        if lacking:
            out["reason"] = (f"{len(ready)} ready task(s); those left need capabilities "
                             f"this claim lacks: {dict(sorted(lacking.items()))}")
            out["hint"] = (f"claiming with capabilities {caps or 'none'}; an agent with the "
                           "missing ones must take them")
        else:
            out["reason"] = (f"{len(ready)} ready task(s), none claimable now (backing off "
                             "after a failure, paused, or just taken)")
            out["hint"] = "pass wait_s to wait; swarm_status shows pauses"
        return out

    async def _claimed(self, lease: Any) -> dict[str, Any]:
        state: TaskState = lease.task
        context: dict[str, Any] = {}
        svc = self.swarm.tasks
        if state.parent_id:
            try:
                parent = await svc.get(state.parent_id)
                context["parent"] = {"id": parent.task_id, "title": parent.title}
            except NotFound:
                pass
        deps = []
        for dep_id in state.depends_on:
            try:
                dep = await svc.get(dep_id)
            except NotFound:
                continue
            deps.append({"id": dep.task_id, "title": dep.title,
                         "result": clip(dep.result, RESULT_CAP)})
        if deps:
            context["dependencies"] = deps
        context.update(await self._notes(state.task_id))
        if state.error:
            context["previous_error"] = clip(state.error, RESULT_CAP)
        return {"claimed": True, "task": detailed(state), "epoch": lease.epoch,
                "attempt": lease.attempt, "lease_ttl_s": lease.ttl_s, "context": context}

    async def task_update(
        self,
        task_id: str,
        action: Literal["complete", "fail", "release", "note"],
        epoch: Annotated[int | None, Field(
            description="from task_claim; default: my lease")] = None,
        text: Annotated[str | None, Field(description="result, error, reason or note")] = None,
        paths: Annotated[list[str] | None, Field(description="files touched (note)")] = None,
        retry: Annotated[bool, Field(description="fail: retry later")] = True,
        cost_usd: float | None = None,
        idempotency_key: str | None = None,
    ) -> CallToolResult:
        """Finish (complete/fail/release) or note progress on a task I hold, fenced by epoch."""
        earlier = self.a.remembered("task_update", idempotency_key)
        if earlier is not None:
            return result(earlier)
        mine = self.a.held(task_id)
        if epoch is not None and epoch < 1:
            raise InvalidInput(f"epoch must be a positive integer from task_claim, not {epoch}")
        if epoch is not None and (mine is None or epoch != mine.epoch):
            current = (mine.epoch if mine is not None
                       else (await self.swarm.tasks.get(task_id)).epoch)
            if epoch > current or (epoch < current
                                   and epoch not in await self._claim_epochs(task_id)):
                raise InvalidInput(f"epoch {epoch} was never issued for {task_id} (its latest "
                                   f"claim is epoch {current}); pass the epoch task_claim "
                                   "returned, or omit it to use your lease's")
        if epoch is None:
            if mine is None:
                if action != "note":
                    raise InvalidInput(f"no epoch given and this agent holds no lease on "
                                       f"{task_id}; pass the epoch task_claim returned")
            else:
                epoch = mine.epoch
        svc = self.swarm.tasks
        out: dict[str, Any]
        if action == "note":
            seq = await svc.note(task_id, text or "", epoch=epoch, paths=paths or ())
            out = {"task_id": task_id, "noted": True, "seq": seq}
        else:
            assert epoch is not None
            try:
                if action == "complete":
                    state = await svc.complete(task_id, epoch, text, cost_usd=cost_usd)
                elif action == "fail":
                    state = await svc.fail(task_id, epoch, text or "failed", retry=retry,
                                           cost_usd=cost_usd)
                else:
                    state = await svc.release(task_id, epoch, text or "")
            except (LeaseLost, InvalidState):  # the lease is gone for good: stop renewing it
                if mine is not None and mine.epoch == epoch:
                    self.a.drop(task_id)
                raise
            # Any other failure (a timeout: "may have been stored; retry is safe")
            # keeps the lease renewed, so the retry still holds it.
            if mine is not None and mine.epoch == epoch:
                self.a.drop(task_id)
            out = {"task_id": task_id, "status": state.status}
            if action == "fail" and state.status == "ready":
                out["retry"] = f"attempt {state.attempt}/{state.max_attempts} will be retried"
        return result(self.a.remember("task_update", idempotency_key, out))

    async def _claim_epochs(self, task_id: str) -> set[int]:
        """Every epoch ever issued for the task (a claim's epoch is its event's sequence)."""
        from cflow import events as ev

        return {item.seq for item in await self.swarm.tasks.history(task_id)
                if isinstance(item.event.data, ev.TaskClaimed)}

    async def task_cancel(self, task_id: str, reason: str = "",
                          idempotency_key: str | None = None) -> CallToolResult:
        """Cancel a task (its holder is told at its next heartbeat)."""
        earlier = self.a.remembered("task_cancel", idempotency_key)
        if earlier is not None:
            return result(earlier)
        state = await self.swarm.tasks.cancel(task_id, reason)
        self.a.drop(task_id)
        out = {"task_id": task_id, "status": state.status}
        return result(self.a.remember("task_cancel", idempotency_key, out))

    def _memory(self) -> Any:
        try:
            return self.swarm.memory
        except ImportError:
            raise Unavailable("shared memory is not available in this build") from None

    async def memory_store(
        self,
        key: str,
        value: str,
        namespace: str = "default",
        tags: list[str] | None = None,
        ttl_s: float | None = None,
        idempotency_key: str | None = None,
        request_id: Annotated[str | None, Field(description=RETRY_ID)] = None,
    ) -> CallToolResult:
        """Store a value in shared memory (overwrites the key; returns its version)."""
        earlier = self.a.remembered("memory_store", idempotency_key)
        if earlier is not None:
            return result(earlier)
        rid = request_id or idempotency_key or new_request_id()
        with maybe_stored("memory_store", request_id=rid):
            entry = await self._memory().put(namespace, key, value, tags=tags or (),
                                             ttl_s=ttl_s, request_id=rid)
        out = {"namespace": entry.namespace, "key": entry.key, "version": entry.version}
        return result(self.a.remember("memory_store", idempotency_key, out))

    async def memory_search(
        self,
        query: Annotated[str | None, Field(description="words to search")] = None,
        key: Annotated[str | None, Field(description="get this exact key")] = None,
        namespace: str | None = None,
        limit: int = 10,
    ) -> CallToolResult:
        """Search shared memory (ranked, with snippets), or get one entry by key."""
        memory = self._memory()
        if key:
            entry = await memory.get(namespace or "default", key)
            return result({"entry": {"namespace": entry.namespace, "key": entry.key,
                                     "value": entry.value, "tags": list(entry.tags),
                                     "version": entry.version, "author": entry.author}})
        if not query:
            raise InvalidInput("pass query (words to search) or key (an exact key)")
        if not 1 <= limit <= 50:
            raise InvalidInput("limit must be 1..50")
        hits = await memory.search(query, namespace=namespace, limit=limit)
        return result({"hits": [{"namespace": h.namespace, "key": h.key,
                                 "snippet": h.snippet, "score": round(h.score, 3),
                                 "tags": list(h.tags)} for h in hits]})

    async def query(
        self,
        sql: Annotated[str, Field(description="one SELECT; tables in cflow://schema")],
        limit: int = 50,
    ) -> CallToolResult:
        """Read-only SQL over the swarm's projection (tasks, agents, memory, events...)."""
        if not 1 <= limit <= QUERY_ROW_CAP:
            raise InvalidInput(f"limit must be 1..{QUERY_ROW_CAP}")
        res = await self.swarm.query(sql, limit=limit, timeout_s=10.0)
        rows, truncated = list(res.rows), bool(res.truncated)
        while rows and len(json.dumps(rows, default=str)) > QUERY_TEXT_CAP:
            rows, truncated = rows[: len(rows) // 2], True
        return result({"columns": res.columns, "rows": rows, "truncated": truncated})

    async def message(
        self,
        action: Literal["send", "inbox", "ack"],
        to: Annotated[str | None, Field(description="agent (send)")] = None,
        topic: Annotated[str | None, Field(description="topic instead of to (send)")] = None,
        text: str | None = None,
        reply_to: Annotated[str | None, Field(description="message id (send)")] = None,
        message_id: Annotated[str | None, Field(description="to ack")] = None,
        wait_s: Annotated[float, Field(description="inbox: wait for one (max 60)")] = 0.0,
    ) -> CallToolResult:
        """Message other agents: send (to an agent or topic), read my inbox, ack a message."""
        svc = self.swarm.messages
        if action == "send":
            if not text:
                raise InvalidInput("send needs text")
            mid = await svc.send(to, text, topic=topic, reply_to=reply_to)
            return result({"sent": mid})
        if action == "ack":
            if not message_id:
                raise InvalidInput("ack needs message_id")
            await svc.ack(self.a.agent, message_id)
            return result({"acked": message_id})
        if not 0 <= wait_s <= CLAIM_WAIT_MAX_S:
            raise InvalidInput(f"wait_s must be 0..{CLAIM_WAIT_MAX_S:g}")
        if self.a.channel is not None:
            return result({"messages": [], "note": "messages are pushed into this session "
                                                   "as they arrive (channel)"})
        got = await svc.inbox(self.a.agent, 20, wait_s=wait_s)
        return result({"messages": [{"id": m.id, "from": m.sender, "topic": m.topic,
                                     "text": clip(m.text, BODY_CAP), "ack": m.ack_required}
                                    for m in got]})

    async def paths(
        self,
        action: Literal["reserve", "release", "list"],
        patterns: Annotated[list[str] | None, Field(
            description="paths or globs (reserve)")] = None,
        task_id: Annotated[str | None, Field(description="tie to / release by task")] = None,
        reservation_id: Annotated[str | None, Field(description="release one")] = None,
    ) -> CallToolResult:
        """Reserve paths before editing (kept while I run), release them, or list who holds what."""
        svc = self.swarm.reservations
        if action == "reserve":
            if not patterns:
                raise InvalidInput("reserve needs patterns (paths or globs)")
            held = await svc.reserve(patterns, task_id=task_id)
            self.a.keep_reservation(held)
            return result({"reserved": held.id, "patterns": list(held.patterns)})
        if action == "release":
            released = await svc.release(reservation_id=reservation_id, task_id=task_id)
            for rid in released:
                self.a.drop_reservation(rid)
            return result({"released": released})
        rows = [{"id": r.id, "owner": r.owner, "patterns": list(r.patterns),
                 "task_id": r.task_id} for r in (await svc.list())[:50]]
        return result({"reservations": rows})

    async def swarm_status(self) -> CallToolResult:
        """My leases, queue counts, agents and gates waiting for a human, in one call."""
        svc = self.swarm.tasks
        board = await svc.ensure_board()
        counts: dict[str, int] = {}
        gates = []
        for state in board.tasks.values():
            counts[state.status] = counts.get(state.status, 0) + 1
            if state.kind == "gate" and state.status == "ready":
                gates.append({"id": state.task_id, "title": state.title})
        mine = []
        for task_id, lease in list(self.a.leases.items()):
            row: dict[str, Any] = {"task_id": task_id, "title": lease.task.title,
                                   "epoch": lease.epoch}
            if lease.lost.is_set():
                row["lost"] = lease.lost_reason or "lost"
            mine.append(row)
        out: dict[str, Any] = {
            "agent": self.a.agent, "capabilities": self.a.capabilities,
            "my_leases": mine, "queue": counts,
            "ready_for_me": sum(1 for _ in board.candidates(self.a.capabilities,
                                                            _now_ms())),
            "gates": gates[:10],
        }
        if not getattr(self.swarm.nc, "is_connected", True):
            # An outage: answer at once from the board; the reads below would each time out.
            return result(self._marked_stale(out))
        try:  # paused / stopped, open breakers: why claims are refused
            out["control"] = await self.swarm.control.state()
        except CflowError as exc:
            out["control"] = {"error": str(exc)}
        try:
            agents = await self.swarm.agents.list()
        except (CflowError, ImportError):
            agents = None
        if agents is not None:
            from cflow.agents import PRESENCE_STATES, presence_state

            holders = {s.owner for s in board.tasks.values() if s.status == "claimed"}
            rows = [{"name": a.name, "presence": presence_state(a, a.name in holders)}
                    for a in agents]
            rows.sort(key=lambda r: (PRESENCE_STATES.index(r["presence"]), r["name"]))
            out["agents"] = rows[:20]
            out["agents_by_presence"] = {
                state: n for state in PRESENCE_STATES
                if (n := sum(1 for r in rows if r["presence"] == state))}
        return result(self._marked_stale(out))


def _now_ms() -> int:
    from cflow.streams.client import wall_ms

    return wall_ms()


# ------------------------------------------------------------ resource, prompt


def schema_markdown() -> str:
    """The ``cflow://schema`` resource: every table with its columns, and the views."""
    from cflow.projections import schema

    lines = ["# cflow projection (DuckDB, read with the `query` tool)", ""]
    for table, cols in schema.TABLES.items():
        lines.append(f"- **{table}**(" + ", ".join(f"{c} {t.split()[0]}" for c, t in cols) + ")")
    views = getattr(schema, "VIEWS", {})
    if views:
        lines += ["", "Views: " + ", ".join(sorted(views)) + "."]
    lines += ["", "Times are UTC TIMESTAMPs from event clocks. One SELECT per call; "
                  "results are row-capped (`truncated` says so)."]
    return "\n".join(lines)


def work_next_text(agent: str, capability: str | None = None) -> str:
    scope = f" needing capability '{capability}'" if capability else ""
    claim_args = f" with capabilities=[{json.dumps(capability)}]" if capability else ""
    return (
        f"You are cflow agent '{agent}'. Get the next piece of work{scope} and finish it:\n"
        "1. Call swarm_status; if you already hold a lease, continue that task.\n"
        f"2. Otherwise call task_claim{claim_args} (wait_s=30 to wait for work). "
        "Keep the returned epoch.\n"
        "3. Read the task body and its context (dependency results, notes). Search shared "
        "memory (memory_search) for relevant knowledge.\n"
        "4. Do the work. Record progress with task_update action=note (paths you touched).\n"
        "5. Finish with task_update action=complete (text = a short result), or action=fail "
        "(text = the error) or action=release if you cannot do it.\n"
        "6. Store reusable findings with memory_store. If any call returns LEASE_LOST, stop "
        "working on that task."
    )


__all__ = ["CflowMCP", "build_server", "compact_schema", "result", "schema_markdown"]


def live_tools() -> list[dict[str, Any]]:
    """The ``tools/list`` answer of the full server, as JSON (no backend needed)."""
    return live_lists()["tools"]


def live_lists() -> dict[str, list[dict[str, Any]]]:
    """The tools, prompts and resources lists of the full server, as JSON."""
    import asyncio

    srv = build_server(cast("Adapter", _NoAdapter()))

    async def lists() -> dict[str, list[Any]]:
        return {"tools": await srv.list_tools(), "prompts": await srv.list_prompts(),
                "resources": await srv.list_resources(),
                "resourceTemplates": await srv.list_resource_templates()}

    return {key: [x.model_dump(by_alias=True, exclude_none=True, mode="json") for x in items]
            for key, items in asyncio.run(lists()).items()}


class _NoAdapter:
    """Enough of an adapter to build the server and list its tools."""

    agent = "catalog"
    capabilities: tuple[str, ...] = ()

    async def engage(self) -> None:
        return None


def write_catalog() -> None:
    """Rewrite ``TOOLS`` in catalog.py from the live server."""
    from pathlib import Path

    path = Path(__file__).with_name("catalog.py")
    text = path.read_text(encoding="utf-8")
    head = text[: text.index("TOOLS: list[dict[str, Any]] = ")]
    lists = live_lists()
    lines = []
    for key, name in (("tools", "TOOLS"), ("prompts", "PROMPTS"), ("resources", "RESOURCES"),
                      ("resourceTemplates", "RESOURCE_TEMPLATES")):
        body = json.dumps(lists[key], separators=(",", ":"), ensure_ascii=False)
        line = f"{name}: list[dict[str, Any]] = json.loads({body!r})"
        lines.append(line + ("  # noqa: E501\n" if len(line) > 100 else "\n"))
    path.write_text(head + "".join(lines), encoding="utf-8")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write-catalog"]:
        raise SystemExit("usage: python -m cflow.mcp.server --write-catalog")
    write_catalog()

