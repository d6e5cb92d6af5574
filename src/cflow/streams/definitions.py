"""Declarative definitions of every stream and KV bucket of a swarm (pure).

``cfctl init`` and the first connect create or update exactly these. KV buckets
are declared as their backing streams so every setting is explicit: history,
per-message TTL (leases, presence, memory) and the delete markers the server
leaves when a TTL expires, which the lease reaper listens for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cflow.streams import names

DUPLICATE_WINDOW_S = 120.0
MARKER_TTL_S = 300.0  # how long an expiry marker stays readable for late reapers
MEMORY_MARKER_TTL_S = 1.0


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    description: str
    replicas: int = 1
    max_msgs_per_subject: int = -1
    max_age_s: float = 0.0
    max_msg_size: int = 1024 * 1024
    duplicate_window_s: float = DUPLICATE_WINDOW_S
    allow_msg_ttl: bool = False
    marker_ttl_s: float | None = None
    kv: bool = False
    storage: str = "file"
    extra: dict[str, object] = field(default_factory=dict)

    def config(self) -> dict[str, object]:
        """The JetStream stream configuration, as the server's JSON API spells it."""
        cfg: dict[str, object] = {
            "name": self.name,
            "description": self.description,
            "subjects": list(self.subjects),
            "retention": "limits",
            "storage": self.storage,
            "num_replicas": self.replicas,
            "max_msgs_per_subject": self.max_msgs_per_subject,
            "max_age": int(self.max_age_s * 1e9),
            "max_msg_size": self.max_msg_size,
            "duplicate_window": int(self.duplicate_window_s * 1e9),
            "allow_direct": True,
            "discard": "new" if self.kv else "old",
            "deny_delete": True,
            "deny_purge": False,
            "allow_rollup_hdrs": self.kv,
        }
        if self.allow_msg_ttl:
            cfg["allow_msg_ttl"] = True
        if self.marker_ttl_s is not None:
            cfg["subject_delete_marker_ttl"] = int(self.marker_ttl_s * 1e9)
        cfg.update(self.extra)
        return cfg


def _bucket(swarm: str, name: str, description: str, *, history: int, ttl: bool,
            replicas: int, marker_ttl_s: float = MARKER_TTL_S,
            storage: str = "file") -> StreamSpec:
    bucket = names.bucket(swarm, name)
    return StreamSpec(
        name=names.kv_stream(bucket),
        subjects=(f"$KV.{bucket}.>",),
        description=description,
        replicas=replicas,
        max_msgs_per_subject=history,
        duplicate_window_s=DUPLICATE_WINDOW_S,
        allow_msg_ttl=ttl,
        marker_ttl_s=marker_ttl_s if ttl else None,
        kv=True,
        storage=storage,
    )


def swarm_resources(swarm: str, replicas: int = 1) -> list[StreamSpec]:
    """Every stream and bucket one swarm needs."""
    if replicas not in (1, 3):
        from cflow.errors import InvalidInput

        raise InvalidInput(f"replicas must be 1 or 3, got {replicas}")
    return [
        StreamSpec(
            name=names.events_stream(swarm),
            subjects=(names.events_filter(swarm),),
            description=f"cflow events of swarm {swarm}",
            replicas=replicas,
        ),
        StreamSpec(
            name=names.messages_stream(swarm),
            subjects=(f"{names.PREFIX}.{swarm}.msg.>",),
            description=f"cflow agent messages of swarm {swarm}",
            replicas=replicas,
        ),
        StreamSpec(
            name=f"CF_{swarm}_OFFERS",
            subjects=(f"{names.PREFIX}.{swarm}.offer.>",),
            description=f"cflow work offers of swarm {swarm}: one ready task to one claimer",
            replicas=replicas,
            # A work queue: an offer is gone once a claimer acknowledged it.
            extra={"retention": "workqueue", "allow_direct": False},
        ),
        # Leases and presence are soft state in memory: the claim of record is
        # on the task's subject, and a renewal need not wait for a disk (with
        # `sync: always` the disk could not fsync a thousand holders' renewals
        # a second). A single server forgets a memory stream when it restarts;
        # whoever next uses one of these buckets creates it again from this
        # spec (`ephemeral_bucket`), holders write their leases back within a
        # TTL, and no missing lease is judged gone before a TTL after the
        # bucket's new generation (TaskService.lease_generation_ms). In a
        # cluster, R3 memory streams keep their keys through the restart of one
        # node; a restart of the whole cluster empties them (sequences from 1).
        _bucket(swarm, names.LEASES, "task leases: owner, epoch; server-side TTL",
                history=1, ttl=True, replicas=replicas, storage="memory"),
        _bucket(swarm, names.PRESENCE, "agent presence; server-side TTL",
                history=1, ttl=True, replicas=replicas, storage="memory"),
        # With history > 1 the server raises every message TTL to at least the
        # marker TTL (nats-server 2.15, measured), so memory's markers live 1 s.
        _bucket(swarm, names.MEMORY, "shared memory with history",
                history=64, ttl=True, replicas=replicas, marker_ttl_s=MEMORY_MARKER_TTL_S),
        _bucket(swarm, names.RESERVATIONS, "path reservations; server-side TTL",
                history=1, ttl=True, replicas=replicas),
        _bucket(swarm, names.CONTROL, "pause/stop flags, budgets, breakers",
                history=16, ttl=False, replicas=replicas),
    ]


def ephemeral_bucket(swarm: str, stream: str, replicas: int = 1) -> StreamSpec | None:
    """The spec of ``stream`` if it is one of ``swarm``'s memory-storage buckets.

    Those are created again, empty, wherever they are found missing (a server
    restart forgets them); any other missing stream needs ``cfctl init``.
    """
    for spec in swarm_resources(swarm, replicas):
        if spec.name == stream and spec.kv and spec.storage == "memory":
            return spec
    return None
