"""What the console shows: reads of the DuckDB projection through its query service.

Every page is one or a few ``swarm.query`` calls (the projector's read-only
service on NATS), never a fold in this process, so 10,000 tasks cost the
console what one page of them costs: filters, ordering and paging run in
DuckDB (``LIMIT``/``OFFSET`` plus one ``count(*)``). Values from the browser
reach SQL only as ``?`` parameters.

``seq`` (read-your-writes): a page refreshed because of the event at stream
sequence N asks the service to wait until the projection applied N, so the
row it shows already includes that event.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cflow.errors import CflowError, InvalidInput, LimitExceeded, Unavailable

if TYPE_CHECKING:
    from cflow.projections.query import QueryResult
    from cflow.swarm import Swarm

PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
WAIT_FOR_SEQ_S = 2.0
STATUS_ORDER = ("ready", "claimed", "pending", "expired", "blocked", "failed", "completed",
                "cancelled")
SORTS = {
    "priority": "priority DESC, created_seq",
    "age": "created_seq",
    "newest": "created_seq DESC",
    "attempt": "attempt DESC, created_seq",
}


@dataclass(frozen=True)
class BoardFilter:
    """The board's filters, as the browser sent them (validated, never interpolated)."""

    status: str = ""
    capability: str = ""
    label: str = ""  # "key=value" or "key"
    agent: str = ""
    text: str = ""
    parent: str = ""
    sort: str = "priority"
    page: int = 1
    size: int = PAGE_SIZE

    @classmethod
    def parse(cls, params: Any) -> BoardFilter:
        """From query parameters. Raises InvalidInput on a bad value."""

        def number(name: str, default: int, low: int, high: int) -> int:
            raw = (params.get(name) or "").strip()
            if not raw:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise InvalidInput(f"{name} must be a whole number, got {raw!r}") from None
            if not low <= value <= high:
                raise InvalidInput(f"{name} must be between {low} and {high}, got {value}")
            return value

        status = (params.get("status") or "").strip()
        if status and status not in STATUS_ORDER:
            raise InvalidInput(f"unknown status {status!r} (one of {', '.join(STATUS_ORDER)})")
        sort = (params.get("sort") or "priority").strip()
        if sort not in SORTS:
            raise InvalidInput(f"unknown sort {sort!r} (one of {', '.join(SORTS)})")
        return cls(status=status, capability=(params.get("capability") or "").strip(),
                   label=(params.get("label") or "").strip(),
                   agent=(params.get("agent") or "").strip(),
                   text=(params.get("text") or "").strip(),
                   parent=(params.get("parent") or "").strip(), sort=sort,
                   page=number("page", 1, 1, 1_000_000),
                   size=number("size", PAGE_SIZE, 1, MAX_PAGE_SIZE))

    def where(self, *, with_status: bool = True) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if with_status and self.status:
            clauses.append("status = ?")
            args.append(self.status)
        if self.capability:
            clauses.append("list_contains(capabilities, ?)")
            args.append(self.capability)
        if self.label:
            key, eq, value = self.label.partition("=")
            if eq:
                clauses.append("labels->>? = ?")
                args += [key.strip(), value.strip()]
            else:
                clauses.append("json_exists(labels, '$.\"' || ? || '\"')")
                args.append(key.strip())
        if self.agent:
            clauses.append("owner = ?")
            args.append(self.agent)
        if self.parent:
            clauses.append("parent_id = ?")
            args.append(self.parent)
        if self.text:
            clauses.append("(task_id ILIKE ? ESCAPE '\\' OR title ILIKE ? ESCAPE '\\' "
                           "OR body ILIKE ? ESCAPE '\\')")
            # The text is literal: a % or _ typed in the filter matches itself.
            text = (self.text.replace("\\", "\\\\").replace("%", "\\%")
                    .replace("_", "\\_"))
            args += [f"{text}%", f"%{text}%", f"%{text}%"]
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def query_string(self, **changes: Any) -> str:
        from urllib.parse import urlencode

        values = {"status": self.status, "capability": self.capability, "label": self.label,
                  "agent": self.agent, "text": self.text, "parent": self.parent,
                  "sort": self.sort, "page": self.page, "size": self.size, **changes}
        defaults = {"sort": "priority", "page": 1, "size": PAGE_SIZE}
        return urlencode({k: v for k, v in values.items() if v and defaults.get(k) != v})


