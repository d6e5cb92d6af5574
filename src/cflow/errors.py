"""The one error tree of cflow.

::

    CflowError
    ├── ConflictError                      someone else changed the thing first
    │   ├── ConcurrencyConflict            expected last subject sequence did not match
    │   ├── LeaseLost                      the caller's lease/epoch is no longer the claim of record
    │   │   └── NotHolder                  the epoch is current but held by another agent
    │   ├── AlreadyClaimed                 a specific task is held by someone else
    │   ├── MemoryConflict                 a memory compare-and-set found another version
    │   ├── ReservationConflict            overlapping paths are reserved by another agent
    │   └── ReservationLost                a path reservation expired or was released
    ├── NotFound                           no such task / agent / key / entry
    ├── InvalidInput (also ValueError)     the request itself is wrong
    │   ├── MalformedEvent                 bytes that are not a cflow event
    │   ├── DependencyError                unknown dependency or a cycle
    │   └── QueryRejected                  SQL that is not a pure read, or too expensive
    ├── InvalidState                       the entity is in a state that refuses this step
    │   ├── Paused                         the swarm or scope refuses new claims
    │   └── Damaged                        a stored file cannot be read (a projection: rebuilt)
    ├── LimitExceeded                      a budget, cap or time limit was hit
    ├── ClockOffsetError                   a remote HLC stamp is too far ahead of our wall clock
    └── Unavailable (also ConnectionError) NATS / the query service cannot be reached

Every error prints as one line and keeps its facts as attributes, so the CLI can
print ``str(err)`` and the MCP adapter can map the class to a code. Foreign
exceptions are translated in one place per adapter (``streams/errors.py`` for
NATS), by error code, never by message text.
"""

from __future__ import annotations

import time
from typing import Any


class CflowError(Exception):
    """Root of every error cflow raises on purpose."""

    code = "ERROR"

    def __init__(self, message: str, **facts: Any) -> None:
        super().__init__(" ".join(message.split()))
        self.facts = facts
        for name, value in facts.items():
            setattr(self, name, value)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConflictError(CflowError):
    code = "CONFLICT"


class ConcurrencyConflict(ConflictError):
    """An append expected the entity at one sequence and found it at another."""

    subject: str
    expected: int | None
    actual: int | None

    def __init__(
        self, subject: str, expected: int | None, actual: int | None = None, detail: str = ""
    ) -> None:
        where = f"expected last sequence {expected}"
        if actual is not None:
            where += f", found {actual}"
        text = f"concurrency conflict on {subject}: {where}"
        if detail:
            text += f" ({detail})"
        super().__init__(text, subject=subject, expected=expected, actual=actual)


class LeaseLost(ConflictError):
    """The caller no longer holds the claim of record (expired, taken over, cancelled)."""

    code = "LEASE_LOST"
    task_id: str
    epoch: int
    reason: str

    def __init__(self, task_id: str, epoch: int, reason: str) -> None:
        super().__init__(
            f"lease lost on task {task_id} (epoch {epoch}): {reason}",
            task_id=task_id,
            epoch=epoch,
            reason=reason,
        )


class NotHolder(LeaseLost):
    """A write fenced by an epoch that is current, from an agent that does not hold it."""

    code = "NOT_HOLDER"
    holder: str
    actor: str

    def __init__(self, task_id: str, epoch: int, holder: str, actor: str) -> None:
        super().__init__(task_id, epoch, f"held by {holder}, not by {actor}")
        self.holder = holder
        self.actor = actor
        self.facts.update(holder=holder, actor=actor)


class AlreadyClaimed(ConflictError):
    def __init__(self, task_id: str, status: str, owner: str | None = None) -> None:
        who = f" by {owner}" if owner else ""
        super().__init__(
            f"task {task_id} is {status}{who}, not claimable",
            task_id=task_id,
            status=status,
            owner=owner,
        )


class MemoryConflict(ConflictError):
    """A compare-and-set put or delete of a memory entry found another version."""

    def __init__(self, namespace: str, key: str, expected: int, actual: int | None) -> None:
        found = "no live entry" if not actual else f"version {actual}"
        want = "no live entry" if expected == 0 else f"version {expected}"
        super().__init__(f"memory {namespace}/{key}: expected {want}, found {found}",
                         namespace=namespace, key=key, expected=expected, actual=actual)


class ReservationConflict(ConflictError):
    """Another owner holds an overlapping reservation that this one cannot share."""

    code = "RESERVED"

    def __init__(self, *, holder: str, reservation_id: str, pattern: str, held_pattern: str,
                 exclusive: bool, expires_ms: int, task_id: str | None = None) -> None:
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_ms / 1000))
        kind = "exclusively" if exclusive else "shared"
        super().__init__(
            f"{pattern} overlaps {held_pattern}, reserved {kind} by {holder} until {until}"
            + (f" (task {task_id})" if task_id else ""),
            holder=holder, reservation_id=reservation_id, pattern=pattern,
            held_pattern=held_pattern, exclusive=exclusive, expires_ms=expires_ms,
            task_id=task_id,
        )


class ReservationLost(ConflictError):
    """The reservation expired or was released; its holder must reserve again."""

    code = "RESERVATION_LOST"

    def __init__(self, reservation_id: str, reason: str) -> None:
        super().__init__(f"reservation {reservation_id} lost: {reason}",
                         reservation_id=reservation_id, reason=reason)


class NotFound(CflowError):
    code = "NOT_FOUND"

    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(f"{kind} not found: {ident}", kind=kind, ident=ident)


class InvalidInput(CflowError, ValueError):
    code = "INVALID_ARGUMENT"


class MalformedEvent(InvalidInput):
    def __init__(self, reason: str, subject: str | None = None) -> None:
        where = f" on {subject}" if subject else ""
        super().__init__(f"malformed event{where}: {reason}", reason=reason, subject=subject)


class DependencyError(InvalidInput):
    pass


class QueryRejected(InvalidInput):
    code = "QUERY_REJECTED"


class InvalidState(CflowError):
    code = "INVALID_STATE"


class Paused(InvalidState):
    def __init__(self, scope: str, reason: str) -> None:
        super().__init__(f"{scope} is paused: {reason}", scope=scope, reason=reason)


class Damaged(InvalidState):
    """A file cflow keeps cannot be read (a projection is set aside and rebuilt)."""


class LimitExceeded(CflowError):
    code = "LIMIT_EXCEEDED"


class ClockOffsetError(CflowError):
    code = "CLOCK_OFFSET"

    def __init__(self, remote_ms: int, local_ms: int, max_offset_ms: int) -> None:
        super().__init__(
            f"remote clock is {remote_ms - local_ms} ms ahead of ours "
            f"(max offset {max_offset_ms} ms); refusing to adopt it",
            remote_ms=remote_ms,
            local_ms=local_ms,
            max_offset_ms=max_offset_ms,
        )


class Unavailable(CflowError, ConnectionError):
    code = "BACKEND_UNAVAILABLE"


__all__ = [
    "AlreadyClaimed",
    "CflowError",
    "ClockOffsetError",
    "ConcurrencyConflict",
    "ConflictError",
    "Damaged",
    "DependencyError",
    "InvalidInput",
    "InvalidState",
    "LeaseLost",
    "LimitExceeded",
    "MalformedEvent",
    "MemoryConflict",
    "NotFound",
    "NotHolder",
    "Paused",
    "QueryRejected",
    "ReservationConflict",
    "ReservationLost",
    "Unavailable",
]
