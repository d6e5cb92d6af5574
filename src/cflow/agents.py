"""Agent registry and presence: who is in the swarm, what it can do, is it alive.

Theory of operation
-------------------
An agent's identity and status live on its own event subject
(``cf.<swarm>.evt.agent.<name>``): ``AgentRegistered`` when a process starts
acting as the agent, ``AgentStatusChanged`` (online / idle / busy / offline) as
it works, ``AgentDeregistered`` on a clean exit. :func:`fold_agent` turns those
events into an :class:`AgentInfo` (pure).

Liveness is a key in the ``presence`` bucket with a server-side TTL
(:data:`PRESENCE_TTL_S`), renewed by the agent's process every
:data:`PRESENCE_RENEW_S` while :meth:`Agent.present` is active, by the keep-alive
loop leases and reservations use (:mod:`cflow.keepalive`): a process cut off from
NATS is told its presence is lost before the server can expire the key. When the
process dies, the server removes the key and leaves a marker; every observer running
:meth:`AgentService.maintain` sees the marker and appends
``AgentStatusChanged(offline)`` with the agent subject's last sequence as the
expected sequence and a Msg-Id derived from it, so a crowd of observers records
the agent offline exactly once. A process that was only paused (SIGSTOP) and
comes back finds its key expired, puts it again and re-announces itself online
with the same compare-and-set, so the last word is always the true one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import msgspec

from cflow import events as ev
from cflow.background import stop_tasks
from cflow.errors import CflowError, ConcurrencyConflict, InvalidInput, NotFound
from cflow.keepalive import Holding, keep_renewing, regain, renewal
from cflow.lease_policy import LeasePolicy
from cflow.streams import StoredEvent, names

if TYPE_CHECKING:
    from cflow.streams.client import KvEntry
    from cflow.swarm import Swarm

log = logging.getLogger("cflow.agents")

PRESENCE_TTL_S = 10.0
PRESENCE_RENEW_S = 3.0
STATUSES: tuple[ev.AgentStatus, ...] = ("online", "idle", "busy", "offline")


class Presence(msgspec.Struct, frozen=True, kw_only=True):
    """Value of a presence key: which process is the agent right now."""

    name: str
    host: str
    pid: int
    registration: str
    since_ms: int


_presence_encoder = msgspec.json.Encoder()
_presence_decoder = msgspec.json.Decoder(Presence)


@dataclass(frozen=True)
class AgentInfo:
    """An agent as folded from its events, plus whether its presence key is live."""

    name: str
    status: str = "offline"
    capabilities: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    host: str = ""
    pid: int | None = None
    runtime: str = ""
    task_id: str | None = None
    registered_ms: int | None = None
    changed_ms: int | None = None
    registrations: int = 0
    deregistered: bool = False
    reason: str = ""
    seq: int = 0  # last sequence on the agent's subject
    events: int = 0
    present: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _event_ms(event: ev.Event) -> int:
    from cflow.hlc import Timestamp

    return Timestamp.parse(event.hlc).wall_ms


def fold_agent(state: AgentInfo | None, seq: int, event: ev.Event) -> AgentInfo:
    """Apply one agent event (pure). Unknown kinds are refused with ``InvalidInput``."""
    cur = state or AgentInfo(name=event.entity_id)
    when = _event_ms(event)
    base = replace(cur, seq=seq, events=cur.events + 1, changed_ms=when)
    match event.data:
        case ev.AgentRegistered() as d:
            return replace(base, status="online", capabilities=tuple(d.capabilities),
                           labels=dict(d.labels), host=d.host, pid=d.pid, runtime=d.runtime,
                           registered_ms=when, registrations=cur.registrations + 1,
                           deregistered=False, task_id=None, reason="registered")
        case ev.AgentStatusChanged() as d:
            return replace(base, status=d.status, task_id=d.task_id, reason=d.reason)
        case ev.AgentDeregistered() as d:
            return replace(base, status="offline", task_id=None, deregistered=True,
                           reason=d.reason or "deregistered")
    raise InvalidInput(f"{event.type} is not an agent event")


def fold_agents(items: Iterable[tuple[int, ev.Event]]) -> dict[str, AgentInfo]:
    out: dict[str, AgentInfo] = {}
    for seq, event in items:
        if event.entity_kind == "agent":
            out[event.entity_id] = fold_agent(out.get(event.entity_id), seq, event)
    return out


def _live(entry: KvEntry | None) -> bool:
    return entry is not None and entry.live


PRESENCE_STATES = ("working", "waiting_on_human", "idle", "offline", "dead")


def presence_state(agent: AgentInfo, holds_lease: bool) -> str:
    """What an agent is doing, for people (pure): one of :data:`PRESENCE_STATES`.

    *dead*: its presence is gone while it still holds a lease (the lease will
    expire and the work be reclaimed); *offline*: gone, holding nothing;
    *waiting_on_human*: a Claude Code session stopped at a permission prompt
    (its hooks set the reason ``waiting on a human: ...``); *working*: busy or
    holding a lease; *idle*: present, nothing to do.
    """
    if not agent.present or agent.status == "offline":
        return "dead" if holds_lease else "offline"
    if agent.reason.startswith("waiting on a human"):
        return "waiting_on_human"
    if agent.status == "busy" or holds_lease:
        return "working"
    return "idle"


class Agent:
    """A registered agent, as acted out by this process."""

    def __init__(self, service: AgentService, name: str, registration: str,
                 capabilities: tuple[str, ...], labels: dict[str, str], runtime: str) -> None:
        self.service = service
        self.name = name
        self.registration = registration
        self.capabilities = capabilities
        self.labels = labels
        self.runtime = runtime
        self.lapses = 0  # times the presence key was found expired on renewal
        self._revision = 0
        self.ttl_s = PRESENCE_TTL_S
        # The current tenure of the presence key while ``present()`` runs.
        self.presence: Holding | None = None

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, capabilities={self.capabilities})"

    async def set_status(self, status: ev.AgentStatus, task_id: str | None = None,
                         reason: str = "") -> bool:
        return await self.service.set_status(self.name, status, task_id, reason=reason)

    async def _put_presence(self) -> bool:
        """Put or renew the presence key. Returns False when it had lapsed."""
        svc = self.service
        value = _presence_encoder.encode(Presence(
            name=self.name, host=socket.gethostname(), pid=os.getpid(),
            registration=self.registration, since_ms=time.time_ns() // 1_000_000))
        renewing = self._revision > 0
        if renewing:
            try:
                self._revision = await svc.log.kv_put(svc.bucket, self.name, value,
                                                      expected_revision=self._revision,
                                                      ttl_s=self.ttl_s)
                return True
            except ConcurrencyConflict:
                pass  # expired (marker) or another process took the name over
        self._revision = await svc.log.kv_put(svc.bucket, self.name, value, ttl_s=self.ttl_s)
        return not renewing

    @contextlib.asynccontextmanager
    async def present(self, *, ttl_s: float = PRESENCE_TTL_S, renew_s: float | None = None,
                      reason: str = "shutdown", on_lost: Callable[[Agent], None] | None = None
                      ) -> AsyncIterator[Agent]:
        """Keep the presence key alive while the block runs; deregister on a clean exit.

        Renewed by the shared keep-alive loop (:mod:`cflow.keepalive`): when no
        renewal succeeded for the TTL minus a margin (cut off from NATS, paused),
        ``self.presence.lost`` is set and ``on_lost(self)`` is called, before the
        server can expire the key and observers record the agent offline. The agent
        then keeps trying to put the key again; once it is back (a new
        ``self.presence``), it re-announces itself online if the key had lapsed.

        Raises:
            Unavailable: NATS cannot be reached when the block starts.
        """
        self.ttl_s = ttl_s
        policy = LeasePolicy(ttl_s)
        period = renew_s or max(0.2, min(PRESENCE_RENEW_S, ttl_s / 3))
        sent = time.monotonic()
        await self._put_presence()
        held = self.presence = Holding(policy, sent)
        seq, last = await self.service._last(self.name)
        if last is None or fold_agent(None, seq, last).status == "offline":
            await self.service.set_status(self.name, "online", reason="present", force=True)

        async def renew() -> None:
            if not await renewal(held, self._put_presence):
                await self._back()

        async def keep() -> None:
            nonlocal held
            name = f"presence of {self.name}"
            while True:
                await keep_renewing(held, renew, name=name, interval_s=period)
                log.warning("%s lost: %s", name, held.lost_reason)
                if on_lost is not None:
                    on_lost(self)
                sent, fresh = await regain(self._put_presence, policy, name=name,
                                           attempt_s=period)
                held = self.presence = Holding(policy, sent)
                if not fresh:
                    await self._back()

        renewer = asyncio.create_task(keep(), name=f"presence-{self.name}")
        try:
            yield self
        finally:
            await stop_tasks([renewer])
            with contextlib.suppress(CflowError):
                await self.service.deregister(self.name, reason=reason)
                await self.service.log.kv_delete(self.service.bucket, self.name)

    async def _back(self) -> None:
        """Our key had expired (we were paused or cut off); observers may have recorded
        us offline: say we are back, compare-and-set."""
        self.lapses += 1
        with contextlib.suppress(CflowError):
            await self.service.set_status(self.name, "online", reason="presence restored",
                                          force=True)


class AgentService:
    """Registry and presence of one swarm's agents (``swarm.agents``)."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.log = swarm.log
        self.bucket = swarm.log.bucket(names.PRESENCE)
        self.marked_offline = 0

    # ------------------------------------------------------------------- writes

    async def register(self, name: str, capabilities: Iterable[str] = (),
                       labels: dict[str, str] | None = None, runtime: str = "worker") -> Agent:
        """Record ``AgentRegistered`` for one registration of ``name`` and return the agent.

        Raises:
            InvalidInput: ``name`` is not a subject token.
        """
        ev.check_token(name, "agent name")
        caps = tuple(sorted(set(capabilities)))
        registration = ev.new_id()
        data = ev.AgentRegistered(name=name, capabilities=caps, labels=dict(labels or {}),
                                  host=socket.gethostname(), pid=os.getpid(), runtime=runtime)
        await self.log.append(data, name, msg_id=f"register-{name}-{registration}", actor=name,
                              dedupe_by_msg_id=True)
        return Agent(self, name, registration, caps, dict(labels or {}), runtime)

    async def _last(self, name: str) -> tuple[int, ev.Event | None]:
        subject = names.event_subject(self.swarm.name, "agent", name)
        raw = await self.log.last_message(self.log.stream, subject)
        if raw is None:
            return 0, None
        try:
            return int(raw.seq), ev.decode(bytes(raw.data or b""), subject)
        except CflowError:
            return int(raw.seq), None

    async def set_status(self, name: str, status: ev.AgentStatus, task_id: str | None = None,
                         *, reason: str = "", force: bool = False) -> bool:
        """Append ``AgentStatusChanged`` unless the agent is already in that state.

        Compare-and-set on the agent's subject, retried on conflict. ``force``
        appends even when the last event says the same (used to win a race with
        an observer that is marking the agent offline).

        Returns True if an event was appended.

        Raises:
            InvalidInput: unknown status or bad name.
        """
        ev.check_token(name, "agent name")
        if status not in STATUSES:
            raise InvalidInput(f"agent status must be one of {', '.join(STATUSES)}")
        for _ in range(10):
            seq, last = await self._last(name)
            if not force and last is not None:
                current = fold_agent(None, seq, last)
                if current.status == status and current.task_id == task_id:
                    return False
            try:
                await self.log.append(
                    ev.AgentStatusChanged(status=status, task_id=task_id, reason=reason),
                    name, expected=seq, actor=name)
                return True
            except ConcurrencyConflict:
                force = False  # someone wrote in between: decide again on what they wrote
                continue
        return False

    async def deregister(self, name: str, reason: str = "shutdown") -> None:
        await self.log.append(ev.AgentDeregistered(reason=reason), name, actor=name)

    async def mark_offline(self, name: str, reason: str = "presence expired") -> bool:
        """Record that ``name`` went away, once across all observers.

        Only when its presence key is not live and its last event does not
        already say offline. Returns True if this call recorded it.
        """
        seq, last = await self._last(name)
        if last is None:
            return False
        current = fold_agent(None, seq, last)
        if current.status == "offline":
            return False
        if _live(await self.log.kv_last(self.bucket, name)):
            return False
        try:
            appended = await self.log.append(
                ev.AgentStatusChanged(status="offline", reason=reason), name, expected=seq,
                msg_id=f"offline-{name}-{seq}", dedupe_by_msg_id=True)
        except ConcurrencyConflict:
            return False
        if not appended.duplicate:
            self.marked_offline += 1
        return not appended.duplicate

    # -------------------------------------------------------------------- reads

    async def _presence(self) -> dict[str, KvEntry]:
        return {e.key: e for e in await self.log.kv_keys(self.bucket)}

    async def list(self) -> list[AgentInfo]:
        """Every agent ever registered in the swarm, with live presence."""
        items = await self.log.read(names.events_filter(self.swarm.name, "agent"))
        agents = fold_agents((i.seq, i.event) for i in items if isinstance(i, StoredEvent))
        presence = await self._presence()
        return [replace(a, present=_live(presence.get(a.name)))
                for a in sorted(agents.values(), key=lambda a: a.name)]

    async def get(self, name: str) -> AgentInfo:
        """One agent, folded from its events.

        Raises:
            NotFound: no such agent.
        """
        ev.check_token(name, "agent name")
        items = await self.log.read(names.event_subject(self.swarm.name, "agent", name))
        state: AgentInfo | None = None
        for item in items:
            if isinstance(item, StoredEvent):
                state = fold_agent(state, item.seq, item.event)
        if state is None:
            raise NotFound("agent", name)
        return replace(state, present=_live(await self.log.kv_last(self.bucket, name)))

    # ------------------------------------------------------------ maintenance

    async def sweep(self) -> int:
        """Mark offline every agent that claims to be up but has no live presence."""
        marked = 0
        for agent in await self.list():
            if agent.status != "offline" and not agent.present:
                with contextlib.suppress(CflowError):
                    marked += await self.mark_offline(agent.name, "no presence")
        return marked

    async def maintain(self, *, sweep: bool = True) -> None:
        """Observe presence expiry until cancelled; runs inside ``swarm.tasks.maintain()``.

        Every server TTL marker in the presence bucket makes this observer record
        the agent offline (once across all observers). With ``sweep``, agents left
        online by a process that died while nobody watched are marked at start.
        NATS trouble is logged and the observer starts over; it never raises.
        """
        while True:
            try:
                await self._observe(sweep)
            except CflowError as exc:
                log.warning("presence observer restarting: %s", exc)
                await asyncio.sleep(1.0)  # NATS is away; nothing to wait on but time

    async def _observe(self, sweep: bool) -> None:
        # Subscribe before the sweep, so no expiry falls between the two.
        async with self.log.kv_entries(self.bucket) as entries:
            if sweep:
                try:
                    await self.sweep()
                except CflowError as exc:
                    log.warning("presence sweep failed: %s", exc)
            async for entry in entries:
                if entry.operation != "MARKER":
                    continue  # only the server's expiry says an agent went away
                try:
                    await self.mark_offline(entry.key)
                except CflowError as exc:
                    log.warning("marking %s offline failed: %s", entry.key, exc)


def capabilities_of(values: Sequence[str]) -> tuple[str, ...]:
    """Normalise repeated/comma-separated capability options."""
    out: set[str] = set()
    for value in values:
        out.update(v.strip() for v in value.split(",") if v.strip())
    return tuple(sorted(out))


__all__ = [
    "PRESENCE_RENEW_S",
    "PRESENCE_STATES",
    "PRESENCE_TTL_S",
    "Agent",
    "AgentInfo",
    "AgentService",
    "Presence",
    "capabilities_of",
    "fold_agent",
    "fold_agents",
    "presence_state",
]


async def presence_section(swarm: Any) -> dict[str, int]:
    """`cfctl status`: how many agents are in each presence state (live presence)."""
    board = await swarm.tasks.ensure_board()
    holders = {s.owner for s in board.claimed()}
    out = dict.fromkeys(PRESENCE_STATES, 0)
    for agent in await swarm.agents.list():
        out[presence_state(agent, agent.name in holders)] += 1
    return out