@dataclass
class Board:
    rows: list[dict[str, Any]]
    total: int  # matching the filter (all statuses when no status filter)
    counts: dict[str, int]  # per status, under the other filters
    page: int
    pages: int
    checkpoint: int
    filter: BoardFilter
    elapsed_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "total": self.total, "counts": self.counts,
                "page": self.page, "pages": self.pages, "size": self.filter.size,
                "checkpoint": self.checkpoint}


def _presence_state(info: Any, holds: bool) -> str:
    from cflow.agents import presence_state

    return presence_state(info, holds)


class Reads:
    """The console's queries, on one ``Swarm``."""

    def __init__(self, swarm: Swarm) -> None:
        from cflow.projections.query import QueryClient

        self.swarm = swarm
        self.client = QueryClient(swarm.nc, swarm.name)

    async def _q(self, sql: str, params: list[Any] | None = None, *, limit: int = 1000,
                 seq: int | None = None) -> QueryResult:
        nc = self.swarm.nc
        if nc.is_reconnecting or nc.is_closed:  # fail now, not after the query's timeout
            raise Unavailable("the console lost its NATS connection (reconnecting); "
                              "the page retries")
        if seq:
            try:
                return await self.client.query(sql, limit=limit, wait_for_seq=seq,
                                               timeout_s=WAIT_FOR_SEQ_S, params=params or ())
            except LimitExceeded:
                pass  # the projector is behind: show what it has, the next event catches up
        return await self.client.query(sql, limit=limit, params=params or ())

    async def board(self, f: BoardFilter, *, seq: int | None = None) -> Board:
        started = time.perf_counter()
        where, args = f.where()
        offset = (f.page - 1) * f.size
        # One round trip: the page, the per-status counts and the total, as a single read.
        base_where, base_args = f.where(with_status=False)
        sql = f"""
            WITH page AS (
                SELECT task_id, title, status, kind, priority, capabilities, labels, owner,
                       attempt, max_attempts, epoch, parent_id, created_at, claimed_at,
                       finished_at, error, depends_on,
                       row_number() OVER (ORDER BY {SORTS[f.sort]}) AS rn
                FROM tasks{where} ORDER BY {SORTS[f.sort]} LIMIT {f.size} OFFSET {offset}
            ), counts AS (
                SELECT status, count(*) AS n FROM tasks{base_where} GROUP BY status
            )
            SELECT 'row' AS part, to_json(page) AS data, NULL AS n FROM page
            UNION ALL
            SELECT 'count', to_json(status), n FROM counts
            UNION ALL
            SELECT 'horizon', to_json(last_event_at), NULL FROM horizon
        """
        result = await self._q(sql, args + base_args, limit=f.size + 100, seq=seq)
        rows: list[dict[str, Any]] = []
        counts: dict[str, int] = {}
        horizon = None
        for part, data, n in result.rows:
            if part == "row":
                rows.append(json.loads(data))
            elif part == "count":
                counts[json.loads(data)] = int(n)
            else:
                horizon = json.loads(data)
        rows.sort(key=lambda r: r["rn"])  # UNION ALL keeps no order of its own
        total = counts.get(f.status, 0) if f.status else sum(counts.values())
        pages = max(1, -(-total // f.size))
        return Board(rows=rows, total=total, counts=counts, page=f.page, pages=pages,
                     checkpoint=result.checkpoint, filter=f,
                     elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
                     extra={"horizon": horizon})

    async def gates(self, *, seq: int | None = None) -> list[dict[str, Any]]:
        """Gates waiting for a human (ready) or for their dependencies (pending)."""
        result = await self._q(
            "SELECT task_id, title, status, status = 'pending' AS waiting_for_deps, parent_id, "
            "depends_on FROM tasks WHERE kind = 'gate' AND status IN ('ready', 'pending') "
            "ORDER BY created_seq", limit=200, seq=seq)
        return result.dicts()

    async def task(self, task_id: str, *, seq: int | None = None) -> dict[str, Any] | None:
        result = await self._q("SELECT * FROM tasks WHERE task_id = ?", [task_id], seq=seq)
        rows = result.dicts()
        if not rows:
            return None
        task = rows[0]
        if isinstance(task.get("labels"), str):
            task["labels"] = json.loads(task["labels"] or "{}")
        timeline = await self._q(
            "SELECT seq, ts, hlc, type, actor, data, refused FROM task_timeline "
            "WHERE task_id = ? ORDER BY seq", [task_id], limit=2000)
        notes = await self._q(
            "SELECT seq, epoch, actor, ts, text, paths, artifact FROM task_notes "
            "WHERE task_id = ? ORDER BY seq", [task_id], limit=1000)
        attempts = await self._q(
            "SELECT attempt, epoch, owner, ready_at, claimed_at, ended_at, outcome, error "
            "FROM task_attempts WHERE task_id = ? ORDER BY epoch", [task_id], limit=1000)
        related = await self._q(
            "SELECT task_id, title, status, 'dependency' AS rel FROM tasks "
            "WHERE list_contains(?, task_id) "
            "UNION ALL SELECT t.task_id, t.title, t.status, 'dependent' FROM task_deps d "
            "JOIN tasks t ON t.task_id = d.task_id WHERE d.depends_on = ? "
            "UNION ALL SELECT task_id, title, status, 'child' FROM tasks WHERE parent_id = ?",
            [list(task.get("depends_on") or []), task_id, task_id], limit=500)
        task["timeline"] = timeline.dicts()
        task["notes"] = notes.dicts()
        task["attempts"] = attempts.dicts()
        task["related"] = related.dicts()
        await self._server_times(task["timeline"])
        return task

    async def _server_times(self, timeline: list[dict[str, Any]]) -> None:
        """Add the server's storage time of each event (JetStream's timestamp)."""
        from cflow.streams.client import StoredEvent

        for item in timeline[-200:]:
            try:
                stored = await self.swarm.log.get(int(item["seq"]))
            except CflowError:  # a purged message leaves the HLC time only
                continue
            if isinstance(stored, StoredEvent) and stored.time_ms:
                item["server_ms"] = stored.time_ms

    async def graph(self, parent: str = "", limit: int = 2000, *, seq: int | None = None
                    ) -> dict[str, Any]:
        """A parent's children, or (no parent) every task in a dependency of the swarm.

        Tasks of the whole swarm that neither wait for nor are waited on by another
        are counted (``unlinked``), not drawn: ten thousand of them would be one
        column, and they are on the board.
        """
        in_dag = ("task_id IN (SELECT task_id FROM task_deps UNION "
                  "SELECT depends_on FROM task_deps)")
        where, args = ("WHERE parent_id = ?", [parent]) if parent else (f"WHERE {in_dag}", [])
        nodes = await self._q(
            f"SELECT task_id, title, status, kind, priority, owner FROM tasks {where} "
            "ORDER BY created_seq", args, limit=limit, seq=seq)
        unlinked = 0
        if not parent:
            count = await self._q(f"SELECT count(*) FROM tasks WHERE NOT ({in_dag})")
            unlinked = int(count.rows[0][0])
        ids = [r[0] for r in nodes.rows]
        edges = await self._q(
            "SELECT task_id, depends_on FROM task_deps "
            "WHERE list_contains(?, task_id) AND list_contains(?, depends_on)",
            [ids, ids], limit=limit * 8)
        from cflow.ui.graph import critical_path

        rows = nodes.dicts()
        pairs = [(str(t), str(d)) for t, d in edges.rows]
        critical = critical_path([(r["task_id"], "", r["status"]) for r in rows], pairs)
        return {"nodes": rows, "edges": [list(e) for e in pairs], "critical": critical,
                "truncated": nodes.truncated, "unlinked": unlinked}

    async def agents(self, *, seq: int | None = None) -> list[dict[str, Any]]:
        util = await self._q("SELECT * FROM agent_utilisation", limit=5000, seq=seq)
        held = await self._q(
            "SELECT owner, list(task_id ORDER BY claimed_at) AS tasks FROM tasks "
            "WHERE status = 'claimed' GROUP BY owner", limit=5000)
        rows = await self._q(
            "SELECT agent_id, name, capabilities, host, runtime, status, last_seen, "
            "tasks_claimed, tasks_completed, tasks_failed FROM agents ORDER BY agent_id",
            limit=5000)
        by_util = {r["agent_id"]: r for r in util.dicts()}
        by_held = {r[0]: list(r[1]) for r in held.rows}
        live = {a.name: a for a in await self.swarm.agents.list()}
        out = []
        for r in rows.dicts():
            info = live.get(r["agent_id"])
            held_ids = by_held.get(r["agent_id"], [])
            # The one definition `cfctl agents` uses: waiting on a human is what a Claude
            # Code session's hooks record, not any reason that mentions waiting.
            status = (_presence_state(info, bool(held_ids)) if info is not None
                      else "dead" if held_ids else "offline")
            u = by_util.get(r["agent_id"], {})
            out.append({**r, "status": status, "held": held_ids,
                        "utilisation": u.get("utilisation"), "busy_s": u.get("busy_s"),
                        "attempts": u.get("attempts", 0)})
        return out

    async def analytics(self, *, seq: int | None = None) -> dict[str, Any]:
        throughput = await self._q("SELECT * FROM throughput_hourly ORDER BY hour DESC",
                                   limit=168, seq=seq)
        minutes = await self._q(
            "SELECT date_trunc('minute', ts) AS hour, "
            "count(*) FILTER (WHERE type = 'TaskCreated') AS created, "
            "count(*) FILTER (WHERE type = 'TaskCompleted') AS completed, "
            "count(*) FILTER (WHERE type = 'TaskFailed' AND (data->>'final')::BOOLEAN) "
            "AS failed FROM events WHERE entity_kind = 'task' "
            "AND ts >= (SELECT last_event_at FROM horizon) - INTERVAL 59 MINUTE "
            "GROUP BY ALL ORDER BY 1", limit=60)
        latency = await self._q(
            "SELECT * FROM latency_stats WHERE dimension IN ('all', 'capability', 'label') "
            "ORDER BY metric, dimension, value", limit=500)
        attempts = await self._q("SELECT * FROM attempt_stats")
        failures = await self._q("SELECT * FROM failure_stats")
        errors = await self._q("SELECT * FROM top_errors LIMIT 10")
        from cflow.gitflow.report import MERGES_SQL  # the figures `cfctl report merges` shows

        merges = (await self._q(MERGES_SQL)).dicts()
        return {"merges": merges[0] if merges and merges[0]["requests"] else None,
                "throughput": list(reversed(throughput.dicts())),
                "per_minute": minutes.dicts(),
                "latency": latency.dicts(),
                "attempts": (attempts.dicts() or [{}])[0],
                "failures": (failures.dicts() or [{}])[0],
                "errors": errors.dicts()}

    async def memory(self, namespace: str = "", page: int = 1, size: int = PAGE_SIZE
                     ) -> dict[str, Any]:
        where, args = ("AND namespace = ?", [namespace]) if namespace else ("", [])
        rows = await self._q(
            "SELECT namespace, key, value, tags, version, updated_at, updated_by, expires_at "
            f"FROM memory WHERE NOT deleted {where} ORDER BY namespace, key "
            f"LIMIT {int(size)} OFFSET {(int(page) - 1) * int(size)}", args, limit=size)
        spaces = await self._q(
            "SELECT namespace, count(*) AS n FROM memory WHERE NOT deleted GROUP BY 1 "
            "ORDER BY 1", limit=1000)
        return {"rows": rows.dicts(), "namespaces": spaces.dicts()}

    async def messages(self, agent: str = "", limit: int = 200) -> dict[str, Any]:
        where, args = ("WHERE \"to\" = ? OR sender = ?", [agent, agent]) if agent else ("", [])
        rows = await self._q(
            "SELECT id, sender, \"to\", topic, text, importance, sent_at, acked_at, acked_by "
            f"FROM messages {where} ORDER BY sent_at DESC", args, limit=limit)
        inboxes = await self._q(
            "SELECT \"to\" AS agent, count(*) AS messages, "
            "count(*) FILTER (WHERE acked_at IS NULL) AS unacked FROM messages "
            "WHERE \"to\" IS NOT NULL GROUP BY 1 ORDER BY 1", limit=1000)
        return {"rows": rows.dicts(), "inboxes": inboxes.dicts()}


__all__ = ["PAGE_SIZE", "STATUS_ORDER", "Board", "BoardFilter", "Reads"]
