"""Fold a batch of stored events into row changes for the DuckDB tables (pure).

Theory of operation
-------------------
The projector applies the stream in batches. For each batch it asks
:func:`keys_of` which rows the batch touches, loads their current values into a
:class:`Snapshot`, asks :func:`agents_of` which agents those tasks involve,
loads those too, then runs :func:`fold_batch`. The result, :class:`Changes`,
holds whole rows in table column order: plain appends (``events``,
``task_deps``, ``task_notes``, ``quarantine``) and upserts of the final value of
every touched keyed row. The adapter writes them and the checkpoint in one
transaction.

Task state follows :mod:`cflow.tasks`, the authoritative state machine: the
transition table is :data:`cflow.tasks.TRANSITIONS` itself, and the field
updates mirror :func:`cflow.tasks.apply` on a mutable row instead of a frozen
dataclass (``dataclasses.replace`` of a 38-field state cost more than the rest
of the projector together). ``tests/test_projection_fold.py`` folds random
histories through both and requires identical rows, so the two cannot drift.
This module also keeps what only a projection wants (attempt rows, per-agent
counters, reclaim and failure counts).

Each event is applied all or nothing: a handler computes every row it will
change and only then are they stored, so an event whose fold is refused
(``InvalidState``, an unexpected payload, a bug) changes nothing but a
``quarantine`` row; the batch goes on. The raw event is still recorded in
``events`` (the audit log is the log), unless it is larger than
``max_event_bytes``. Undecodable messages only ever reach ``quarantine``.

Nothing here reads a clock: times come from the events' HLC wall time, and the
one wall-clock column (``quarantine.seen_at``) is an argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import msgspec

from cflow import events as ev
from cflow import tasks
from cflow.errors import InvalidState
from cflow.projections import schema

if TYPE_CHECKING:
    from cflow.streams.client import BadMessage, StoredEvent

    Item = StoredEvent | BadMessage

Row = dict[str, Any]
EPOCH = datetime(1970, 1, 1)
MS = timedelta(milliseconds=1)
DEFAULT_MAX_EVENT_BYTES = 256 * 1024

_json = msgspec.json.Encoder()


def _retry_at(when: datetime, retry_after_ms: int | None, legacy_ms: int) -> datetime | None:
    """A retry's not-before: a duration from the event (new), or an absolute time (old)."""
    if retry_after_ms is not None:
        return when + timedelta(milliseconds=retry_after_ms) if retry_after_ms else None
    return at(legacy_ms) if legacy_ms else None


def at(ms: int | None) -> datetime | None:
    """Milliseconds since the epoch as a naive UTC datetime (DuckDB ``TIMESTAMP``)."""
    return None if ms is None else EPOCH + ms * MS


def ms_of(value: datetime | None) -> int | None:
    return None if value is None else (value - EPOCH) // MS


def hlc_wall_ms(hlc: str) -> int:
    # The decoder already checked the stamp is 32 hex digits; its first 12 are
    # wall_ms (hlc.Timestamp.parse(hlc).wall_ms, without building the object).
    return int(hlc[:12], 16)


# -------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task's state plus the counters only the projection keeps."""

    state: tasks.TaskState
    reclaims: int = 0
    failures: int = 0


def task_row(rec: TaskRecord) -> tuple[Any, ...]:
    """The ``tasks`` row of a :class:`cflow.tasks.TaskState` (the reference the fold matches)."""
    s = rec.state
    return (
        s.task_id, s.title, s.body, s.status, s.kind, s.priority, list(s.capabilities),
        _json.encode(s.labels).decode(), s.parent_id, list(s.depends_on), s.owner, s.epoch,
        s.attempt,
        s.max_attempts, s.lease_ttl_s, s.retry.initial_s, s.retry.multiplier, s.retry.max_s,
        s.start_to_close_s, s.idempotency_key, s.depth, s.created_by, s.created_seq,
        at(s.created_ms), at(s.ready_ms), at(s.claimed_ms), at(s.deadline_ms),
        at(s.finished_ms) if s.status == "completed" else None, at(s.finished_ms),
        at(s.not_before_ms) if s.not_before_ms else None, s.result, s.error, s.reason,
        s.cost_usd, rec.reclaims, rec.failures, s.events, s.seq,
    )


_ROW_GETTERS = {table: itemgetter(*cols) for table, cols in schema.COLUMNS.items()}


