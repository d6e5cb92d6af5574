"""Names of every JetStream resource and subject, derived from the swarm name (pure)."""

from __future__ import annotations

from cflow.events import check_token

PREFIX = "cf"


def events_stream(swarm: str) -> str:
    return f"CF_{check_token(swarm, 'swarm')}_EVENTS"


def messages_stream(swarm: str) -> str:
    return f"CF_{check_token(swarm, 'swarm')}_MSGS"


def event_subject(swarm: str, kind: str, entity_id: str) -> str:
    return f"{PREFIX}.{swarm}.evt.{kind}.{entity_id}"


def events_filter(swarm: str, kind: str | None = None) -> str:
    if kind is None:
        return f"{PREFIX}.{swarm}.evt.>"
    return f"{PREFIX}.{swarm}.evt.{kind}.*"


def message_subject(swarm: str, channel: str, message_id: str) -> str:
    """``channel`` is ``to.<agent>`` or ``topic.<topic>``."""
    return f"{PREFIX}.{swarm}.msg.{channel}.{message_id}"


def bucket(swarm: str, name: str) -> str:
    """KV bucket name: ``cf_<swarm>_<name>`` (leases, presence, memory, ...)."""
    return f"{PREFIX}_{check_token(swarm, 'swarm')}_{name}"


def kv_stream(bucket_name: str) -> str:
    return f"KV_{bucket_name}"


def kv_subject(bucket_name: str, key: str) -> str:
    return f"$KV.{bucket_name}.{key}"


def query_subject(swarm: str) -> str:
    return f"{PREFIX}.{swarm}.query"


LEASES = "leases"
# The leases-bucket key whose timestamp starts a new life of the bucket's keys
# (TaskService.lease_generation_ms).
LEASES_GENERATION_KEY = "_generation"
PRESENCE = "presence"
MEMORY = "memory"
RESERVATIONS = "reservations"
CONTROL = "control"
