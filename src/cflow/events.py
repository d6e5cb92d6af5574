"""Event envelope, event types, schema versions and upcasters.

An event on the wire is one JSON object::

    {"id": "<uuidv7>", "type": "TaskClaimed", "v": 1, "swarm": "default",
     "entity_kind": "task", "entity_id": "<task id>", "hlc": "<32 hex>",
     "actor": "agent-a", "causation_id": null, "correlation_id": null,
     "data": {...}}

``data`` is one of the frozen, keyword-only ``EventData`` structs below, chosen
by ``type``. Decoding is two-step: the envelope with ``data`` left raw, then the
data struct for ``type`` after running the upcaster chain from the stored ``v``
to the current one. Unknown fields are ignored (msgspec's default), so adding a
field with a default never needs a version bump; changing a shape does.

Contract of :func:`decode`: for any bytes it returns an ``Event`` or raises
``MalformedEvent``; nothing else escapes.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from cflow.errors import InvalidInput, MalformedEvent

# Entity ids and swarm names become NATS subject tokens and KV keys.
TOKEN_PATTERN = r"^[A-Za-z0-9_\-]{1,128}$"  # noqa: S105 - a regex, not a secret
_TOKEN_RE = re.compile(TOKEN_PATTERN)
Token = Annotated[str, msgspec.Meta(pattern=TOKEN_PATTERN)]
HlcText = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]


def check_token(value: str, what: str) -> str:
    """Refuse a swarm name / entity id that is not a safe subject token."""
    if not _TOKEN_RE.match(value):
        raise InvalidInput(
            f"{what} {value!r} must be 1-128 characters of letters, digits, '-' or '_'"
        )
    return value


def uuid7(unix_ms: int, rand: bytes) -> str:
    """A UUIDv7 string from a millisecond timestamp and 10 random bytes (pure)."""
    if len(rand) != 10:
        raise InvalidInput("uuid7 needs 10 random bytes")
    value = (unix_ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= (int.from_bytes(rand[:2], "big") & 0x0FFF) << 64
    value |= 0b10 << 62
    value |= int.from_bytes(rand[2:], "big") & ((1 << 62) - 1)
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


_INTENT_NAMESPACE = uuid.UUID("3f0c2a3e-5b7d-4c1e-8f26-9d4b0a7c6e15")


def intent_id(swarm: str, msg_id: str) -> str:
    """The event id of a write named by its intent (its Msg-Id).

    A retry of the same intent (a holder retrying its completion after a
    timeout, an agent acking a message twice) is then the same event, which the
    log's read-back recognises as stored; another writer's intent (a reaper's)
    has another Msg-Id, so another id.
    """
    return str(uuid.uuid5(_INTENT_NAMESPACE, f"{swarm}\x00{msg_id}"))


def new_id() -> str:
    """A fresh UUIDv7 (time-ordered), used for event, task and message ids."""
    return uuid7(time.time_ns() // 1_000_000, os.urandom(10))


# --------------------------------------------------------------------------- data


class EventData(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """Base of every event payload. ``KIND`` is the entity kind it belongs to."""

    KIND: ClassVar[str] = ""
    V: ClassVar[int] = 1


TaskKind = Literal["task", "gate"]


class TaskCreated(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "task"
    V: ClassVar[int] = 2  # v1 called capabilities "needs" and depends_on "after"

    title: str
    body: str = ""
    priority: int = 0
    capabilities: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    parent_id: str | None = None
    lease_ttl_s: float = 30.0
    max_attempts: int = 3
    backoff_initial_s: float = 1.0
    backoff_multiplier: float = 2.0
    backoff_max_s: float = 60.0
    start_to_close_s: float | None = None
    idempotency_key: str | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    kind: TaskKind = "task"
    depth: int = 0


class TaskReady(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "task"
    reason: str = "dependencies complete"


class TaskBlocked(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "task"
    reason: str
    blocked_by: str | None = None


class TaskClaimed(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "task"
    owner: str
    attempt: int
    lease_ttl_s: float
    # The claim's own key in the leases bucket is "<task>.<lease>" (old versions:
    # "<task>.<epoch>"): known before the claim is stored, so the claimer writes
    # the claim and its lease at the same time.
    lease: str = ""
    # Written by old versions (the claimer's wall clock); readers now derive the
    # start-to-close deadline from the claim's server timestamp instead.
    deadline_ms: int | None = None


class TaskLeaseExpired(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "task"
    epoch: int
    owner: str
    reason: str = "lease expired"
    refund: bool = False  # the claim never got a lease: its attempt is given back


class TaskRequeued(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "task"
    attempt: int  # attempts used so far
    not_before_ms: int = 0  # old versions: absolute, on the writer's wall clock
    reason: str = ""
    retry_after_ms: int | None = None  # claimable this long after the event's server time


class TaskCompleted(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "task"
    epoch: int  # 0 for a gate approved by a human
    result: str | None = None
    cost_usd: float | None = None
    output_ref: str | None = None


class TaskFailed(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "task"
    epoch: int
    error: str
    final: bool  # True: status failed for good; False: back to ready after not_before
    not_before_ms: int = 0  # old versions: absolute, on the writer's wall clock
    cost_usd: float | None = None
    retry_after_ms: int | None = None  # claimable this long after the event's server time


class TaskReleased(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "task"
    epoch: int
    reason: str = ""


class TaskCancelled(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "task"
    reason: str = ""
    epoch: int | None = None  # the claim that was running, if any


class TaskNoted(EventData, frozen=True, kw_only=True):
    """Progress note or artifact; lives on the note subject, never the task's."""

    KIND: ClassVar[str] = "note"
    task_id: str
    epoch: int | None = None
    text: str = ""
    paths: tuple[str, ...] = ()
    artifact: str | None = None


AgentStatus = Literal["online", "idle", "busy", "offline"]


class AgentRegistered(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "agent"
    name: str
    capabilities: tuple[str, ...] = ()
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    host: str = ""
    pid: int | None = None
    runtime: str = ""  # worker, mcp, cli, ...


class AgentStatusChanged(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "agent"
    status: AgentStatus
    task_id: str | None = None
    reason: str = ""


class AgentDeregistered(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "agent"
    reason: str = ""


class MemoryStored(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "memory"
    namespace: str
    key: str
    value: str
    content_type: Literal["text", "json"] = "text"
    tags: tuple[str, ...] = ()
    version: int = 0
    ttl_s: float | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class MemoryDeleted(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "memory"
    namespace: str
    key: str
    version: int = 0


Importance = Literal["low", "normal", "high", "urgent"]


class MessageSent(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "message"
    to: str | None = None
    topic: str | None = None
    text: str
    thread_id: str | None = None
    reply_to: str | None = None
    importance: Importance = "normal"
    ack_required: bool = False


class MessageAcked(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "message"
    message_id: str
    by: str


class PathsReserved(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "reservation"
    owner: str
    paths: tuple[str, ...]
    exclusive: bool = True
    ttl_s: float = 300.0
    epoch: int = 0
    task_id: str | None = None


class PathsReleased(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "reservation"
    owner: str
    reason: str = ""


class SwarmPaused(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "control"
    scope: str = "swarm"
    reason: str = ""


class SwarmResumed(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "control"
    scope: str = "swarm"
    reason: str = ""


class SwarmStopped(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "control"
    reason: str = ""


class BudgetSet(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "control"
    scope: str
    limits: dict[str, float] = msgspec.field(default_factory=dict)


class BudgetExceeded(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "control"
    scope: str
    budget: str
    limit: float
    value: float


class BreakerOpened(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "control"
    scope: str
    failures: int
    cool_down_s: float


class BreakerClosed(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "control"
    scope: str


# Merge queue (cflow.gitflow): one entity per merge request, named by its task id.

MergeCause = Literal["conflict", "check", "missing", "git"]


class MergeRequested(EventData, frozen=True, kw_only=True):
    """A finished attempt asks for its branch to be merged into ``target``."""

    KIND: ClassVar[str] = "merge"
    task_id: str
    epoch: int  # the claim whose work this is; merged only once that claim completed
    branch: str
    head: str  # the branch commit to merge
    target: str = "main"
    priority: int = 0
    title: str = ""
    origin: str | None = None  # the task whose branch this continues (after a rejection)


class MergeStarted(EventData, frozen=True, kw_only=True):
    """The merger is about to push ``commit`` (tree ``tree``, its check passed) onto
    ``previous``: a successor that finds this intent undecided pushes the same merge
    (fencing the stale push out by the target's compare-and-set) instead of deciding
    the request differently."""

    KIND: ClassVar[str] = "merge"
    task_id: str
    head: str
    target: str
    previous: str
    commit: str
    tree: str
    merger: str


class Merged(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "merge"
    task_id: str
    head: str
    target: str
    previous: str  # the target's commit before the merge
    commit: str  # the target's commit after it
    merger: str
    check_s: float | None = None


class MergeRejected(EventData, frozen=True, kw_only=True):
    KIND: ClassVar[str] = "merge"
    task_id: str
    head: str
    target: str
    cause: MergeCause
    output: str = ""  # the conflict or the failing check's output (its tail)
    merger: str = ""
    retry_task: str | None = None  # the new attempt that starts from the branch


class MergeRemoved(EventData, frozen=True, kw_only=True):
    """A person took the request out of the queue (``cfctl merges remove``): never merged.

    Appended with the request's last sequence as the expected one, so a merger that was
    checking it cannot record its intent afterwards; refused once an intent is recorded."""

    KIND: ClassVar[str] = "merge"
    task_id: str
    head: str
    by: str  # who removed it (the acting agent)
    reason: str = ""


class MergeDeferred(EventData, frozen=True, kw_only=True):
    """A queued request goes to the back of its priority band (``cfctl merges skip``), or a
    removed one back into the queue (``cfctl merges requeue``), arriving anew."""

    KIND: ClassVar[str] = "merge"
    task_id: str
    head: str
    by: str
    reason: str = ""


EVENT_TYPES: dict[str, type[EventData]] = {
    cls.__name__: cls
    for cls in (
        TaskCreated,
        TaskReady,
        TaskBlocked,
        TaskClaimed,
        TaskLeaseExpired,
        TaskRequeued,
        TaskCompleted,
        TaskFailed,
        TaskReleased,
        TaskCancelled,
        TaskNoted,
        AgentRegistered,
        AgentStatusChanged,
        AgentDeregistered,
        MemoryStored,
        MemoryDeleted,
        MessageSent,
        MessageAcked,
        PathsReserved,
        PathsReleased,
        SwarmPaused,
        SwarmResumed,
        SwarmStopped,
        BudgetSet,
        BudgetExceeded,
        BreakerOpened,
        BreakerClosed,
        MergeRequested,
        MergeStarted,
        Merged,
        MergeRejected,
        MergeRemoved,
        MergeDeferred,
    )
}


# ----------------------------------------------------------------------- envelope


class Event(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    type: str
    v: int
    swarm: Token
    entity_kind: Token
    entity_id: Token
    hlc: HlcText
    actor: str
    causation_id: str | None = None
    correlation_id: str | None = None
    data: EventData


class _RawEvent(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    type: str
    v: int
    swarm: Token
    entity_kind: Token
    entity_id: Token
    hlc: HlcText
    actor: str
    causation_id: str | None = None
    correlation_id: str | None = None
    data: msgspec.Raw


def make_event(
    data: EventData,
    *,
    swarm: str,
    entity_id: str,
    hlc: str,
    actor: str,
    event_id: str | None = None,
    causation_id: str | None = None,
    correlation_id: str | None = None,
) -> Event:
    """Wrap a payload in an envelope; ``type``, ``v`` and ``entity_kind`` come from it."""
    return Event(
        id=event_id or new_id(),
        type=type(data).__name__,
        v=type(data).V,
        swarm=check_token(swarm, "swarm"),
        entity_kind=data.KIND,
        entity_id=check_token(entity_id, "entity id"),
        hlc=hlc,
        actor=actor,
        causation_id=causation_id,
        correlation_id=correlation_id,
        data=data,
    )


# ---------------------------------------------------------------------- upcasting

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


def upcast_task_created_v1_v2(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    if "needs" in out:
        out["capabilities"] = out.pop("needs")
    if "after" in out:
        out["depends_on"] = out.pop("after")
    return out


UPCASTERS: dict[tuple[str, int], Upcaster] = {
    ("TaskCreated", 1): upcast_task_created_v1_v2,
}


_encoder = msgspec.json.Encoder()
_raw_decoder = msgspec.json.Decoder(_RawEvent)
# One decoder per event type, built on first use: building all of them at import cost
# every `cfctl` start about 18 M instructions (issue 18); a command decodes a few types.
_data_decoders: dict[str, msgspec.json.Decoder[Any]] = {}
_dict_decoder = msgspec.json.Decoder(dict[str, Any])


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def encode_data(data: EventData) -> bytes:
    return _encoder.encode(data)


def decode(raw: bytes, subject: str | None = None) -> Event:
    """Decode one stored event, upcasting old versions. Raises ``MalformedEvent`` only."""
    try:
        env = _raw_decoder.decode(raw)
        cls = EVENT_TYPES.get(env.type)
        if cls is None:
            raise MalformedEvent(f"unknown event type {env.type!r}", subject)
        if env.v > cls.V or env.v < 1:
            raise MalformedEvent(f"unsupported version {env.v} of {env.type}", subject)
        if env.entity_kind != cls.KIND:
            raise MalformedEvent(f"{env.type} on entity kind {env.entity_kind!r}", subject)
        if env.v == cls.V:
            decoder = _data_decoders.get(env.type)
            if decoder is None:
                decoder = _data_decoders[env.type] = msgspec.json.Decoder(cls)
            data = decoder.decode(env.data)
        else:
            fields = _dict_decoder.decode(env.data)
            for version in range(env.v, cls.V):
                step = UPCASTERS.get((env.type, version))
                if step is None:
                    raise MalformedEvent(f"no upcaster for {env.type} v{version}", subject)
                fields = step(fields)
            data = msgspec.convert(fields, cls)
    except MalformedEvent:
        raise
    except (msgspec.MsgspecError, ValueError, TypeError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MalformedEvent(reason, subject) from None
    return Event(
        id=env.id,
        type=env.type,
        v=cls.V,
        swarm=env.swarm,
        entity_kind=env.entity_kind,
        entity_id=env.entity_id,
        hlc=env.hlc,
        actor=env.actor,
        causation_id=env.causation_id,
        correlation_id=env.correlation_id,
        data=data,
    )


__all__ = [
    "EVENT_TYPES",
    "UPCASTERS",
    "AgentDeregistered",
    "AgentRegistered",
    "AgentStatusChanged",
    "BreakerClosed",
    "BreakerOpened",
    "BudgetExceeded",
    "BudgetSet",
    "Event",
    "EventData",
    "MemoryDeleted",
    "MemoryStored",
    "MergeDeferred",
    "MergeRejected",
    "MergeRemoved",
    "MergeRequested",
    "MergeStarted",
    "Merged",
    "MessageAcked",
    "MessageSent",
    "PathsReleased",
    "PathsReserved",
    "SwarmPaused",
    "SwarmResumed",
    "SwarmStopped",
    "TaskBlocked",
    "TaskCancelled",
    "TaskClaimed",
    "TaskCompleted",
    "TaskCreated",
    "TaskFailed",
    "TaskLeaseExpired",
    "TaskNoted",
    "TaskReady",
    "TaskReleased",
    "TaskRequeued",
    "check_token",
    "decode",
    "encode",
    "make_event",
    "new_id",
    "uuid7",
]
