"""JetStream resources: stream and bucket definitions, append/read/follow, raw KV."""

from cflow.streams import cancel_safe
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

# nats-py awaits every reply with asyncio.wait_for: on 3.11 a cancel must not be lost there.
cancel_safe.install()

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
