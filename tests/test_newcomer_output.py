"""What a newcomer following the README reads: human words, not internal names."""

from __future__ import annotations

import pytest

from cflow.errors import InvalidState
from cflow.hooks import Held, briefing, stop_reminder
from cflow.swarm import Swarm


def test_briefing_and_reminder_use_real_plurals() -> None:
    one = briefing("a", "s", [], ready=1, gates=1)
    assert "1 task ready to claim, 1 gate waiting" in one
    many = briefing("a", "s", [], ready=3, gates=2)
    assert "3 tasks ready to claim, 2 gates waiting" in many
    assert "(s)" not in one + many
    assert "hold cflow task t1 " in stop_reminder([Held("t1", 1, "x")])
    assert "hold cflow tasks t1 " in stop_reminder([Held("t1", 1, "x"), Held("t2", 1, "y")])


@pytest.mark.integration
@pytest.mark.parametrize(("first", "second", "said"), [
    ("approve", "reject", "not rejected"), ("reject", "approve", "not approved")])
async def test_a_decided_gate_says_the_past_tense(swarm: Swarm, first: str, second: str,
                                                  said: str) -> None:
    gate = await swarm.tasks.create("review", kind="gate")
    await getattr(swarm.control, first)(gate.task_id, "first")
    with pytest.raises(InvalidState, match=f"; {said}$"):
        await getattr(swarm.control, second)(gate.task_id, "second")
