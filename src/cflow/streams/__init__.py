"""JetStream resources: stream and bucket definitions, append/read/follow, raw KV."""

from cflow.streams.client import (
    Appended,
    BadMessage,
    EventLog,
    KvEntry,
    Outgoing,
    StoredEvent,
    build_append,
    build_kv_delete,
    build_kv_put,
    connect,
    ensure_swarm,
)
from cflow.streams.definitions import StreamSpec, swarm_resources

__all__ = [
    "Appended",
    "BadMessage",
    "EventLog",
    "KvEntry",
    "Outgoing",
    "StoredEvent",
    "StreamSpec",
    "build_append",
    "build_kv_delete",
    "build_kv_put",
    "connect",
    "ensure_swarm",
    "swarm_resources",
]
