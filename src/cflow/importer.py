"""Import an existing claude-flow installation into cflow events.

Reads (stdlib ``sqlite3``, read-only):

* ``<path>/.swarm/memory.db``, table ``memory_entries`` (``id, key, value,
  namespace, metadata, created_at, updated_at, accessed_at, access_count, ttl,
  expires_at``; Unix seconds) -> memory entries in their namespace;
* ``<path>/.hive-mind/hive.db``: ``swarms`` (kept as labels), ``agents`` ->
  registered agents (recorded offline), ``tasks`` -> tasks with their
  dependencies and final status, ``memory`` -> memory entries in namespace
  ``hive/<namespace>``.

Idempotency comes from the source ids: a task's id is derived from the key
``claude-flow:task:<id>`` (so re-creating it returns the existing task), an agent
is only registered if its subject has no events, a memory entry is only written
if its key never existed in cflow (compare-and-set on "absent"). Re-running the
import therefore adds nothing.

Final statuses are reproduced through the claim path, by actor ``import``:
``completed`` = claim + complete, ``failed`` = claim + final fail, ``cancelled``
= cancel. ``assigned`` and ``in_progress`` tasks have no live worker any more
and become ready work (their old status stays in the ``claude_flow_status``
label). Tasks are imported in dependency order; a dependency on an unknown task
is dropped, and a finished task whose dependencies did not all complete is
imported without them (they stay in a label), since it could not have finished
otherwise in cflow. Expired memory is skipped.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cflow import events as ev
from cflow.errors import ConcurrencyConflict, InvalidInput, NotFound

if TYPE_CHECKING:
    from cflow.swarm import Swarm

IMPORT_ACTOR = "import"
PRIORITY = {"low": -1, "medium": 0, "normal": 0, "high": 1, "critical": 2}
FINAL = {"completed", "failed", "cancelled"}
MEMORY_DB = Path(".swarm") / "memory.db"
HIVE_DB = Path(".hive-mind") / "hive.db"


# ---------------------------------------------------------------------- rows


@dataclass(frozen=True)
class MemoryRow:
    source: str  # "memory.db" or "hive.db"
    source_id: str
    namespace: str
    key: str
    value: str
    metadata: dict[str, Any]
    tags: tuple[str, ...]
    expires_s: float | None


@dataclass(frozen=True)
class AgentRow:
    source_id: str
    name: str
    swarm_id: str | None
    type: str
    status: str
    capabilities: tuple[str, ...]


@dataclass(frozen=True)
class TaskRow:
    source_id: str
    swarm_id: str | None
    description: str
    priority: int
    status: str
    result: str | None
    error: str | None
    dependencies: tuple[str, ...]
    capabilities: tuple[str, ...]
    created_at: str | None
    completed_at: str | None


@dataclass
class Source:
    path: Path
    memory: list[MemoryRow] = field(default_factory=list)
    agents: list[AgentRow] = field(default_factory=list)
    tasks: list[TaskRow] = field(default_factory=list)
    swarms: dict[str, str] = field(default_factory=dict)  # id -> name
    expired: int = 0
    files: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.memory) + len(self.agents) + len(self.tasks)


# ------------------------------------------------------------ pure conversions


def epoch_seconds(value: Any) -> float | None:
    """Unix seconds from claude-flow's numbers (s or ms) or SQLite datetime text."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        v = float(value)
    else:
        text = str(value).strip()
        try:
            v = float(text)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                return None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)  # SQLite CURRENT_TIMESTAMP is UTC
            return parsed.timestamp()
    return v / 1000 if v > 1e11 else v


def json_value(text: Any, default: Any) -> Any:
    if text is None or text == "":
        return default
    if not isinstance(text, str | bytes):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return default


def string_list(value: Any) -> tuple[str, ...]:
    items = json_value(value, [])
    if isinstance(items, str):
        items = [s.strip() for s in items.split(",")]
    if not isinstance(items, list):
        return ()
    return tuple(str(i) for i in items if isinstance(i, str | int) and str(i).strip())


def token_for(name: str, fallback: str) -> str:
    """A subject-token form of an agent name (letters, digits, '-', '_')."""
    token = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:128]
    return token or re.sub(r"[^A-Za-z0-9_-]+", "-", fallback)[:128] or "agent"


