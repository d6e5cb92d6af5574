"""The adapter process as an agent: identity, held leases, background liveness.

One ``Adapter`` per ``cfctl mcp`` process. It *is* the agent: every claim it
makes is in its name, and while the process lives it

* keeps each claimed lease alive (``lease.keep_alive()`` per lease),
* keeps its presence alive (the agent registry's ``present()``, when that
  service exists in this build),
* runs ``swarm.tasks.maintain()``: every long-lived process is a reaper.

When the process goes away (stdin closed, parent gone, kill -9) nothing is
released on purpose: the heartbeats stop and the leases expire server-side, so
another agent can reclaim the work after one TTL. A clean ``release`` is the
model's decision (``task_update action=release``), never a side effect of exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from cflow.background import stop_tasks as cancel_all
from cflow.errors import CflowError

if TYPE_CHECKING:
    from cflow.agents import Agent
    from cflow.leases import Lease
    from cflow.mcp.channel import Channel
    from cflow.reservations import Reservation
    from cflow.swarm import Swarm

log = logging.getLogger("cflow.mcp")

IDEMPOTENCY_CACHE = 1024  # remembered (tool, key) results per process
# A client that stays this long (or calls a tool) is a session, not a health check
# (`claude mcp list` connects and leaves): only then is the agent registered.
ENGAGE_AFTER_S = 10.0


class Adapter:
    """State shared by the tools of one MCP server: the swarm, the agent, its leases."""

    def __init__(self, swarm: Swarm, *, capabilities: Sequence[str] = (),
                 labels: dict[str, str] | None = None) -> None:
        self.swarm = swarm
        self.agent = swarm.agent
        self.capabilities = sorted(set(capabilities))
        self.labels = dict(labels or {})
        self.leases: dict[str, Lease] = {}
        self._keepers: dict[str, asyncio.Task[None]] = {}
        self._background: list[asyncio.Task[None]] = []
        self._done: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.registered = False
        self._agent_handle: Agent | None = None
        self.channel: Channel | None = None  # pushes into a Claude Code session, if any
        self._engage_lock = asyncio.Lock()

    # ------------------------------------------------------------ idempotency

    def remembered(self, tool: str, key: str | None) -> Any:
        """The result of an earlier call of ``tool`` with idempotency ``key`` in this process."""
        if not key:
            return None
        return self._done.get((tool, key))

    def remember(self, tool: str, key: str | None, result: Any) -> Any:
        if key:
            self._done[(tool, key)] = result
            while len(self._done) > IDEMPOTENCY_CACHE:
                self._done.popitem(last=False)
        return result

    # ----------------------------------------------------------------- leases

    def hold(self, lease: Lease) -> None:
        """Keep ``lease`` alive in the background until it is finished, lost, or we exit."""
        self.drop(lease.task_id)
        self.leases[lease.task_id] = lease

        def lost(held: Lease) -> None:
            if held.lost.is_set():
                log.warning("lease on %s (epoch %s) lost: %s", held.task_id, held.epoch,
                            held.lost_reason)
                if self.channel is not None:
                    self.channel.lease_lost(held)

        async def keep() -> None:
            async with lease.keep_alive(on_lost=lost):
                await lease.lost.wait()

        self._keepers[lease.task_id] = asyncio.create_task(keep(), name=f"keep-{lease.task_id}")

    def drop(self, task_id: str) -> None:
        """Stop heartbeating ``task_id`` (finished, released or cancelled by us)."""
        self.leases.pop(task_id, None)
        keeper = self._keepers.pop(task_id, None)
        if keeper is not None:
            keeper.cancel()

    def keep_reservation(self, reservation: Reservation) -> None:
        """Renew a path reservation in the background while this process lives."""
        svc = self.swarm.reservations

        async def keep() -> None:
            lost = asyncio.Event()
            async with svc.keep_alive(reservation, on_lost=lambda _: lost.set()):
                await lost.wait()

        self._keepers[f"res:{reservation.id}"] = asyncio.create_task(
            keep(), name=f"keep-res-{reservation.id}")

    def drop_reservation(self, reservation_id: str) -> None:
        keeper = self._keepers.pop(f"res:{reservation_id}", None)
        if keeper is not None:
            keeper.cancel()

    def held(self, task_id: str) -> Lease | None:
        """Our lease on ``task_id`` (possibly lost: the caller then learns it)."""
        return self.leases.get(task_id)

    # ------------------------------------------------------------- background

    async def register(self) -> None:
        """Register the agent, if this build has the agent registry.

        Raises:
            CflowError: the registry refused or is unreachable.
        """
        try:
            agents = self.swarm.agents
        except ImportError:
            log.info("agent registry not available; running unregistered as %s", self.agent)
            return
        self._agent_handle = await agents.register(self.agent, self.capabilities, self.labels,
                                                   runtime="mcp")

    async def _presence(self) -> None:
        if self._agent_handle is None:
            return
        async with self._agent_handle.present():
            await asyncio.Event().wait()  # until the adapter stops

    async def _maintain(self) -> None:
        await _restarting("task maintenance", self.swarm.tasks.maintain)

    def _spawn(self, fn: Callable[[], Awaitable[None]], name: str) -> None:
        async def guarded() -> None:
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except CflowError as exc:
                log.warning("%s stopped: %s", name, exc)

        self._background.append(asyncio.create_task(guarded(), name=name))

    async def engage(self) -> None:
        """Register and start presence, once: on the first tool call or after a while.

        Raises:
            CflowError: the registry refused or is unreachable (the next call retries).
        """
        if self.registered:
            return
        async with self._engage_lock:
            if self.registered:
                return
            await self.register()
            self.registered = True
            self._spawn(self._presence, "presence")
            if self.channel is not None:
                self._spawn(self.channel.run, "channel")

    async def _engage_later(self, after_s: float) -> None:
        await asyncio.sleep(after_s)
        await self.engage()

    @contextlib.asynccontextmanager
    async def running(self, *, engage_after_s: float | None = 0.0) -> AsyncIterator[Adapter]:
        """Run maintenance, presence and lease keepers until the block exits.

        The agent registers (and shows presence) after ``engage_after_s``, or at the
        first tool call, whichever is first (None: only at a tool call). Leaving the
        block stops the heartbeats without releasing anything.
        """
        if engage_after_s == 0.0:
            await self.engage()
        elif engage_after_s is not None:
            self._spawn(lambda: self._engage_later(engage_after_s), "engage")
        # Task maintenance supervises the swarm's maintainers, the presence
        # observer among them: it is not started a second time here.
        self._spawn(self._maintain, "maintain")
        try:
            yield self
        finally:
            await self.stop()

    async def stop(self) -> None:
        tasks = [*self._background, *self._keepers.values()]
        self._background.clear()
        self._keepers.clear()
        await cancel_all(tasks)


async def _restarting(what: str, loop: Callable[[], Awaitable[None]]) -> None:
    """Run a long-lived loop; if it stops on one of our errors, log and start it again."""
    while True:
        try:
            await loop()
            return
        except CflowError as exc:
            log.warning("%s stopped (%s); restarting", what, exc)
        await asyncio.sleep(1.0)  # back off before restarting


def default_labels(project_dir: str | None = None) -> dict[str, str]:
    """Labels an MCP agent carries: host, pid, parent pid, project and Claude session."""
    labels = {
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "ppid": str(os.getppid()),
        "project": project_dir or os.environ.get("CLAUDE_PROJECT_DIR") or os.getcwd(),
    }
    sid = os.environ.get("CLAUDE_CODE_SESSION_ID")
    if sid:
        labels["claude_session"] = sid
    return labels


__all__ = ["Adapter", "default_labels"]
