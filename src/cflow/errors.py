"""The one error tree of cflow.

::

    CflowError
    ├── ConflictError                      someone else changed the thing first
    │   ├── ConcurrencyConflict            expected last subject sequence did not match
    │   ├── LeaseLost                      the caller's lease/epoch is no longer the claim of record
    │   └── AlreadyClaimed                 a specific task is held by someone else
    ├── NotFound                           no such task / agent / key / entry
    ├── InvalidInput (also ValueError)     the request itself is wrong
    │   ├── MalformedEvent                 bytes that are not a cflow event
    │   ├── DependencyError                unknown dependency or a cycle
    │   └── QueryRejected                  SQL that is not a pure read, or too expensive
    ├── InvalidState                       the entity is in a state that refuses this step
    │   └── Paused                         the swarm or scope refuses new claims
    ├── LimitExceeded                      a budget, cap or time limit was hit
    ├── ClockOffsetError                   a remote HLC stamp is too far ahead of our wall clock
    └── Unavailable (also ConnectionError) NATS / the query service cannot be reached

Every error prints as one line and keeps its facts as attributes, so the CLI can
print ``str(err)`` and the MCP adapter can map the class to a code. Foreign
exceptions are translated in one place per adapter (``streams/errors.py`` for
NATS), by error code, never by message text.
"""

from __future__ import annotations

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


class AlreadyClaimed(ConflictError):
    def __init__(self, task_id: str, status: str, owner: str | None = None) -> None:
        who = f" by {owner}" if owner else ""
        super().__init__(
            f"task {task_id} is {status}{who}, not claimable",
            task_id=task_id,
            status=status,
            owner=owner,
        )


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
    "DependencyError",
    "InvalidInput",
    "InvalidState",
    "LeaseLost",
    "LimitExceeded",
    "MalformedEvent",
    "NotFound",
    "Paused",
    "QueryRejected",
    "Unavailable",
]