def task_order(tasks: Iterable[TaskRow]) -> tuple[list[TaskRow], dict[str, tuple[str, ...]]]:
    """Tasks in dependency order, and the dependencies each keeps (pure).

    Unknown dependencies are dropped; edges that close a cycle are dropped too.
    """
    by_id = {t.source_id: t for t in tasks}
    keep = {t.source_id: tuple(d for d in dict.fromkeys(t.dependencies)
                               if d in by_id and d != t.source_id)
            for t in by_id.values()}
    ordered: list[TaskRow] = []
    done: set[str] = set()
    visiting: set[str] = set()
    for root in by_id:
        if root in done:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        visiting.add(root)
        while stack:
            node, i = stack[-1]
            deps = keep[node]
            if i < len(deps):
                stack[-1] = (node, i + 1)
                dep = deps[i]
                if dep in visiting:  # a cycle: drop this edge
                    keep[node] = tuple(d for d in deps if d != dep)
                    stack[-1] = (node, i)
                elif dep not in done:
                    visiting.add(dep)
                    stack.append((dep, 0))
                continue
            stack.pop()
            visiting.discard(node)
            done.add(node)
            ordered.append(by_id[node])
    return ordered, keep


# ---------------------------------------------------------------- reading


def _connect(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        raise InvalidInput(f"{path}: not a readable SQLite database ({exc})") from None
    return conn


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _rows(conn: sqlite3.Connection, path: Path, table: str, needed: Iterable[str]
          ) -> list[dict[str, Any]]:
    cols = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
    missing = [c for c in needed if c not in cols]
    if missing:
        raise InvalidInput(f"{path}: table {table} lacks column(s) {', '.join(missing)}")
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table}")]
    except sqlite3.DatabaseError as exc:
        raise InvalidInput(f"{path}: cannot read table {table} ({exc})") from None


def _memory_row(row: dict[str, Any], source: str, namespace: str, now_s: float
                ) -> MemoryRow | None:
    keys = row
    expires = epoch_seconds(row["expires_at"]) if "expires_at" in keys else None
    if expires is None and "ttl" in keys and row["ttl"] and "created_at" in keys:
        created = epoch_seconds(row["created_at"])
        ttl = float(row["ttl"])
        expires = created + (ttl / 1000 if ttl > 1e6 else ttl) if created else None
    if expires is not None and expires <= now_s:
        return None
    meta = json_value(row["metadata"], {}) if "metadata" in keys else {}
    if not isinstance(meta, dict):
        meta = {"metadata": meta}
    tags = string_list(meta.get("tags")) if "tags" in meta else ()
    source_id = str(row["id"]) if "id" in keys and row["id"] is not None else (
        f"{namespace}/{row['key']}")
    extra: dict[str, Any] = {"source": f"claude-flow {source}", "claude_flow_id": source_id}
    for name in ("created_at", "updated_at", "accessed_at", "access_count"):
        if name in keys and row[name] is not None:
            extra[f"claude_flow_{name}"] = row[name]
    value = row["value"]
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return MemoryRow(source=source, source_id=source_id, namespace=namespace,
                     key=str(row["key"]), value="" if value is None else str(value),
                     metadata={**meta, **extra}, tags=tags, expires_s=expires)


def read_source(path: Path, now_s: float | None = None) -> Source:
    """Read a claude-flow installation (blocking).

    Raises:
        NotFound: neither database exists under ``path``.
        InvalidInput: a database that is not SQLite or lacks the expected tables.
    """
    now = time.time() if now_s is None else now_s
    root = path.expanduser()
    src = Source(path=root)
    memory_db, hive_db = root / MEMORY_DB, root / HIVE_DB
    if root.is_file():  # a single database file given directly
        memory_db, hive_db = (root, Path("/nonexistent")) if root.name == "memory.db" else (
            Path("/nonexistent"), root)
    if not memory_db.is_file() and not hive_db.is_file():
        raise NotFound("claude-flow data", f"{root} (no {MEMORY_DB} or {HIVE_DB})")
    if memory_db.is_file():
        src.files.append(str(memory_db))
        conn = _connect(memory_db)
        try:
            if "memory_entries" not in _tables(conn):
                raise InvalidInput(f"{memory_db}: no memory_entries table; not a claude-flow "
                                   "memory database")
            for row in _rows(conn, memory_db, "memory_entries", ("key", "value")):
                ns = str(row.get("namespace") or "default")
                item = _memory_row(row, "memory.db", ns, now)
                if item is None:
                    src.expired += 1
                else:
                    src.memory.append(item)
        finally:
            conn.close()
    if hive_db.is_file():
        src.files.append(str(hive_db))
        conn = _connect(hive_db)
        try:
            tables = _tables(conn)
            if not tables & {"agents", "tasks", "memory", "swarms"}:
                raise InvalidInput(f"{hive_db}: none of the tables swarms, agents, tasks, "
                                   "memory; not a claude-flow hive-mind database")
            _read_hive(conn, hive_db, tables, src, now)
        finally:
            conn.close()
    return src


