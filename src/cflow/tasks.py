"""Task state machine, retry policy and DAG readiness (pure: no I/O, no clock).

Theory of operation
-------------------
A task's events live on one subject; folding them in order with :func:`apply`
gives its :class:`TaskState`. :data:`TRANSITIONS` is the whole state machine:
``(status, event type) -> new status``; any other pair is refused with
``InvalidState``. Events that carry an epoch must carry the current one.

The claim of record is the ``TaskClaimed`` event: its stream sequence is the
**epoch** (fencing token). While a task is ``claimed`` nothing else may be
appended to its subject except by the holder (complete/fail/release, expected =
epoch), a reaper (``TaskLeaseExpired``, expected = epoch) or a canceller. So the
holder's write and the reaper's write race on one compare-and-set and exactly
one wins.

``TaskBoard`` keeps the states of a whole swarm, indexes ready work by
(priority desc, age) and dependents by dependency, and computes the idempotent
*maintenance actions* any node may carry out: mark ready, mark blocked, requeue
or fail an expired claim. The adapter executes them with deterministic Msg-Ids
and expected sequences, so several nodes doing the same action do it once.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import msgspec

from cflow import events as ev
from cflow.errors import DependencyError, InvalidInput, InvalidState
from cflow.hlc import Timestamp

Status = Literal[
    "pending", "ready", "claimed", "expired", "completed", "failed", "blocked", "cancelled"
]
STATUSES: tuple[Status, ...] = (
    "pending", "ready", "claimed", "expired", "completed", "failed", "blocked", "cancelled"
)
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

MIN_LEASE_TTL_S = 1.0

# (status before, event type) -> status after. Entries ending in "?" depend on the
# event's payload and are resolved in `apply`.
TRANSITIONS: dict[tuple[str | None, str], str] = {
    (None, "TaskCreated"): "pending|ready",
    ("pending", "TaskReady"): "ready",
    ("pending", "TaskBlocked"): "blocked",
    ("pending", "TaskCancelled"): "cancelled",
    ("ready", "TaskClaimed"): "claimed",
    ("ready", "TaskCancelled"): "cancelled",
    ("ready", "TaskCompleted"): "completed",  # a gate approved by a human (epoch 0)
    ("ready", "TaskFailed"): "failed|ready",  # a gate rejected by a human (epoch 0)
    ("ready", "TaskBlocked"): "blocked",
    ("claimed", "TaskCompleted"): "completed",
    ("claimed", "TaskFailed"): "failed|ready",
    ("claimed", "TaskReleased"): "ready",
    ("claimed", "TaskLeaseExpired"): "expired",
    ("claimed", "TaskCancelled"): "cancelled",
    ("expired", "TaskRequeued"): "ready",
    ("expired", "TaskFailed"): "failed",
    ("expired", "TaskCancelled"): "cancelled",
    ("blocked", "TaskCancelled"): "cancelled",
}


# msgspec Structs, not dataclasses: a dataclass costs some 3 ms of every cold start
# to define here (its methods are generated and compiled), a Struct a tenth (issue 18).
class RetryPolicy(msgspec.Struct, frozen=True):
    """Temporal-style retry: delay = min(max, initial * multiplier ** (attempt - 1))."""

    initial_s: float = 1.0
    multiplier: float = 2.0
    max_s: float = 60.0

    def delay_s(self, attempt: int) -> float:
        if attempt < 1:
            return 0.0
        return float(min(self.max_s, self.initial_s * self.multiplier ** (attempt - 1)))


class TaskState(msgspec.Struct, frozen=True):
    task_id: str
    title: str
    status: Status
    seq: int  # last stream sequence on the task's subject (the next expected value)
    created_seq: int
    created_ms: int
    body: str = ""
    priority: int = 0
    capabilities: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    parent_id: str | None = None
    kind: str = "task"
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    lease_ttl_s: float = 30.0
    max_attempts: int = 3
    retry: RetryPolicy = RetryPolicy()
    start_to_close_s: float | None = None
    idempotency_key: str | None = None
    depth: int = 0
    created_by: str = ""
    attempt: int = 0  # attempts used (claims that counted)
    epoch: int = 0  # sequence of the current/last claim
    owner: str | None = None
    ready_ms: int | None = None
    claimed_ms: int | None = None
    deadline_ms: int | None = None
    finished_ms: int | None = None
    not_before_ms: int = 0
    result: str | None = None
    error: str | None = None
    reason: str | None = None
    cost_usd: float | None = None
    events: int = 0
    hlc: str = ""  # stamp of the last event: a new event on the task is stamped after it
    lease_key: str = ""  # key of the current/last claim's lease in the leases bucket

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def attempts_left(self) -> int:
        return max(0, self.max_attempts - self.attempt)

    def claimable_by(self, capabilities: Iterable[str], now_ms: int) -> bool:
        return (
            self.status == "ready"
            and self.kind == "task"
            and self.not_before_ms <= now_ms
            and set(self.capabilities) <= set(capabilities)
        )

    def to_dict(self) -> dict[str, object]:
        out = {name: getattr(self, name) for name in self.__struct_fields__}
        out["retry"] = {
            "initial_s": self.retry.initial_s,
            "multiplier": self.retry.multiplier,
            "max_s": self.retry.max_s,
        }
        return out


def validate_create(data: ev.TaskCreated) -> None:
    """Refuse options that make no sense before anything is written."""
    if not data.title.strip():
        raise InvalidInput("a task needs a non-empty title")
    if data.lease_ttl_s < MIN_LEASE_TTL_S:
        raise InvalidInput(f"lease TTL must be at least {MIN_LEASE_TTL_S:g} s")
    if data.max_attempts < 1:
        raise InvalidInput("max attempts must be at least 1")
    if data.backoff_initial_s < 0 or data.backoff_max_s < 0 or data.backoff_multiplier < 1:
        raise InvalidInput("backoff needs initial >= 0, max >= 0 and multiplier >= 1")
    if data.start_to_close_s is not None and data.start_to_close_s <= 0:
        raise InvalidInput("start-to-close timeout must be > 0")
    if len(set(data.depends_on)) != len(data.depends_on):
        raise InvalidInput("duplicate dependency")


def event_ms(event: ev.Event) -> int:
    return Timestamp.parse(event.hlc).wall_ms


def ends_task(data: ev.EventData) -> bool:
    """Whether an event ends its task for good: it leads to a :data:`TERMINAL` status.

    ``TaskCompleted``, a final ``TaskFailed`` (no retry left, a reaper's after the
    last attempt, a rejected gate) and ``TaskCancelled``. The one definition of "task
    ended" that followers of the task events (reservations, control) share. Pure.
    """
    return isinstance(data, ev.TaskCompleted | ev.TaskCancelled) or (
        isinstance(data, ev.TaskFailed) and data.final)


def declared_paths(labels: Mapping[str, str]) -> list[str]:
    """The paths a task declares it will touch: its label ``paths``, comma-separated.

    Here, not in :mod:`cflow.reservations`: a claim asks every task, and a command that
    claims or adds a task without paths then never imports the reservations (issue 18).
    """
    return [p.strip() for p in labels.get("paths", "").split(",") if p.strip()]


def _refuse(state: TaskState | None, event: ev.Event) -> InvalidState:
    status = state.status if state else "absent"
    ident = state.task_id if state else event.entity_id
    return InvalidState(f"task {ident}: {event.type} not allowed when {status}",
                        task_id=ident, status=status, event_type=event.type)


_HOLDER_EVENTS = (ev.TaskCompleted, ev.TaskFailed, ev.TaskReleased, ev.TaskLeaseExpired)


def _target(rule: str, state: TaskState | None, data: ev.EventData) -> Status:
    """The status a table entry leads to; "a|b" entries are decided by the payload."""
    match rule, data:
        case "pending|ready", ev.TaskCreated(depends_on=deps):
            return "pending" if deps else "ready"
        case "failed|ready", ev.TaskFailed(final=final):
            return "failed" if final else "ready"
    assert rule in STATUSES, rule
    return rule


def _retry_at(at: int, retry_after_ms: int | None, legacy_not_before_ms: int) -> int:
    """When a failed or requeued task is claimable again, in server time.

    New events carry a duration from their own server timestamp; old ones an
    absolute time on the writer's wall clock, which is all there is for them.
    """
    return at + retry_after_ms if retry_after_ms is not None else legacy_not_before_ms


def apply(state: TaskState | None, event: ev.Event, seq: int,
          at_ms: int | None = None) -> TaskState:
    """Fold one event (stored at ``seq``, at server time ``at_ms``) into a task's state. Pure.

    :data:`TRANSITIONS` decides whether the step is allowed and which status
    follows; the event's payload fills in the rest. Without the server's
    timestamp (a write folded locally before it is read back), the event's HLC
    stands in for it.
    """
    rule = TRANSITIONS.get((state.status if state else None, event.type))
    if rule is None:
        raise _refuse(state, event)
    at = at_ms or event_ms(event)
    data = event.data
    status = _target(rule, state, data)
    if state is None:
        assert isinstance(data, ev.TaskCreated)
        return TaskState(
            task_id=event.entity_id,
            title=data.title,
            status=status,
            seq=seq,
            created_seq=seq,
            created_ms=at,
            body=data.body,
            priority=data.priority,
            capabilities=tuple(sorted(set(data.capabilities))),
            depends_on=tuple(data.depends_on),
            parent_id=data.parent_id,
            kind=data.kind,
            labels=dict(data.labels),
            lease_ttl_s=data.lease_ttl_s,
            max_attempts=data.max_attempts,
            retry=RetryPolicy(data.backoff_initial_s, data.backoff_multiplier, data.backoff_max_s),
            start_to_close_s=data.start_to_close_s,
            idempotency_key=data.idempotency_key,
            depth=data.depth,
            created_by=event.actor,
            ready_ms=at if status == "ready" else None,
            events=1,
            hlc=event.hlc,
        )
    if state.status == "ready" and state.kind != "gate" and isinstance(
            data, ev.TaskCompleted | ev.TaskFailed):
        raise _refuse(state, event)  # only a human decides a gate without claiming it
    if isinstance(data, _HOLDER_EVENTS):
        expected_epoch = state.epoch if state.status in ("claimed", "expired") else 0
        if data.epoch != expected_epoch:
            raise InvalidState(
                f"task {state.task_id}: {event.type} for epoch {data.epoch}, current is "
                f"{expected_epoch}", task_id=state.task_id, epoch=data.epoch,
            )
    changes = _changes(state, data, status, seq, at)
    if changes is None:
        raise _refuse(state, event)
    return msgspec.structs.replace(state, status=status, seq=seq, events=state.events + 1,
                                   hlc=event.hlc, **changes)


def _changes(state: TaskState, data: ev.EventData, status: Status, seq: int,
             at: int) -> dict[str, Any] | None:
    """The fields an allowed event changes besides status, sequence and HLC."""
    match data:
        case ev.TaskReady():
            return {"ready_ms": at, "reason": None}
        case ev.TaskBlocked(reason=reason):
            return {"reason": reason}
        case ev.TaskClaimed(owner=owner, attempt=attempt, lease=lease):
            deadline = at + int(state.start_to_close_s * 1000) if state.start_to_close_s else None
            return {"owner": owner, "attempt": attempt, "epoch": seq, "claimed_ms": at,
                    "deadline_ms": deadline, "not_before_ms": 0,
                    "lease_key": f"{state.task_id}.{lease or seq}"}
        case ev.TaskCompleted(result=result, cost_usd=cost):
            return {"result": result, "finished_ms": at, "cost_usd": _add(state.cost_usd, cost)}
        case ev.TaskFailed(error=error, cost_usd=cost):
            cost_total = _add(state.cost_usd, cost)
            if status == "failed":
                return {"error": error, "finished_ms": at, "cost_usd": cost_total}
            return {"error": error, "owner": None, "ready_ms": at, "cost_usd": cost_total,
                    "not_before_ms": _retry_at(at, data.retry_after_ms, data.not_before_ms)}
        case ev.TaskReleased(reason=reason):
            # A voluntary release gives the attempt back.
            return {"owner": None, "attempt": max(0, state.attempt - 1), "ready_ms": at,
                    "reason": reason or None}
        case ev.TaskLeaseExpired(reason=reason, refund=refund):
            # A claim that never got a lease never ran: its attempt is given back.
            return {"reason": reason,
                    "attempt": max(0, state.attempt - 1) if refund else state.attempt}
        case ev.TaskRequeued(reason=reason):
            return {"owner": None, "ready_ms": at, "reason": reason or None,
                    "not_before_ms": _retry_at(at, data.retry_after_ms, data.not_before_ms)}
        case ev.TaskCancelled(reason=reason):
            return {"reason": reason, "finished_ms": at}
    return None


def _add(total: float | None, more: float | None) -> float | None:
    if more is None:
        return total
    return (total or 0.0) + more


def fold(items: Iterable[tuple[int, ev.Event] | tuple[int, ev.Event, int | None]]
         ) -> TaskState | None:
    """Fold ``(seq, event)`` or ``(seq, event, server_ms)`` items in stream order."""
    state: TaskState | None = None
    for seq, event, *at in items:
        state = apply(state, event, seq, at[0] if at else None)
    return state


def failure_outcome(state: TaskState, *, retry: bool) -> tuple[bool, int]:
    """(final, retry_after_ms) for a failed attempt under the retry policy.

    The delay is a duration: readers add it to the failure event's server time.
    """
    if not retry or state.attempt >= state.max_attempts:
        return True, 0
    return False, int(state.retry.delay_s(state.attempt) * 1000)


def check_acyclic(edges: dict[str, tuple[str, ...]]) -> None:
    """Refuse a dependency graph with a cycle (iterative DFS, white/grey/black)."""
    colour: dict[str, int] = {}
    for root in edges:
        if colour.get(root):
            continue
        stack: list[tuple[str, Iterator[str]]] = [(root, iter(edges.get(root, ())))]
        colour[root] = 1
        path = [root]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
                continue
            mark = colour.get(child, 0)
            if mark == 1:
                cycle = [*path[path.index(child):], child]
                raise DependencyError("dependency cycle: " + " -> ".join(cycle), cycle=cycle)
            if mark == 0:
                colour[child] = 1
                path.append(child)
                stack.append((child, iter(edges.get(child, ()))))


# ----------------------------------------------------------------------- the board


class Action(msgspec.Struct, frozen=True):
    """A maintenance step any node may take; idempotent by ``msg_id``."""

    kind: Literal["ready", "blocked", "requeue", "fail"]
    task_id: str
    expected: int
    msg_id: str
    reason: str = ""
    blocked_by: str | None = None


class TaskBoard:
    """All tasks of one swarm, folded from its task events, with a ready index."""

    def __init__(self) -> None:
        self.tasks: dict[str, TaskState] = {}
        self.dependents: dict[str, set[str]] = {}
        self.last_seq = 0
        self.rejected = 0
        self._ready: list[tuple[int, int, str]] = []  # (-priority, created_seq, id)

    def _ready_key(self, state: TaskState) -> tuple[int, int, str]:
        return (-state.priority, state.created_seq, state.task_id)

    def _unindex(self, state: TaskState) -> None:
        if state.status == "ready":
            key = self._ready_key(state)
            i = bisect.bisect_left(self._ready, key)
            if i < len(self._ready) and self._ready[i] == key:
                del self._ready[i]

    def apply(self, seq: int, event: ev.Event, at_ms: int | None = None) -> TaskState | None:
        """Fold one task event; an event the machine refuses is counted, not raised."""
        if event.entity_kind != "task":
            return None
        self.last_seq = max(self.last_seq, seq)
        before = self.tasks.get(event.entity_id)
        if before is not None and seq <= before.seq:
            return before  # already applied (replay overlap)
        try:
            after = apply(before, event, seq, at_ms)
        except InvalidState:
            self.rejected += 1
            return before
        if before is not None:
            self._unindex(before)
        else:
            for dep in after.depends_on:
                self.dependents.setdefault(dep, set()).add(after.task_id)
        self.tasks[after.task_id] = after
        if after.status == "ready":
            bisect.insort(self._ready, self._ready_key(after))
        return after

    def get(self, task_id: str) -> TaskState | None:
        return self.tasks.get(task_id)

    def candidates(self, capabilities: Iterable[str], now_ms: int) -> Iterator[TaskState]:
        """Claimable tasks for an agent, best first (priority, then age)."""
        caps = set(capabilities)
        for _, _, task_id in list(self._ready):
            state = self.tasks[task_id]
            if state.claimable_by(caps, now_ms):
                yield state

    def ready_count(self) -> int:
        return len(self._ready)

    def ready(self) -> Iterator[TaskState]:
        """Ready tasks, best first (priority, then age), whatever their backoff."""
        for _, _, task_id in list(self._ready):
            yield self.tasks[task_id]

    def next_not_before(self, now_ms: int) -> int | None:
        """Earliest future ``not_before`` among ready tasks (for a wake-up timer)."""
        future = [self.tasks[t].not_before_ms for _, _, t in self._ready
                  if self.tasks[t].not_before_ms > now_ms]
        return min(future) if future else None

    def readiness(self, state: TaskState) -> Action | None:
        """Whether a pending task should become ready or blocked now."""
        if state.status != "pending":
            return None
        for dep in state.depends_on:
            dep_state = self.tasks.get(dep)
            if dep_state is None:
                return None  # not seen yet; its creation event will re-trigger us
            if dep_state.status in ("failed", "cancelled", "blocked"):
                return Action("blocked", state.task_id, state.seq, f"blocked-{state.task_id}",
                              reason=f"dependency {dep} {dep_state.status}", blocked_by=dep)
        if all(self.tasks[d].status == "completed" for d in state.depends_on):
            return Action("ready", state.task_id, state.seq, f"ready-{state.task_id}")
        return None

    def after_expiry(self, state: TaskState) -> Action | None:
        """Requeue (or fail, attempts exhausted) a task whose claim expired.

        The requeued task is claimable at once: its lease TTL was the wait. The
        Msg-Ids are a reaper's own (``reaped-...``): a holder's write on the same
        epoch never shares one.
        """
        if state.status != "expired":
            return None
        final, _ = failure_outcome(state, retry=True)
        kind: Literal["requeue", "fail"] = "fail" if final else "requeue"
        return Action(kind, state.task_id, state.seq,
                      f"reaped-{kind}-{state.task_id}-{state.epoch}",
                      reason=state.reason or "lease expired")

    def actions_for(self, task_id: str) -> list[Action]:
        """Maintenance the change of ``task_id`` calls for: itself and its dependents."""
        out: list[Action] = []
        state = self.tasks.get(task_id)
        if state is None:
            return out
        for action in (self.readiness(state), self.after_expiry(state)):
            if action:
                out.append(action)
        if state.status in ("completed", "failed", "cancelled", "blocked"):
            for dep_id in sorted(self.dependents.get(task_id, ())):
                action = self.readiness(self.tasks[dep_id]) if dep_id in self.tasks else None
                if action:
                    out.append(action)
        return out

    def sweep(self) -> list[Action]:
        """Every pending maintenance action of the whole board (after a catch-up)."""
        out: list[Action] = []
        for state in self.tasks.values():
            for action in (self.readiness(state), self.after_expiry(state)):
                if action:
                    out.append(action)
        return out

    def claimed(self) -> Iterator[TaskState]:
        return (s for s in self.tasks.values() if s.status == "claimed")

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = dict.fromkeys(STATUSES, 0)
        for state in self.tasks.values():
            out[state.status] += 1
        return out

    def check_new_dependencies(self, task_id: str, depends_on: Iterable[str]) -> None:
        """Refuse unknown dependencies and cycles before creating ``task_id``."""
        deps = tuple(depends_on)
        if task_id in deps:
            raise DependencyError(f"task {task_id} cannot depend on itself")
        unknown = [d for d in deps if d not in self.tasks]
        if unknown:
            raise DependencyError(f"unknown dependency: {', '.join(unknown)}", unknown=unknown)
        edges = {tid: s.depends_on for tid, s in self.tasks.items()}
        edges[task_id] = deps
        check_acyclic(edges)
