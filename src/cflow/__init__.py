"""cflow: event-sourced coordination backend for swarms of AI coding agents, on NATS JetStream.

The public surface is ``__all__`` below: the ``Swarm`` facade, the error tree,
the event envelope and types, and the hybrid logical clock. ``import cflow``
stays cheap: it loads the pure core only (msgspec, no NATS, no DuckDB);
``cflow.Swarm`` imports the NATS adapter on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cflow.errors import (
    AlreadyClaimed,
    CflowError,
    ClockOffsetError,
    ConcurrencyConflict,
    ConflictError,
    Damaged,
    DependencyError,
    InvalidInput,
    InvalidState,
    LeaseLost,
    LimitExceeded,
    MalformedEvent,
    MemoryConflict,
    NotFound,
    NotHolder,
    Paused,
    QueryRejected,
    ReservationConflict,
    ReservationLost,
    Unavailable,
)
from cflow.events import (
    EVENT_TYPES,
    AgentDeregistered,
    AgentRegistered,
    AgentStatusChanged,
    Event,
    EventData,
    MemoryDeleted,
    MemoryStored,
    TaskCancelled,
    TaskClaimed,
    TaskCompleted,
    TaskCreated,
    TaskFailed,
    TaskLeaseExpired,
    TaskReady,
    TaskReleased,
    TaskRequeued,
)
from cflow.hlc import HybridClock, Timestamp

if TYPE_CHECKING:
    from cflow.swarm import Swarm

__version__ = "0.1.0"

# Attributes that pull in heavy dependencies, resolved on first access.
_LAZY = {"Swarm": "cflow.swarm"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cflow' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "EVENT_TYPES",
    "AgentDeregistered",
    "AgentRegistered",
    "AgentStatusChanged",
    "AlreadyClaimed",
    "CflowError",
    "ClockOffsetError",
    "ConcurrencyConflict",
    "ConflictError",
    "Damaged",
    "DependencyError",
    "Event",
    "EventData",
    "HybridClock",
    "InvalidInput",
    "InvalidState",
    "LeaseLost",
    "LimitExceeded",
    "MalformedEvent",
    "MemoryConflict",
    "MemoryDeleted",
    "MemoryStored",
    "NotFound",
    "NotHolder",
    "Paused",
    "QueryRejected",
    "ReservationConflict",
    "ReservationLost",
    "Swarm",
    "TaskCancelled",
    "TaskClaimed",
    "TaskCompleted",
    "TaskCreated",
    "TaskFailed",
    "TaskLeaseExpired",
    "TaskReady",
    "TaskReleased",
    "TaskRequeued",
    "Timestamp",
    "Unavailable",
    "__version__",
]