def _read_hive(conn: sqlite3.Connection, path: Path, tables: set[str], src: Source,
               now: float) -> None:
    if "swarms" in tables:
        for row in _rows(conn, path, "swarms", ("id",)):
            name = row.get("name")
            src.swarms[str(row["id"])] = str(name or row["id"])
    if "agents" in tables:
        for row in _rows(conn, path, "agents", ("id",)):
            keys = row
            src.agents.append(AgentRow(
                source_id=str(row["id"]),
                name=str(row["name"] if "name" in keys and row["name"] else row["id"]),
                swarm_id=str(row["swarm_id"]) if "swarm_id" in keys and row["swarm_id"] else None,
                type=str(row["type"] or "") if "type" in keys else "",
                status=str(row["status"] or "") if "status" in keys else "",
                capabilities=string_list(row["capabilities"]) if "capabilities" in keys else ()))
    if "tasks" in tables:
        for row in _rows(conn, path, "tasks", ("id", "description", "status")):
            col = row.get

            prio = col("priority")
            src.tasks.append(TaskRow(
                source_id=str(row["id"]), swarm_id=str(col("swarm_id") or "") or None,
                description=str(row["description"] or ""),
                priority=PRIORITY.get(str(prio).lower(), 0) if not isinstance(prio, int)
                else prio,
                status=str(row["status"] or "pending").lower(),
                result=None if col("result") is None else str(col("result")),
                error=None if col("error") is None else str(col("error")),
                dependencies=string_list(col("dependencies")),
                capabilities=string_list(col("required_capabilities")),
                created_at=None if col("created_at") is None else str(col("created_at")),
                completed_at=None if col("completed_at") is None else str(col("completed_at"))))
    if "memory" in tables:
        for row in _rows(conn, path, "memory", ("key", "value")):
            ns = str(row.get("namespace") or "default")
            item = _memory_row(row, "hive.db", f"hive/{ns}", now)
            if item is None:
                src.expired += 1
            else:
                src.memory.append(item)


# ---------------------------------------------------------------- importing


@dataclass
class ImportReport:
    imported: dict[str, int] = field(default_factory=lambda: {"memory": 0, "agents": 0,
                                                               "tasks": 0})
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    notes: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {"imported": dict(self.imported), "skipped": dict(self.skipped),
                "notes": list(self.notes)}


