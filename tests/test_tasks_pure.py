"""The task state machine and board, without I/O."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cflow import events as ev
from cflow.errors import DependencyError, InvalidInput, InvalidState
from cflow.hlc import HybridClock
from cflow.tasks import (
    TRANSITIONS,
    RetryPolicy,
    TaskBoard,
    apply,
    check_acyclic,
    fold,
    validate_create,
)

CLOCK = HybridClock("test")
_wall = itertools.count(1_700_000_000_000, 10)


def e(data: ev.EventData, task: str = "t1", actor: str = "a") -> ev.Event:
    return ev.make_event(data, swarm="s", entity_id=task, hlc=str(CLOCK.now(next(_wall))),
                         actor=actor)


SAMPLES: dict[str, ev.EventData] = {
    "TaskCreated": ev.TaskCreated(title="x"),
    "TaskReady": ev.TaskReady(),
    "TaskBlocked": ev.TaskBlocked(reason="dep failed"),
    "TaskClaimed": ev.TaskClaimed(owner="w", attempt=1, lease_ttl_s=5),
    "TaskLeaseExpired": ev.TaskLeaseExpired(epoch=2, owner="w"),
    "TaskRequeued": ev.TaskRequeued(attempt=1),
    "TaskCompleted": ev.TaskCompleted(epoch=2),
    "TaskFailed": ev.TaskFailed(epoch=2, error="boom", final=True),
    "TaskReleased": ev.TaskReleased(epoch=2),
    "TaskCancelled": ev.TaskCancelled(),
}


def state_in(status: str) -> object:
    """A task in ``status``, built through the machine itself (epoch 2 when claimed)."""
    deps = ("d",) if status in ("pending", "blocked") else ()
    created = ev.TaskCreated(title="x", depends_on=deps)
    s = apply(None, e(created), 1)
    path = {
        "pending": [],
        "ready": [],
        "blocked": [SAMPLES["TaskBlocked"]],
        "claimed": [SAMPLES["TaskClaimed"]],
        "expired": [SAMPLES["TaskClaimed"], SAMPLES["TaskLeaseExpired"]],
        "completed": [SAMPLES["TaskClaimed"], SAMPLES["TaskCompleted"]],
        "failed": [SAMPLES["TaskClaimed"], SAMPLES["TaskFailed"]],
        "cancelled": [SAMPLES["TaskCancelled"]],
    }[status]
    for seq, data in enumerate(path, start=2):
        s = apply(s, e(data), seq)
    assert s.status == status
    return s


@pytest.mark.parametrize("status", ["pending", "ready", "claimed", "expired", "completed",
                                    "failed", "blocked", "cancelled"])
@pytest.mark.parametrize("event_type", sorted(SAMPLES))
def test_every_state_and_event_pair(status: str, event_type: str) -> None:
    state = state_in(status)
    event = e(SAMPLES[event_type])
    gate_only = status == "ready" and event_type in ("TaskCompleted", "TaskFailed")
    if (status, event_type) in TRANSITIONS and not gate_only:
        after = apply(state, event, 99)  # type: ignore[arg-type]
        assert after.seq == 99
        assert after.status in TRANSITIONS[(status, event_type)].split("|")
    else:
        with pytest.raises(InvalidState):
            apply(state, event, 99)  # type: ignore[arg-type]


def test_a_gate_is_decided_without_a_claim() -> None:
    gate = apply(None, e(ev.TaskCreated(title="review", kind="gate")), 1)
    assert gate.status == "ready" and not gate.claimable_by((), 0)
    assert apply(gate, e(ev.TaskCompleted(epoch=0, result="lgtm")), 2).status == "completed"
    assert apply(gate, e(ev.TaskFailed(epoch=0, error="no", final=True)), 2).status == "failed"


def test_stale_epoch_is_refused() -> None:
    state = state_in("claimed")
    with pytest.raises(InvalidState, match="epoch 7"):
        apply(state, e(ev.TaskCompleted(epoch=7)), 3)  # type: ignore[arg-type]


def test_claim_sets_epoch_to_its_sequence_and_release_refunds_attempt() -> None:
    s = fold([(1, e(ev.TaskCreated(title="x"))),
              (5, e(ev.TaskClaimed(owner="w", attempt=1, lease_ttl_s=3)))])
    assert s is not None and s.epoch == 5 and s.attempt == 1 and s.owner == "w"
    s = apply(s, e(ev.TaskReleased(epoch=5)), 6)
    assert s.status == "ready" and s.attempt == 0 and s.owner is None


def test_retry_policy() -> None:
    p = RetryPolicy(1.0, 2.0, 5.0)
    assert [p.delay_s(a) for a in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_validate_create() -> None:
    with pytest.raises(InvalidInput, match="lease TTL"):
        validate_create(ev.TaskCreated(title="x", lease_ttl_s=0.5))
    with pytest.raises(InvalidInput, match="title"):
        validate_create(ev.TaskCreated(title=" "))
    with pytest.raises(InvalidInput, match="attempts"):
        validate_create(ev.TaskCreated(title="x", max_attempts=0))


def test_cycles_are_refused() -> None:
    check_acyclic({"a": ("b",), "b": ("c",), "c": ()})
    with pytest.raises(DependencyError, match="a -> b -> c -> a"):
        check_acyclic({"a": ("b",), "b": ("c",), "c": ("a",)})


@given(st.dictionaries(st.sampled_from("abcdef"), st.lists(st.sampled_from("abcdef"), max_size=3)))
def test_acyclic_check_agrees_with_topological_sort(raw: dict[str, list[str]]) -> None:
    edges = {k: tuple(v) for k, v in raw.items()}
    import graphlib

    try:
        list(graphlib.TopologicalSorter(edges).static_order())
        has_cycle = False
    except graphlib.CycleError:
        has_cycle = True
    if has_cycle:
        with pytest.raises(DependencyError):
            check_acyclic(edges)
    else:
        check_acyclic(edges)


def test_board_orders_by_priority_then_age_and_filters_capabilities() -> None:
    board = TaskBoard()
    board.apply(1, e(ev.TaskCreated(title="low"), "t1"))
    board.apply(2, e(ev.TaskCreated(title="high", priority=5), "t2"))
    board.apply(3, e(ev.TaskCreated(title="high-later", priority=5), "t3"))
    board.apply(4, e(ev.TaskCreated(title="gpu", priority=9, capabilities=("gpu",)), "t4"))
    assert [s.task_id for s in board.candidates((), 0)] == ["t2", "t3", "t1"]
    assert [s.task_id for s in board.candidates(("gpu", "py"), 0)] == ["t4", "t2", "t3", "t1"]
    board.apply(5, e(ev.TaskClaimed(owner="w", attempt=1, lease_ttl_s=3), "t2"))
    assert [s.task_id for s in board.candidates((), 0)] == ["t3", "t1"]


def test_board_readiness_and_blocking() -> None:
    board = TaskBoard()
    board.apply(1, e(ev.TaskCreated(title="a"), "a"))
    board.apply(2, e(ev.TaskCreated(title="b"), "b"))
    board.apply(3, e(ev.TaskCreated(title="c", depends_on=("a", "b")), "c"))
    assert board.actions_for("c") == []
    board.apply(4, e(ev.TaskClaimed(owner="w", attempt=1, lease_ttl_s=3), "a"))
    board.apply(5, e(ev.TaskCompleted(epoch=4), "a"))
    assert board.actions_for("a") == []  # b still open
    board.apply(6, e(ev.TaskCancelled(reason="no"), "b"))
    [action] = board.actions_for("b")
    assert (action.kind, action.task_id, action.expected, action.blocked_by) == (
        "blocked", "c", 3, "b")
    with pytest.raises(DependencyError, match="unknown"):
        board.check_new_dependencies("d", ["zzz"])
    with pytest.raises(DependencyError, match="itself"):
        board.check_new_dependencies("d", ["d"])


def test_board_expiry_requeues_then_fails_when_attempts_exhausted() -> None:
    board = TaskBoard()
    board.apply(1, e(ev.TaskCreated(title="a", max_attempts=2), "a"))
    board.apply(2, e(ev.TaskClaimed(owner="w", attempt=1, lease_ttl_s=3), "a"))
    board.apply(3, e(ev.TaskLeaseExpired(epoch=2, owner="w"), "a"))
    [action] = board.actions_for("a")
    assert (action.kind, action.msg_id, action.expected) == ("requeue", "reaped-requeue-a-2", 3)
    board.apply(4, e(ev.TaskRequeued(attempt=1), "a"))
    board.apply(5, e(ev.TaskClaimed(owner="w", attempt=2, lease_ttl_s=3), "a"))
    board.apply(6, e(ev.TaskLeaseExpired(epoch=5, owner="w"), "a"))
    [action] = board.actions_for("a")
    assert action.kind == "fail"
    # A reaper's write never shares a Msg-Id with the holder's own fail at that epoch.
    assert action.msg_id == "reaped-fail-a-5" != "fail-a-5"
