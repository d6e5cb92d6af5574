"""From the cflow error tree to the MCP adapter's fixed error codes (pure).

A tool that fails raises ``ToolError("CODE: message. Hint: what to do next")``:
the SDK turns it into a result with ``isError`` set and that text, so the model
reads a stable code, the facts, and a next step. The code set is fixed:
NOT_FOUND, CONFLICT, LEASE_LOST, INVALID_STATE, INVALID_ARGUMENT,
QUERY_REJECTED, LIMIT_EXCEEDED, BACKEND_UNAVAILABLE. Each error class carries
its ``code``; classes whose code is not in the set (the root, the clock offset)
are mapped here. Nothing is decided by message text.
"""

from __future__ import annotations

from cflow.errors import (
    AlreadyClaimed,
    CflowError,
    ClockOffsetError,
    DependencyError,
    Paused,
)

CODES = (
    "NOT_FOUND",
    "CONFLICT",
    "LEASE_LOST",
    "INVALID_STATE",
    "INVALID_ARGUMENT",
    "QUERY_REJECTED",
    "LIMIT_EXCEEDED",
    "BACKEND_UNAVAILABLE",
)

HINTS: dict[str, str] = {
    "NOT_FOUND": "check the id with task_find (or memory_search for a key)",
    "CONFLICT": "someone changed it first; re-read it with task_find and retry if still needed",
    "LEASE_LOST": "stop working on this task: it expired, was cancelled or taken over; "
                  "call task_claim for other work",
    "INVALID_STATE": "the task is not in a state that allows this; check it with task_find",
    "INVALID_ARGUMENT": "fix the arguments and call again",
    "QUERY_REJECTED": "send one read-only SELECT over the tables of the cflow://schema resource",
    "LIMIT_EXCEEDED": "narrow the request (fewer rows, a smaller time range) or ask a human",
    "BACKEND_UNAVAILABLE": "the cflow backend is unreachable or lacks this service; "
                           "retry later or ask a human to run `cfctl up`",
}

# Subclasses whose situation deserves a more precise hint than their code's.
_CLASS_HINTS: tuple[tuple[type[CflowError], str], ...] = (
    (AlreadyClaimed, "another agent holds it or it is finished; call task_claim without "
                     "task_id to get other ready work"),
    (Paused, "the swarm is paused; wait, or work on what you already hold"),
    (DependencyError, "depends_on must name existing tasks and form no cycle"),
)


def code_for(err: CflowError) -> str:
    if isinstance(err, ClockOffsetError):
        return "BACKEND_UNAVAILABLE"  # a node's clock is off: nothing the caller can fix
    code = getattr(err, "code", "")
    return code if code in CODES else "INVALID_STATE"


def hint_for(err: CflowError, code: str) -> str:
    for cls, hint in _CLASS_HINTS:
        if isinstance(err, cls):
            return hint
    return HINTS[code]


def describe(code: str, message: str, hint: str | None = None) -> str:
    """``CODE: message. Hint: ...`` as one line."""
    if code not in CODES:
        raise ValueError(f"unknown MCP error code {code!r}")
    text = " ".join(message.split()).rstrip(".")
    return f"{code}: {text}. Hint: {hint or HINTS[code]}"


def describe_error(err: CflowError) -> str:
    code = code_for(err)
    return describe(code, str(err), hint_for(err, code))


__all__ = ["CODES", "HINTS", "code_for", "describe", "describe_error", "hint_for"]
