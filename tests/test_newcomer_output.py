"""What a newcomer following the README reads: human words, not internal names."""

from __future__ import annotations

import pytest

from cflow.errors import InvalidState
from cflow.swarm import Swarm


@pytest.mark.integration
@pytest.mark.parametrize(("first", "second", "said"), [
    ("approve", "reject", "not rejected"), ("reject", "approve", "not approved")])
async def test_a_decided_gate_says_the_past_tense(swarm: Swarm, first: str, second: str,
                                                  said: str) -> None:
    gate = await swarm.tasks.create("review", kind="gate")
    await getattr(swarm.control, first)(gate.task_id, "first")
    with pytest.raises(InvalidState, match=f"; {said}$"):
        await getattr(swarm.control, second)(gate.task_id, "second")