class Importer:
    """Turns a read :class:`Source` into cflow events through the facade."""

    def __init__(self, swarm: Swarm, *, on_step: Callable[[str], None] | None = None) -> None:
        self.swarm = swarm
        self.on_step = on_step or (lambda _: None)

    async def run(self, source: Source) -> ImportReport:
        report = ImportReport()
        for _ in range(source.expired):
            report.skip("memory expired")
        for row in source.memory:
            await self._memory(row, report)
            self.on_step("memory")
        for agent in source.agents:
            await self._agent(agent, source, report)
            self.on_step("agents")
        ordered, deps = task_order(source.tasks)
        dropped = sum(len(t.dependencies) - len(deps[t.source_id]) for t in source.tasks)
        if dropped:
            report.notes.append(f"{dropped} dependency edge(s) to unknown tasks or closing a "
                                "cycle were dropped")
        statuses = {t.source_id: t.status for t in source.tasks}
        for task in ordered:
            await self._task(task, deps[task.source_id], statuses, source, report)
            self.on_step("tasks")
        return report

    async def _memory(self, row: MemoryRow, report: ImportReport) -> None:
        from cflow.memory import ContentType, MemoryConflict, key_token

        try:
            token = key_token(row.namespace, row.key)
        except InvalidInput:
            report.skip("memory with an empty key")
            return
        if await self.swarm.log.last_seq("memory", token) > 0:
            report.skip("memory already present")
            return
        ttl = None if row.expires_s is None else max(1.0, row.expires_s - time.time())
        parsed = json_value(row.value, None)
        ctype: ContentType = "json" if isinstance(parsed, dict | list) else "text"
        try:
            await self.swarm.memory.put(row.namespace, row.key, row.value, tags=row.tags,
                                        ttl_s=ttl, expected_version=0, content_type=ctype,
                                        metadata=row.metadata,
                                        # a run that stopped between the value and its event
                                        # finds its own write and records the event
                                        request_id=f"claude-flow-import:{token}")
        except MemoryConflict:
            report.skip("memory already present")
            return
        except InvalidInput as exc:
            report.skip(f"memory refused: {exc}")
            return
        report.imported["memory"] += 1

    async def _agent(self, row: AgentRow, source: Source, report: ImportReport) -> None:
        name = token_for(row.name, row.source_id)
        log = self.swarm.log
        if await log.last_seq("agent", name) > 0:
            report.skip("agent already present")
            return
        labels = {"source": "claude-flow", "claude_flow_id": row.source_id,
                  "claude_flow_type": row.type, "claude_flow_status": row.status}
        if row.swarm_id:
            labels["claude_flow_swarm"] = source.swarms.get(row.swarm_id, row.swarm_id)
        try:
            appended = await log.append(
                ev.AgentRegistered(name=name, capabilities=tuple(sorted(set(row.capabilities))),
                                   labels=labels, runtime="claude-flow-import"),
                name, expected=0, msg_id=f"import-agent-{name}", actor=IMPORT_ACTOR,
                dedupe_by_msg_id=True)
        except ConcurrencyConflict:
            report.skip("agent already present")
            return
        # If the agent came alive meanwhile, its own status wins.
        with contextlib.suppress(ConcurrencyConflict):
            await log.append(ev.AgentStatusChanged(status="offline", reason="imported"), name,
                             expected=appended.seq, msg_id=f"import-agent-offline-{name}",
                             dedupe_by_msg_id=True, actor=IMPORT_ACTOR)
        report.imported["agents"] += 1

    async def _task(self, row: TaskRow, deps: tuple[str, ...], statuses: dict[str, str],
                    source: Source, report: ImportReport) -> None:
        from cflow.leases import task_id_for_key

        tasks = self.swarm.tasks
        key = f"claude-flow:task:{row.source_id}"
        task_id = task_id_for_key(self.swarm.name, key)
        existed = True
        try:
            state = await tasks.get(task_id)
        except NotFound:
            existed = False
        if not existed:
            keep = deps
            if row.status in ("completed", "failed") and any(
                    statuses.get(d) != "completed" for d in deps):
                keep = ()  # it finished although they did not: cflow could not replay that
            labels = {"source": "claude-flow", "claude_flow_id": row.source_id,
                      "claude_flow_status": row.status}
            if row.swarm_id:
                labels["claude_flow_swarm"] = source.swarms.get(row.swarm_id, row.swarm_id)
            if row.created_at:
                labels["claude_flow_created_at"] = row.created_at
            if keep != deps:
                labels["claude_flow_dependencies"] = ",".join(deps)
            description = row.description.strip() or f"claude-flow task {row.source_id}"
            title = description.splitlines()[0][:200]
            state = await tasks.create(
                title, body=description, priority=row.priority, capabilities=row.capabilities,
                depends_on=[task_id_for_key(self.swarm.name, f"claude-flow:task:{d}")
                            for d in keep],
                idempotency_key=key, labels=labels)
        finished = await self._finish(state, row)
        if existed and not finished:
            report.skip("task already present")
        else:
            report.imported["tasks"] += 1

    async def _finish(self, state: Any, row: TaskRow) -> bool:
        """Drive the task to its source's final status; True if anything was written."""
        tasks = self.swarm.tasks
        if row.status not in FINAL or state.terminal:
            return False
        if row.status == "cancelled":
            await tasks.cancel(state.task_id, reason="cancelled in claude-flow")
            return True
        if state.status == "claimed" and state.owner == IMPORT_ACTOR:
            epoch = state.epoch  # an earlier run stopped between claim and finish
        else:
            lease = await tasks.claim(state.task_id, agent=IMPORT_ACTOR)
            if lease is None:
                return False
            epoch = lease.epoch
        if row.status == "completed":
            await tasks.complete(state.task_id, epoch, row.result)
        else:
            await tasks.fail(state.task_id, epoch, row.error or "failed in claude-flow",
                             retry=False)
        return True


__all__ = [
    "AgentRow",
    "ImportReport",
    "Importer",
    "MemoryRow",
    "Source",
    "TaskRow",
    "epoch_seconds",
    "read_source",
    "task_order",
    "token_for",
]
