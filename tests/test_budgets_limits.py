"""Attempts and spend budgets are checked before the claim, from shared counters
(issue 14, item 9)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest

from cflow.control import ControlView
from cflow.errors import Paused
from cflow.swarm import Swarm
from support import maintained

pytestmark = pytest.mark.integration

SWARM_AGENT = "alice"


async def view_until(swarm: Swarm, ok: Callable[[ControlView], bool],
                     within: float = 10.0) -> ControlView:
    async def wait() -> ControlView:
        async for view in swarm.control.watch():
            if ok(view):
                return view
        raise AssertionError("watch ended")

    return await asyncio.wait_for(wait(), within)


async def test_attempt_reservations_are_atomic_and_idempotent(
        nats_url: str, swarm_name: str, swarm: Swarm) -> None:
    parent = await swarm.tasks.create("plan")
    children = [await swarm.tasks.create(f"step {i}", parent_id=parent.task_id)
                for i in range(8)]
    await swarm.control.set_budget(parent.task_id, {"max_attempts": 2, "window_s": 600})
    async with contextlib.AsyncExitStack() as stack:
        claimers = [await stack.enter_async_context(
            Swarm.connect(nats_url, swarm=swarm_name, agent=f"w{i}")) for i in range(8)]
        for c in claimers:
            await c.tasks.ensure_board()
            await c.control.ensure()
        outcomes = await asyncio.gather(
            *(c.control.reserve_attempt(child) for c, child in zip(claimers, children,
                                                                    strict=True)),
            return_exceptions=True)
    granted = [i for i, o in enumerate(outcomes) if o == [parent.task_id]]
    refused = [o for o in outcomes if isinstance(o, Paused)]
    assert len(granted) == 2 and len(refused) == 6, outcomes
    assert all("max_attempts" in str(e) for e in refused)
    view = await view_until(swarm, lambda v: len(v.attempts(parent.task_id).claims) == 2)
    assert view.scope(parent.task_id).mode == "paused"
    # The same claim reserved again is not counted twice; a refund frees its slot.
    again = children[granted[0]]
    assert await swarm.control.reserve_attempt(again) == [parent.task_id]
    await swarm.control.refund_attempt(again)
    await view_until(swarm, lambda v: len(v.attempts(parent.task_id).claims) == 1)


async def test_a_reserved_claim_is_counted_once_by_maintenance(
        nats_url: str, swarm_name: str, swarm: Swarm) -> None:
    await swarm.control.set_budget("swarm", {"max_attempts": 5, "window_s": 600})
    first = await swarm.tasks.create("first")
    second = await swarm.tasks.create("second")
    async with maintained(nats_url, swarm_name, "maintainer"):
        await swarm.control.reserve_attempt(first)  # what the claim path does first
        lease = await swarm.tasks.claim(first.task_id)
        assert lease is not None
        lease2 = await swarm.tasks.claim(second.task_id)  # a claimer that did not reserve
        assert lease2 is not None
        # The maintainer folds claims in order: once it counted the second, it has seen
        # the first, which it found reserved under the same claim id.
        view = await view_until(swarm, lambda v: any(
            c.startswith(second.task_id) for c, _ in v.attempts("swarm").claims))
    assert sorted(c.split("@")[0] for c, _ in view.attempts("swarm").claims) == sorted(
        [first.task_id, second.task_id])


async def test_spend_budget_refuses_claims_once_reached(
        nats_url: str, swarm_name: str, swarm: Swarm) -> None:
    """A process that runs no maintenance (a CLI-only claimer) refuses new work under a
    scope whose reported spend reached its budget, before any claim is written."""
    parent = await swarm.tasks.create("costly plan")
    first = await swarm.tasks.create("first", parent_id=parent.task_id)
    second = await swarm.tasks.create("second", parent_id=parent.task_id)
    unrelated = await swarm.tasks.create("unrelated")
    await swarm.control.set_budget(parent.task_id, {"max_spend_usd": 1.0})
    async with maintained(nats_url, swarm_name, "maintainer"), \
            Swarm.connect(nats_url, swarm=swarm_name, agent="cli") as cli:
        lease = await cli.tasks.claim(first.task_id)
        assert lease is not None
        await lease.complete("done", cost_usd=1.0)
        await view_until(cli, lambda v: v.spend(parent.task_id).spent == 1.0)
        with pytest.raises(Paused, match=r"max_spend_usd .* reached: 1 of 1"):
            await cli.tasks.claim(second.task_id)
        lease = await cli.tasks.claim()  # other work goes on
        assert lease is not None and lease.task_id == unrelated.task_id
        await lease.complete()
        assert await cli.tasks.claim() is None
    assert (await swarm.tasks.get(second.task_id)).status == "ready"
