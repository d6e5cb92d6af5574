"""A budget's pause is attributed to the budget and the agent whose claim went over it,
not to whichever process noticed; the claim over the limit is refused, the one at it is
not (issue 18)."""

from __future__ import annotations

import pytest

from cflow import events as ev
from cflow.errors import Paused
from cflow.streams import StoredEvent
from cflow.swarm import Swarm

pytestmark = pytest.mark.integration


async def test_the_claim_over_the_budget_is_refused_and_named(
        nats_url: str, swarm_name: str) -> None:
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="admin") as admin, \
            Swarm.connect(nats_url, swarm=swarm_name, agent="w7") as worker:
        for i in range(3):
            await admin.tasks.create(f"job {i}")
        await admin.control.set_budget("swarm", {"max_attempts": 2, "window_s": 600})
        await worker.control.ensure()
        for _ in range(2):  # up to the limit: claimed
            lease = await worker.tasks.claim()
            assert lease is not None
            await lease.complete()
        with pytest.raises(Paused, match="max_attempts"):
            await worker.tasks.claim()  # the third: refused before it is written
        items = await admin.log.read()
        events = [i.event for i in items if isinstance(i, StoredEvent)]
        claims = [e for e in events if isinstance(e.data, ev.TaskClaimed)]
        assert len(claims) == 2
        paused = [e for e in events if isinstance(e.data, ev.SwarmPaused)]
        assert [e.actor for e in paused] == ["budget:w7"]


async def test_a_pause_noticed_by_maintenance_names_the_claimer(
        nats_url: str, swarm_name: str) -> None:
    """A claim no guard counted (its claimer had not seen the budget yet) is counted by
    whichever process maintains the swarm; the pause names the claimer, not it."""
    from cflow.streams.client import wall_ms

    async with Swarm.connect(nats_url, swarm=swarm_name, agent="projector-x") as maint:
        task = await maint.tasks.create("job")
        await maint.control.set_budget("swarm", {"max_attempts": 1, "window_s": 600})
        view = await maint.control.ensure()
        assert view.budget("swarm")
        for n in (1, 2):  # two observed claims of w7, one over the budget
            await maint.control._count_claim(task.task_id, f"{task.task_id}:{n}", wall_ms(),
                                             live=True, owner="w7")
        items = await maint.log.read()
        paused = [i.event for i in items
                  if isinstance(i, StoredEvent) and isinstance(i.event.data, ev.SwarmPaused)]
        assert [e.actor for e in paused] == ["budget:w7"]
