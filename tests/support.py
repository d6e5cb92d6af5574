"""Helpers shared by integration tests (imported as `support`; pytest puts tests/ on the path)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from cflow.background import stop_tasks
from cflow.swarm import Swarm
from cflow.tasks import TaskState


@contextlib.asynccontextmanager
async def maintained(nats_url: str, swarm_name: str, agent: str = "reaper"
                     ) -> AsyncIterator[Swarm]:
    """Another long-lived participant running maintenance (reaper + readiness + hooks)."""
    async with Swarm.connect(nats_url, swarm=swarm_name, agent=agent) as s:
        task = asyncio.create_task(s.tasks.maintain())
        try:
            await s.tasks.ensure_board()
            yield s
        finally:
            await stop_tasks([task])


async def until(swarm: Swarm, task_id: str, predicate: Callable[[TaskState], bool],
                within: float = 20.0) -> TaskState:
    """Await a task state through the board's push updates (no polling)."""
    svc = swarm.tasks
    await svc.ensure_board()

    def ok() -> bool:
        state = svc.board.get(task_id)
        return state is not None and predicate(state)

    async with svc._changed:
        await asyncio.wait_for(svc._changed.wait_for(ok), within)
    state = svc.board.get(task_id)
    assert state is not None
    return state
