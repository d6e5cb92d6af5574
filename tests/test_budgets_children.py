"""Children budgets hold under concurrent creators (issue 14, item 9).

Every creator reserves a slot on the parent's compare-and-set counter in the control
bucket before its ``TaskCreated`` is written, so ``max_children`` is never overshot.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from cflow.errors import LimitExceeded
from cflow.swarm import Swarm
from cflow.tasks import TaskState

pytestmark = pytest.mark.integration

SWARM_AGENT = "alice"


async def test_concurrent_creators_never_overshoot_max_children(
        nats_url: str, swarm_name: str, swarm: Swarm) -> None:
    parent = await swarm.tasks.create("plan")
    await swarm.control.set_budget(parent.task_id, {"max_children": 2})
    async with contextlib.AsyncExitStack() as stack:
        creators = [await stack.enter_async_context(
            Swarm.connect(nats_url, swarm=swarm_name, agent=f"c{i}")) for i in range(8)]
        for c in creators:  # warm caches, so the creates race each other, not the set-up
            await c.tasks.ensure_board()
            await c.control.ensure()
        outcomes = await asyncio.gather(
            *(c.tasks.create(f"sub-task by c{i}", parent_id=parent.task_id,
                             request_id=f"req-{i}")
              for i, c in enumerate(creators)),
            return_exceptions=True)
        created = [o for o in outcomes if isinstance(o, TaskState)]
        refused = [o for o in outcomes if not isinstance(o, TaskState)]
        assert len(created) == 2, outcomes
        assert len(refused) == 6 and all(isinstance(e, LimitExceeded) for e in refused), refused
        assert all("max_children" in str(e) and parent.task_id in str(e) for e in refused)

        # A retry of a creation that was counted does not count again; a refused one
        # stays refused.
        winner = outcomes.index(created[0])
        again = await creators[winner].tasks.create(
            f"sub-task by c{winner}", parent_id=parent.task_id, request_id=f"req-{winner}")
        assert again.task_id == created[0].task_id
        loser = outcomes.index(refused[0])
        with pytest.raises(LimitExceeded, match="max_children"):
            await creators[loser].tasks.create(
                f"sub-task by c{loser}", parent_id=parent.task_id, request_id=f"req-{loser}")

    children = [s for s in await swarm.tasks.list() if s.parent_id == parent.task_id]
    assert sorted(s.task_id for s in children) == sorted(s.task_id for s in created)
