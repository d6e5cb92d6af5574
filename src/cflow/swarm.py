"""The async facade every interface uses: ``async with Swarm.connect(...) as swarm``.

CLI commands, the MCP adapter and the worker runtime all go through this class;
none of them touches NATS directly. Services hang off it as attributes:
``swarm.tasks`` (claim path), ``swarm.control``, ``swarm.agents``,
``swarm.reservations``, ``swarm.memory``, ``swarm.messages``.

``Swarm`` is the composition root: it builds each service (lazily, on first use,
so a ``cfctl`` command or the MCP adapter imports only what it needs) and hands it
what it needs: the process's one task feed (:mod:`cflow.feed`) to the services that
follow task events, control's guards to the claim and create paths, control's
"state changed" to the claimers' wake-up. The maintainers that every long-lived
process runs inside ``swarm.tasks.maintain()`` are listed once, here.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from cflow.events import check_token
from cflow.feed import TaskFeed
from cflow.streams import EventLog, connect, ensure_swarm
from cflow.streams.client import DEFAULT_URL

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from cflow import events as ev
    from cflow.agents import AgentService
    from cflow.control import ControlService
    from cflow.leases import TaskService
    from cflow.memory import MemoryService
    from cflow.messages import MessageService
    from cflow.projections.query import QueryResult
    from cflow.reservations import ReservationService


def default_agent() -> str:
    return os.environ.get("CFLOW_AGENT") or f"{socket.gethostname()}-{os.getpid()}"


class Swarm:
    """One connection to one swarm, acting as one agent (``actor`` on every event)."""

    def __init__(self, nc: NATS, swarm: str, *, agent: str) -> None:
        self.nc = nc
        self.name = swarm
        self.agent = agent
        self.log = EventLog(nc, swarm, actor=agent, node=f"{agent}@{socket.gethostname()}")
        # One follower of the task events per process, shared by the board, control
        # and reservations.
        self.feed = TaskFeed(self.log)
        self._tasks: TaskService | None = None
        self._agents: AgentService | None = None
        self._control: ControlService | None = None
        # What may refuse a creation (budgets), before the TaskCreated is written.
        self.create_guards: list[Callable[..., Awaitable[None]]] = [self._budget_create_guard]
        # Every long-lived process runs these inside `tasks.maintain()` (supervised):
        # control (breakers, attempts and spend budgets), reservations of finished
        # tasks, agents whose presence expired. Callers may add their own.
        self.maintenance_hooks: list[Callable[[], Awaitable[None]]] = [
            self._maintain_control, self._maintain_reservations, self._maintain_presence]
        self._memory: MemoryService | None = None
        self._messages: MessageService | None = None
        self._reservations: ReservationService | None = None

    def on_reconnect(self) -> None:
        """The connection came back after an outage: wake what waited on it."""
        if self._tasks is not None:
            self._tasks.offers.reconnected()

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        swarm: str = "default",
        agent: str | None = None,
        ensure: bool = True,
        replicas: int = 1,
        connect_timeout: float = 2.0,
    ) -> AsyncIterator[Swarm]:
        """Connect, create the swarm's streams and buckets if needed, and yield the facade.

        Raises:
            Unavailable: no NATS server reachable.
            InvalidInput: a swarm name that is not a subject token.
        """
        check_token(swarm, "swarm")
        made: list[Swarm] = []

        async def reconnected() -> None:
            # Whatever waited on the old connection (claimers waiting for offers,
            # a pull whose answer died with it) looks again at once.
            for facade_ in made:
                facade_.on_reconnect()

        nc = await connect(url, name=f"cflow:{agent or default_agent()}",
                           connect_timeout=connect_timeout, reconnected_cb=reconnected)
        try:
            if ensure:
                await ensure_swarm(nc, swarm, replicas)
            facade = cls(nc, swarm, agent=agent or default_agent())
            made.append(facade)
            try:
                yield facade
            finally:
                await facade.aclose()
        finally:
            await close_quietly(nc)

    @property
    def tasks(self) -> TaskService:
        if self._tasks is None:
            from cflow.leases import TaskService

            control = self.control
            # Pause, budgets and breakers guard every claim; the board follows the feed.
            self._tasks = TaskService(self, feed=self.feed, claim_guards=[control.claim_guard],
                                      claim_filters=[control.claim_filter])
        return self._tasks

    @property
    def control(self) -> ControlService:
        if self._control is None:
            from cflow.control import ControlService

            self._control = ControlService(self, feed=self.feed,
                                           on_change=self._control_changed)
        return self._control

    @property
    def agents(self) -> AgentService:
        if self._agents is None:
            from cflow.agents import AgentService

            self._agents = AgentService(self)
        return self._agents

    @property
    def memory(self) -> MemoryService:
        if self._memory is None:
            from cflow.memory import MemoryService

            self._memory = MemoryService(self)
        return self._memory

    @property
    def messages(self) -> MessageService:
        if self._messages is None:
            from cflow.messages import MessageService

            self._messages = MessageService(self)
        return self._messages

    @property
    def reservations(self) -> ReservationService:
        if self._reservations is None:
            from cflow.reservations import ReservationService

            self._reservations = ReservationService(self, feed=self.feed)
        return self._reservations

    # The wiring between services: small named steps, so that neither service reaches
    # into the other and each is built only when it is first needed.

    async def _budget_create_guard(self, data: ev.TaskCreated, task_id: str) -> None:
        await self.control.create_guard(data, task_id)

    async def _control_changed(self) -> None:
        """Control state moved (resume, breaker closed): wake waiting claimers."""
        if self._tasks is not None:
            await self._tasks.poke()

    async def _maintain_control(self) -> None:
        await self.control.maintain()

    async def _maintain_reservations(self) -> None:
        await self.reservations.maintain()

    async def _maintain_presence(self) -> None:
        await self.agents.maintain()

    def maintenance_health(self) -> dict[str, object] | None:
        """This process's maintenance loop health, if it runs one (metrics)."""
        if self._tasks is None:
            return None
        return {"reaped": self._tasks.reaped, **self._tasks.health.to_dict()}

    async def query(self, sql: str, *, limit: int = 1000, wait_for_seq: int | None = None,
                    timeout_s: float = 10.0, fallback: bool = False) -> QueryResult:
        """Read-only SQL on the swarm's DuckDB projection, through the query service.

        Raises:
            QueryRejected: not a pure read. LimitExceeded: time limit or size.
            Unavailable: no projector is serving the swarm.
        """
        from cflow.projections.query import QueryClient

        return await QueryClient(self.nc, self.name).query(
            sql, limit=limit, wait_for_seq=wait_for_seq, timeout_s=timeout_s, fallback=fallback)

    async def aclose(self) -> None:
        if self._control is not None:
            await self._control.aclose()
        if self._tasks is not None:
            await self._tasks.aclose()
        if self._messages is not None:
            await self._messages.aclose()
        await self.feed.aclose()


CLOSE_S = 2.0  # closing never waits longer than this on a server that is gone


async def close_quietly(nc: NATS) -> None:
    """Close ``nc``, bounded, and without raising when its server is gone.

    nats-py flushes what is pending before it closes; with the server gone that
    flush fails (``ConnectionResetError``) or waits. Either way the connection is
    closed and nothing is left to deliver, so the failure is no news to the caller.
    """
    import asyncio

    import nats.errors

    with contextlib.suppress(OSError, TimeoutError, nats.errors.Error):
        await asyncio.wait_for(nc.close(), CLOSE_S)