def row_tuple(table: str, row: Row) -> tuple[Any, ...]:
    """A keyed row (a dict) as a tuple in the table's column order."""
    values: tuple[Any, ...] = _ROW_GETTERS[table](row)
    return values


def _new_agent(agent_id: str, when: datetime) -> Row:
    return {
        "agent_id": agent_id, "name": agent_id, "capabilities": [], "labels": "{}", "host": "",
        "pid": None, "runtime": "", "status": "unknown", "registered": False,
        "first_seen": when, "last_seen": when, "current_task": None, "tasks_claimed": 0,
        "tasks_completed": 0, "tasks_failed": 0, "cost_usd": 0.0,
    }


def _new_control(scope: str) -> Row:
    return {
        "scope": scope, "paused": False, "stopped": False, "reason": "", "limits": None,
        "budget_exceeded": None, "breaker_open": False, "breaker_failures": 0,
        "cool_down_s": None, "updated_at": None, "updated_by": None,
    }


# ------------------------------------------------------------------ snapshot


@dataclass
class Keys:
    """The keyed rows a batch may read or write."""

    tasks: set[str] = field(default_factory=set)
    agents: set[str] = field(default_factory=set)
    memory: set[tuple[str, str]] = field(default_factory=set)
    messages: set[str] = field(default_factory=set)
    reservations: set[str] = field(default_factory=set)
    control: set[str] = field(default_factory=set)


@dataclass
class Snapshot:
    """Current rows of the touched keys, as read from the database before the batch."""

    tasks: dict[str, Row] = field(default_factory=dict)
    attempts: dict[tuple[str, int], Row] = field(default_factory=dict)  # running ones
    agents: dict[str, Row] = field(default_factory=dict)
    memory: dict[tuple[str, str], Row] = field(default_factory=dict)
    messages: dict[str, Row] = field(default_factory=dict)
    reservations: dict[str, Row] = field(default_factory=dict)
    control: dict[str, Row] = field(default_factory=dict)
    # Per table, the keys this snapshot looked up: one of them missing above does
    # not exist (the store deletes only keys that exist, or that it did not look up).
    looked_up: dict[str, set[Any]] = field(default_factory=dict)


def keys_of(items: Iterable[Item]) -> Keys:
    keys = Keys()
    for item in items:
        event: ev.Event | None = getattr(item, "event", None)
        if event is None:
            continue
        data = event.data
        kind = event.entity_kind
        if kind == "task":
            keys.tasks.add(event.entity_id)
            if isinstance(data, ev.TaskClaimed):
                keys.agents.add(data.owner)
        elif kind == "agent":
            keys.agents.add(event.entity_id)
        elif isinstance(data, ev.MemoryStored | ev.MemoryDeleted):
            keys.memory.add((data.namespace, data.key))
        elif isinstance(data, ev.MessageSent):
            keys.messages.add(event.entity_id)
        elif isinstance(data, ev.MessageAcked):
            keys.messages.add(data.message_id)
        elif kind == "reservation":
            keys.reservations.add(event.entity_id)
        elif kind == "control":
            keys.control.add(_control_scope(data))
    return keys


def agents_of(loaded: Mapping[str, Row]) -> set[str]:
    """Agents a batch may credit: the current holders of the touched tasks."""
    return {row["owner"] for row in loaded.values() if row["owner"]}


def _control_scope(data: ev.EventData) -> str:
    scope = getattr(data, "scope", "swarm")
    return scope if isinstance(scope, str) else "swarm"


# ------------------------------------------------------------------- changes


@dataclass
class Changes:
    """Rows to write for one batch, in table column order."""

    last_seq: int = 0
    count: int = 0
    appends: dict[str, list[tuple[Any, ...]]] = field(
        default_factory=lambda: {t: [] for t in schema.APPEND_ONLY})
    upserts: dict[str, list[tuple[Any, ...]]] = field(
        default_factory=lambda: {t: [] for t in schema.UPSERTED})
    # The same upserted rows by key, as dicts (the store's row cache keeps them).
    rows: dict[str, dict[Any, Row]] = field(
        default_factory=lambda: {t: {} for t in schema.UPSERTED})
    quarantined: int = 0


# One event's effects, stored only once the whole handler succeeded.
Put = tuple[str, Any, Any]  # (table, key or None for an append, row or record)


