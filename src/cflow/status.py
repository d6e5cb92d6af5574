"""What `cfctl status` shows: servers, JetStream usage, the swarm's streams.

``collect_status(swarm)`` returns a plain dict (JSON-ready) that the CLI renders.
Other parts add sections without touching this module's callers: append
``(name, "module:function")`` to ``STATUS_SECTIONS``; the function is
``async def fn(swarm: Swarm) -> Any`` and its result lands under ``name``. A
section that fails shows ``{"error": "..."}`` instead of failing the status.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from cflow.errors import CflowError, NotFound, Unavailable
from cflow.streams.client import api_request
from cflow.streams.definitions import swarm_resources

if TYPE_CHECKING:
    from cflow.swarm import Swarm

STATUS_SECTIONS: list[tuple[str, str]] = [("control", "cflow.control:status_section"),
                                          ("maintenance", "cflow.leases:maintenance_status"),
                                          ("queries", "cflow.status:query_status"),
                                          ("agents", "cflow.agents:presence_section")]
STATUS_TIMEOUT_S = 2.0  # a stream whose leader is being elected must not stall the status


def _server_info(nc: Any) -> dict[str, Any]:
    info: dict[str, Any] = dict(getattr(nc, "_server_info", None) or {})
    url = getattr(nc, "connected_url", None)
    return {
        "name": info.get("server_name"),
        "id": info.get("server_id"),
        "version": info.get("version"),
        "cluster": info.get("cluster"),
        "jetstream": bool(info.get("jetstream")),
        "connected_url": f"{url.scheme}://{url.hostname}:{url.port}" if url else None,
        "peers_client_urls": list(info.get("connect_urls") or []),
        "auth_required": bool(info.get("auth_required")),
    }


def replica_health(cluster: dict[str, Any] | None, want: int) -> dict[str, Any]:
    """Leader, replicas and a one-word health from a STREAM.INFO ``cluster`` block (pure).

    ``ok``: a leader and every replica current; ``degraded``: a leader but a
    replica offline or lagging; ``no-leader``: writes are refused until one is
    elected.
    """
    if not cluster:
        return {"leader": None, "replicas": [], "health": "ok" if want == 1 else "no-leader"}
    leader = cluster.get("leader")
    replicas = [
        {
            "name": r.get("name"),
            "current": bool(r.get("current")),
            "offline": bool(r.get("offline")),
            "lag": int(r.get("lag", 0)),
        }
        for r in cluster.get("replicas") or []
    ]
    if not leader:
        health = "no-leader"
    elif len(replicas) + 1 < want or any(not r["current"] or r["offline"] for r in replicas):
        health = "degraded"
    else:
        health = "ok"
    return {"leader": leader, "replicas": replicas, "health": health}


def replication_summary(health: dict[str, Any], want: int) -> str:
    """One line on a stream's replication, e.g. ``R3 leader n0; n1 current, n2 lag 12`` (pure).

    Without a leader it says ``election in progress (no leader)``: writes wait
    (clients retry for a bounded time) until one is elected.
    """
    head = f"R{want}"
    if health["leader"]:
        head += f" leader {health['leader']}"
    elif want > 1 or health["health"] == "no-leader":
        head += " election in progress (no leader)"
    parts = []
    for r in health["replicas"]:
        if r["offline"]:
            parts.append(f"{r['name']} offline")
        elif not r["current"] or r["lag"]:
            parts.append(f"{r['name']} lag {r['lag']}" + ("" if r["current"] else " catching up"))
        else:
            parts.append(f"{r['name']} current")
    return head + (f"; {', '.join(parts)}" if parts else "")


async def stream_status(nc: Any, name: str) -> dict[str, Any]:
    """One stream's state and replication, as ``cfctl status`` shows it.

    A stream whose group has no leader still answers (from a replica), so
    ``election`` is True then; a stream that does not answer at all within the
    timeout is reported with ``error`` and ``election`` True too (its leader is
    gone or being elected), never as missing.
    """
    try:
        info = await api_request(nc, f"$JS.API.STREAM.INFO.{name}", timeout=STATUS_TIMEOUT_S)
    except NotFound:
        return {"name": name, "exists": False}
    except Unavailable as exc:
        # Counts unknown (0) but present, so every renderer of the usual shape still works.
        return {"name": name, "exists": True, "error": str(exc), "messages": 0, "bytes": 0,
                "first_seq": 0, "last_seq": 0, "consumers": 0, "num_replicas": 0,
                "leader": None, "replicas": [], "health": "no-leader", "election": True,
                "summary": f"no answer ({exc.message}); election in progress?"}
    state = info.get("state", {})
    want = int(info.get("config", {}).get("num_replicas", 1))
    health = replica_health(info.get("cluster"), want)
    return {
        "name": name,
        "exists": True,
        "messages": int(state.get("messages", 0)),
        "bytes": int(state.get("bytes", 0)),
        "first_seq": int(state.get("first_seq", 0)),
        "last_seq": int(state.get("last_seq", 0)),
        "consumers": int(state.get("consumer_count", 0)),
        "num_replicas": want,
        **health,
        "election": health["health"] == "no-leader",
        "summary": replication_summary(health, want),
    }


def monitor(url: str) -> dict[str, Any]:
    """Server and route facts from a nats-server monitoring endpoint (``/varz``, ``/routez``)."""
    import urllib.request  # only with --monitor: about 15 M instructions of every status

    out: dict[str, Any] = {}
    for page in ("varz", "routez"):
        with urllib.request.urlopen(f"{url.rstrip('/')}/{page}", timeout=2) as resp:  # noqa: S310
            out[page] = json.loads(resp.read())
    varz, routez = out["varz"], out["routez"]
    return {
        "name": varz.get("server_name"),
        "version": varz.get("version"),
        "uptime": varz.get("uptime"),
        "connections": varz.get("connections"),
        "cluster": (varz.get("cluster") or {}).get("name"),
        "routes": [
            {"remote": r.get("remote_name") or r.get("remote_id"), "ip": r.get("ip"),
             "port": r.get("port")}
            for r in routez.get("routes") or []
        ],
    }


async def collect_status(swarm: Swarm, *, monitor_url: str | None = None) -> dict[str, Any]:
    """Everything `cfctl status` shows for one swarm, as a JSON-ready dict.

    Raises:
        Unavailable: NATS stopped answering.
    """
    nc = swarm.nc
    server = _server_info(nc)
    result: dict[str, Any] = {"swarm": swarm.name, "server": server}
    if monitor_url:
        try:
            result["monitor"] = monitor(monitor_url)
        except (OSError, ValueError) as exc:
            result["monitor"] = {"error": f"{monitor_url}: {exc}"}
    try:
        account = await api_request(nc, "$JS.API.INFO")
        result["jetstream"] = {
            "enabled": True,
            "memory": account.get("memory"),
            "storage": account.get("storage"),
            "streams": account.get("streams"),
            "consumers": account.get("consumers"),
            "limits": account.get("limits"),
            "api": account.get("api"),
            "domain": account.get("domain"),
        }
    except CflowError as exc:
        result["jetstream"] = {"enabled": False, "error": str(exc)}
    streams = []
    if result["jetstream"]["enabled"]:
        for spec in swarm_resources(swarm.name):
            streams.append(await stream_status(nc, spec.name))
    result["streams"] = streams
    servers = {server["name"]} if server["name"] else set()
    for s in streams:
        if s.get("leader"):
            servers.add(s["leader"])
        servers.update(r["name"] for r in s.get("replicas", []) if r["name"])
    result["servers"] = sorted(servers)
    for name, target in STATUS_SECTIONS:
        try:
            result[name] = await _section(target)(swarm)
        except CflowError as exc:
            result[name] = {"error": str(exc)}
    return result


def _section(target: str) -> Callable[[Swarm], Awaitable[Any]]:
    module, _, attr = target.partition(":")
    fn: Callable[[Swarm], Awaitable[Any]] = getattr(importlib.import_module(module), attr)
    return fn


async def query_status(swarm: Swarm) -> dict[str, Any]:
    """Whether a projector answers queries for the swarm, and how far it has projected."""
    try:
        result = await swarm.query("SELECT 1", timeout_s=1)
    except CflowError as exc:
        return {"serving": False, "error": str(exc)}
    return {"serving": True, "checkpoint": result.checkpoint}
