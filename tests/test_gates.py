"""Human gates: a gate blocks its dependents until a human approves or rejects it."""

from __future__ import annotations

import asyncio

import pytest

from cflow.errors import InvalidState
from cflow.swarm import Swarm
from cflow.tasks import TaskState

pytestmark = pytest.mark.integration


SWARM_AGENT = "agent-1"  # the conftest `swarm` fixture acts as this agent


async def settled(swarm: Swarm, task_id: str, status: str, within: float = 10.0) -> TaskState:
    svc = swarm.tasks
    await svc.ensure_board()

    def ok() -> bool:
        state = svc.board.get(task_id)
        return state is not None and state.status == status

    async with svc._changed:
        await asyncio.wait_for(svc._changed.wait_for(ok), within)
    state = svc.board.get(task_id)
    assert state is not None
    return state


async def test_gate_blocks_dependents_until_approved(swarm: Swarm) -> None:
    build = await swarm.tasks.create("write the skill")
    gate = await swarm.tasks.create("review the skill", kind="gate", depends_on=[build.task_id])
    promote = await swarm.tasks.create("promote the skill", depends_on=[gate.task_id])
    pending = await swarm.control.pending_gates()
    assert [(g["task_id"], g["waiting_for_deps"]) for g in pending] == [(gate.task_id, True)]
    with pytest.raises(InvalidState, match="waits for its dependencies"):
        await swarm.control.approve(gate.task_id)

    lease = await swarm.tasks.claim()
    assert lease is not None and lease.task_id == build.task_id
    await lease.complete("written")
    await settled(swarm, gate.task_id, "ready")
    # Agents never get the gate, nor what waits behind it.
    assert await swarm.tasks.claim() is None
    with pytest.raises(InvalidState, match="gate"):
        await swarm.tasks.claim(gate.task_id)
    assert (await swarm.tasks.get(promote.task_id)).status == "pending"
    assert [g["waiting_for_deps"] for g in await swarm.control.pending_gates()] == [False]

    approved = await swarm.control.approve(gate.task_id, "looks good", actor="alice")
    assert approved.status == "completed" and approved.result == "looks good"
    last = (await swarm.tasks.history(gate.task_id))[-1].event
    assert last.type == "TaskCompleted" and last.actor == "alice"
    await settled(swarm, promote.task_id, "ready")
    lease = await swarm.tasks.claim()
    assert lease is not None and lease.task_id == promote.task_id
    assert await swarm.control.pending_gates() == []
    with pytest.raises(InvalidState, match="already completed"):
        await swarm.control.reject(gate.task_id, "too late")


async def test_rejected_gate_blocks_dependents_with_the_reason(swarm: Swarm) -> None:
    gate = await swarm.tasks.create("merge?", kind="gate")
    merge = await swarm.tasks.create("merge the branch", depends_on=[gate.task_id])
    after = await swarm.tasks.create("deploy", depends_on=[merge.task_id])
    rejected = await swarm.control.reject(gate.task_id, "tests are flaky", actor="bob")
    assert rejected.status == "failed" and rejected.error == "rejected: tests are flaky"
    blocked = await settled(swarm, merge.task_id, "blocked")
    assert blocked.reason == f"gate {gate.task_id} rejected: tests are flaky"
    await settled(swarm, after.task_id, "blocked")
    last = (await swarm.tasks.history(gate.task_id))[-1].event
    assert last.type == "TaskFailed" and last.actor == "bob"
    assert await swarm.tasks.claim() is None


async def test_only_gates_are_approved(swarm: Swarm) -> None:
    task = await swarm.tasks.create("ordinary")
    with pytest.raises(InvalidState, match="not a gate"):
        await swarm.control.approve(task.task_id)


async def test_approve_racing_reject_stores_one_decision_and_only_it_acts(
        nats_url: str, swarm_name: str, swarm: Swarm) -> None:
    """Approve and reject of one gate from two processes at once: exactly one decision is
    stored, its dependent follows that decision, and the loser is told which one won."""
    from support import until

    async with Swarm.connect(nats_url, swarm=swarm_name, agent="alice") as alice, \
            Swarm.connect(nats_url, swarm=swarm_name, agent="bob") as bob:
        for s in (alice, bob):
            await s.tasks.ensure_board()
        pairs = []
        for i in range(20):
            gate = await swarm.tasks.create(f"gate {i}", kind="gate")
            dep = await swarm.tasks.create(f"after gate {i}", depends_on=[gate.task_id])
            pairs.append((gate.task_id, dep.task_id))
        for gate_id, dep_id in pairs:
            outcomes = await asyncio.gather(
                alice.control.approve(gate_id, "ship it"),
                bob.control.reject(gate_id, "not yet"),
                return_exceptions=True)
            won = [o for o in outcomes if isinstance(o, TaskState)]
            lost = [o for o in outcomes if not isinstance(o, TaskState)]
            assert len(won) == 1 and len(lost) == 1, outcomes
            assert isinstance(lost[0], InvalidState), lost[0]
            history = [s.event for s in await swarm.tasks.history(gate_id)]
            decisions = [e for e in history if e.type in ("TaskCompleted", "TaskFailed")]
            assert len(decisions) == 1, [e.type for e in history]
            decision = decisions[0]
            if decision.type == "TaskCompleted":
                assert won[0].status == "completed" and decision.actor == "alice"
                assert "approved by alice" in str(lost[0])
                await until(swarm, dep_id, lambda s: s.status == "ready")
            else:
                assert won[0].status == "failed" and decision.actor == "bob"
                assert "rejected by bob" in str(lost[0])
                await until(swarm, dep_id, lambda s: s.status == "blocked")
            dep = await swarm.tasks.get(dep_id)
            assert dep.status == ("ready" if decision.type == "TaskCompleted" else "blocked")
            dep_events = [s.event.type for s in await swarm.tasks.history(dep_id)]
            assert dep_events.count("TaskReady") + dep_events.count("TaskBlocked") == 1