class BatchFold:
    """Applies events one by one to a working copy of the snapshot."""

    def __init__(self, snapshot: Snapshot, *, seen_at: datetime,
                 max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.tasks = dict(snapshot.tasks)
        self.attempts = dict(snapshot.attempts)
        self.rows: dict[str, dict[Any, Row]] = {
            "agents": dict(snapshot.agents),
            "memory": dict(snapshot.memory),
            "messages": dict(snapshot.messages),
            "reservations": dict(snapshot.reservations),
            "control": dict(snapshot.control),
        }
        self.dirty: dict[str, set[Any]] = {t: set() for t in schema.UPSERTED}
        self.seen_at = seen_at
        self.max_event_bytes = max_event_bytes
        self.out = Changes()

    # -- driving

    def add(self, item: Item) -> None:
        self.out.last_seq = max(self.out.last_seq, item.seq)
        self.out.count += 1
        event: ev.Event | None = getattr(item, "event", None)
        if event is None:
            raw: bytes = getattr(item, "raw", b"")
            self._quarantine(item.seq, item.subject, raw, getattr(item, "error", "undecodable"))
            return
        data_json = _json.encode(event.data)
        if len(data_json) > self.max_event_bytes:
            self._quarantine(item.seq, item.subject, ev.encode(event),
                             f"event of {len(data_json)} bytes exceeds the "
                             f"{self.max_event_bytes}-byte projection limit")
            return
        ts_ms = hlc_wall_ms(event.hlc)
        when = EPOCH + ts_ms * MS
        self.out.appends["events"].append((
            item.seq, event.id, event.type, event.v, event.swarm, event.entity_kind,
            event.entity_id, event.actor, event.hlc, when, event.causation_id,
            event.correlation_id, data_json.decode(),
        ))
        try:
            puts = self._handle(item.seq, event, ts_ms, when)
        # The projector must never stop on one event: whatever the fold of this
        # event raised (a refused transition, a payload we did not foresee, a bug),
        # it is recorded next to the event and the batch goes on.
        except Exception as exc:
            self._quarantine(item.seq, item.subject, ev.encode(event),
                             f"{type(exc).__name__}: {exc}")
            return
        for table, key, value in puts:
            if key is None:
                self.out.appends[table].append(value)
            elif table == "tasks":
                self.tasks[key] = value
                self.dirty["tasks"].add(key)
            elif table == "task_attempts":
                self.attempts[key] = value
                self.dirty["task_attempts"].add(key)
            else:
                self.rows[table][key] = value
                self.dirty[table].add(key)

    def changes(self, *, rows_only: bool = False) -> Changes:
        """The batch's rows; ``rows_only`` leaves ``upserts`` empty (a replay writes
        keyed rows once, at its end, from ``rows``)."""
        out = self.out
        working: dict[str, dict[Any, Row]] = {
            "tasks": self.tasks, "task_attempts": self.attempts, **self.rows}
        for table, rows in working.items():
            if rows_only:
                out.rows[table] = {k: rows[k] for k in self.dirty[table]}
                continue
            final = {k: rows[k] for k in sorted(self.dirty[table])}
            out.rows[table] = final
            out.upserts[table] = [row_tuple(table, row) for row in final.values()]
        return out

    def _quarantine(self, seq: int, subject: str, raw: bytes, error: str) -> None:
        self.out.appends["quarantine"].append((seq, subject, raw, error[:2000], self.seen_at))
        self.out.quarantined += 1

    # -- handlers: compute every put, store nothing

    def _handle(self, seq: int, event: ev.Event, ts_ms: int, when: datetime) -> list[Put]:
        kind = event.entity_kind
        if kind == "task":
            return self._task(seq, event, when)
        if kind == "agent":
            return self._agent_event(event, when)
        match event.data:
            case ev.TaskNoted() as d:
                return [("task_notes", None, (seq, d.task_id, d.epoch, event.actor, when, d.text,
                                              list(d.paths), d.artifact))]
            case ev.MemoryStored() as d:
                old = self.rows["memory"].get((d.namespace, d.key))
                version = d.version or ((old["version"] if old else 0) + 1)
                expires = when + timedelta(seconds=d.ttl_s) if d.ttl_s else None
                row = {"namespace": d.namespace, "key": d.key, "value": d.value,
                       "content_type": d.content_type, "tags": list(d.tags), "version": version,
                       "updated_at": when, "expires_at": expires, "updated_by": event.actor,
                       "deleted": False, "metadata": _json.encode(d.metadata).decode(),
                       "last_seq": seq}
                return [("memory", (d.namespace, d.key), row)]
            case ev.MemoryDeleted() as d:
                old = self.rows["memory"].get((d.namespace, d.key))
                base = dict(old) if old else {
                    "namespace": d.namespace, "key": d.key, "value": None,
                    "content_type": "text", "tags": [], "version": 0, "expires_at": None,
                    "metadata": "{}"}
                base.update(deleted=True, updated_at=when, updated_by=event.actor,
                            version=d.version or base["version"] + 1, last_seq=seq)
                return [("memory", (d.namespace, d.key), base)]
            case ev.MessageSent() as d:
                old = self.rows["messages"].get(event.entity_id)
                row = {"id": event.entity_id, "sender": event.actor, "to": d.to,
                       "topic": d.topic, "text": d.text, "thread_id": d.thread_id,
                       "reply_to": d.reply_to, "importance": d.importance,
                       "ack_required": d.ack_required, "sent_at": when,
                       "acked_at": old["acked_at"] if old else None,
                       "acked_by": old["acked_by"] if old else None}
                return [("messages", event.entity_id, row)]
            case ev.MessageAcked() as d:
                # The message itself may live only on the messages stream: keep a stub.
                old = self.rows["messages"].get(d.message_id)
                row = dict(old) if old else {
                    "id": d.message_id, "sender": None, "to": None, "topic": None,
                    "text": None, "thread_id": None, "reply_to": None, "importance": None,
                    "ack_required": None, "sent_at": None}
                row.update(acked_at=when, acked_by=d.by)
                return [("messages", d.message_id, row)]
            case ev.PathsReserved() as d:
                row = {"reservation_id": event.entity_id, "owner": d.owner,
                       "paths": list(d.paths), "exclusive": d.exclusive, "task_id": d.task_id,
                       "epoch": d.epoch, "reserved_at": when,
                       "expires_at": when + timedelta(seconds=d.ttl_s), "released_at": None,
                       "status": "held"}
                return [("reservations", event.entity_id, row)]
            case ev.PathsReleased() as d:
                old = self.rows["reservations"].get(event.entity_id)
                row = dict(old) if old else {
                    "reservation_id": event.entity_id, "owner": d.owner, "paths": [],
                    "exclusive": None, "task_id": None, "epoch": None, "reserved_at": None,
                    "expires_at": None}
                row.update(released_at=when, status="released")
                return [("reservations", event.entity_id, row)]
        if kind == "control":
            return self._control(event, when)
        if kind == "merge":  # merge queue analytics are SQL over `events` (cflow.gitflow)
            return []
        raise ValueError(f"no projection for {event.type} on entity kind {kind}")

    def _task(self, seq: int, event: ev.Event, when: datetime) -> list[Put]:
        task_id = event.entity_id
        before = self.tasks.get(task_id)
        row = _task_step(before, event, seq, when)
        puts: list[Put] = []
        data = event.data
        if before is None:
            assert isinstance(data, ev.TaskCreated)
            puts += [("task_deps", None, (task_id, dep)) for dep in data.depends_on]
        elif isinstance(data, ev.TaskClaimed):
            waits = [t for t in (before["ready_at"], before["not_before"]) if t is not None]
            puts.append(("task_attempts", (task_id, seq), {
                "task_id": task_id, "epoch": seq, "attempt": data.attempt, "owner": data.owner,
                "ready_at": max(waits) if waits else None, "claimed_at": when,
                "ended_at": None, "outcome": "running", "error": None, "cost_usd": None}))
            agent = self._agent_row(data.owner, when)
            agent["tasks_claimed"] += 1
            agent["current_task"] = task_id
            if when > agent["last_seen"]:
                agent["last_seen"] = when
            puts.append(("agents", data.owner, agent))
        elif before["status"] == "claimed" and (outcome := _ENDINGS.get(type(data))):
            running = self.attempts.get((task_id, before["epoch"]))
            cost = getattr(data, "cost_usd", None)
            if running is not None:
                error = getattr(data, "error", None) or (
                    getattr(data, "reason", None) if outcome == "expired" else None)
                ended = dict(running)
                ended.update(ended_at=when, outcome=outcome, error=error, cost_usd=cost)
                puts.append(("task_attempts", (task_id, before["epoch"]), ended))
            if before["owner"]:
                agent = self._agent_row(before["owner"], when)
                if when > agent["last_seen"]:
                    agent["last_seen"] = when
                if agent["current_task"] == task_id:
                    agent["current_task"] = None
                if outcome == "completed":
                    agent["tasks_completed"] += 1
                elif outcome == "failed":
                    agent["tasks_failed"] += 1
                if cost:
                    agent["cost_usd"] = (agent["cost_usd"] or 0.0) + cost
                puts.append(("agents", before["owner"], agent))
        puts.append(("tasks", task_id, row))
        return puts

    def _agent_row(self, agent_id: str, when: datetime) -> Row:
        old = self.rows["agents"].get(agent_id)
        return dict(old) if old else _new_agent(agent_id, when)

    def _agent_event(self, event: ev.Event, when: datetime) -> list[Put]:
        agent = self._agent_row(event.entity_id, when)
        agent["last_seen"] = max(agent["last_seen"], when)
        match event.data:
            case ev.AgentRegistered() as d:
                agent.update(name=d.name, capabilities=list(d.capabilities),
                             labels=_json.encode(d.labels).decode(), host=d.host, pid=d.pid,
                             runtime=d.runtime,
                             status="online", registered=True)
            case ev.AgentStatusChanged() as d:
                agent.update(status=d.status, current_task=d.task_id)
            case ev.AgentDeregistered():
                agent.update(status="offline", current_task=None)
            case _:
                raise ValueError(f"no projection for {event.type} on an agent")
        return [("agents", event.entity_id, agent)]

    def _control(self, event: ev.Event, when: datetime) -> list[Put]:
        scope = _control_scope(event.data)
        old = self.rows["control"].get(scope)
        row = dict(old) if old else _new_control(scope)
        row.update(updated_at=when, updated_by=event.actor)
        match event.data:
            case ev.SwarmPaused() as d:
                row.update(paused=True, reason=d.reason)
            case ev.SwarmResumed() as d:
                row.update(paused=False, reason=d.reason)
            case ev.SwarmStopped() as d:
                row.update(stopped=True, reason=d.reason)
            case ev.BudgetSet() as d:
                row.update(limits=_json.encode(d.limits).decode(), budget_exceeded=None)
            case ev.BudgetExceeded() as d:
                row.update(budget_exceeded=d.budget)
            case ev.BreakerOpened() as d:
                row.update(breaker_open=True, breaker_failures=d.failures,
                           cool_down_s=d.cool_down_s)
            case ev.BreakerClosed():
                row.update(breaker_open=False)
            case _:
                raise ValueError(f"no projection for {event.type} on control")
        return [("control", scope, row)]


def _refused(task_id: str, status: str | None, event: ev.Event, detail: str = "") -> InvalidState:
    state = status or "absent"
    text = f"task {task_id}: {event.type} not allowed when {state}"
    return InvalidState(text + (f" ({detail})" if detail else ""), task_id=task_id,
                        status=state, event_type=event.type)


def _add_cost(total: float | None, more: float | None) -> float | None:
    return total if more is None else (total or 0.0) + more


def _task_step(before: Row | None, event: ev.Event, seq: int, when: datetime) -> Row:
    """One event on a task row: :func:`cflow.tasks.apply` on the ``tasks`` columns."""
    status = before["status"] if before is not None else None
    if (status, event.type) not in tasks.TRANSITIONS:
        raise _refused(event.entity_id, status, event)
    data = event.data
    if before is None:
        assert isinstance(data, ev.TaskCreated)
        ready = not data.depends_on
        return {
            "task_id": event.entity_id, "title": data.title, "body": data.body,
            "status": "ready" if ready else "pending", "kind": data.kind,
            "priority": data.priority, "capabilities": sorted(set(data.capabilities)),
            "labels": _json.encode(data.labels).decode(), "parent_id": data.parent_id,
            "depends_on": list(data.depends_on), "owner": None, "epoch": 0, "attempt": 0,
            "max_attempts": data.max_attempts, "lease_ttl_s": data.lease_ttl_s,
            "backoff_initial_s": data.backoff_initial_s,
            "backoff_multiplier": data.backoff_multiplier, "backoff_max_s": data.backoff_max_s,
            "start_to_close_s": data.start_to_close_s, "idempotency_key": data.idempotency_key,
            "depth": data.depth, "created_by": event.actor, "created_seq": seq,
            "created_at": when, "ready_at": when if ready else None, "claimed_at": None,
            "deadline_at": None, "completed_at": None, "finished_at": None, "not_before": None,
            "result": None, "error": None, "reason": None, "cost_usd": None, "reclaims": 0,
            "failures": 0, "events": 1, "last_seq": seq,
        }
    if status == "ready" and before["kind"] != "gate" and isinstance(
            data, ev.TaskCompleted | ev.TaskFailed):
        raise _refused(event.entity_id, status, event)  # only a gate, by a human
    if isinstance(data, ev.TaskCompleted | ev.TaskFailed | ev.TaskReleased
                  | ev.TaskLeaseExpired):
        expected = before["epoch"] if status in ("claimed", "expired") else 0
        if data.epoch != expected:
            raise InvalidState(f"task {event.entity_id}: {event.type} for epoch {data.epoch}, "
                               f"current is {expected}", task_id=event.entity_id,
                               epoch=data.epoch)
    row = dict(before)
    row["last_seq"] = seq
    row["events"] += 1
    match data:
        case ev.TaskReady():
            row.update(status="ready", ready_at=when, reason=None)
        case ev.TaskBlocked():
            row.update(status="blocked", reason=data.reason)
        case ev.TaskClaimed():
            start_to_close = row.get("start_to_close_s")
            # Server time of the claim plus the timeout (the writer's clock decides nothing).
            deadline = when + timedelta(seconds=start_to_close) if start_to_close else None
            row.update(status="claimed", owner=data.owner, attempt=data.attempt, epoch=seq,
                       claimed_at=when, deadline_at=deadline, not_before=None)
        case ev.TaskCompleted():
            row.update(status="completed", result=data.result, finished_at=when,
                       completed_at=when, cost_usd=_add_cost(row["cost_usd"], data.cost_usd))
        case ev.TaskFailed():
            row["failures"] += 1
            row.update(error=data.error, cost_usd=_add_cost(row["cost_usd"], data.cost_usd))
            # The transition table decides, as in tasks.apply: after an expiry a
            # failure is final whatever its payload says.
            if data.final or tasks.TRANSITIONS[(status, event.type)] == "failed":
                row.update(status="failed", finished_at=when)
            else:
                row.update(status="ready", owner=None, ready_at=when,
                           not_before=_retry_at(when, data.retry_after_ms, data.not_before_ms))
        case ev.TaskReleased():
            row.update(status="ready", owner=None, attempt=max(0, row["attempt"] - 1),
                       ready_at=when, reason=data.reason or None)
        case ev.TaskLeaseExpired():
            row["reclaims"] += 1
            attempt = max(0, row["attempt"] - 1) if data.refund else row["attempt"]
            row.update(status="expired", reason=data.reason, attempt=attempt)
        case ev.TaskRequeued():
            row.update(status="ready", owner=None, ready_at=when, reason=data.reason or None,
                       not_before=_retry_at(when, data.retry_after_ms, data.not_before_ms))
        case ev.TaskCancelled():
            row.update(status="cancelled", reason=data.reason, finished_at=when)
        case _:
            raise _refused(event.entity_id, status, event)
    return row


_ENDINGS: dict[type[ev.EventData], str] = {
    ev.TaskCompleted: "completed",
    ev.TaskFailed: "failed",
    ev.TaskReleased: "released",
    ev.TaskLeaseExpired: "expired",
    ev.TaskCancelled: "cancelled",
}


def fold_batch(items: Sequence[Item], snapshot: Snapshot, *, seen_at: datetime,
               max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
               rows_only: bool = False) -> Changes:
    """Fold ``items`` (in stream order) over ``snapshot``; return the rows to write."""
    batch = BatchFold(snapshot, seen_at=seen_at, max_event_bytes=max_event_bytes)
    for item in items:
        batch.add(item)
    return batch.changes(rows_only=rows_only)


__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "BatchFold",
    "Changes",
    "Keys",
    "Snapshot",
    "TaskRecord",
    "agents_of",
    "at",
    "fold_batch",
    "hlc_wall_ms",
    "keys_of",
    "ms_of",
    "row_tuple",
    "task_row",
]
