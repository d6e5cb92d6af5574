"""The pure part of control: the view folded from KV entries, budget checks, breakers."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cflow import events as ev
from cflow.control import (
    SWARM,
    BreakerRecord,
    BreakerSettings,
    BreakerTracker,
    BudgetRecord,
    ControlView,
    ScopeRecord,
    check_create,
    check_limits,
    key_token,
)
from cflow.errors import InvalidInput
from cflow.tasks import TaskState

enc = msgspec.json.Encoder()


def task(task_id: str = "t1", caps: tuple[str, ...] = ()) -> TaskState:
    return TaskState(task_id=task_id, title="x", status="ready", seq=1, created_seq=1,
                     created_ms=0, capabilities=caps)


def view_with(*entries: tuple[str, msgspec.Struct | None]) -> ControlView:
    view = ControlView()
    for rev, (key, record) in enumerate(entries, 1):
        view.apply(key, rev, None if record is None else enc.encode(record))
    return view


def test_view_folds_pause_resume_and_deletes() -> None:
    view = view_with(("swarm", ScopeRecord(scope=SWARM, mode="paused", reason="r", actor="a")))
    assert view.mode == "paused"
    refusal = view.claim_refusal()
    assert refusal is not None and str(refusal) == "swarm is paused: paused by a: r"
    view.apply("swarm", 9, enc.encode(ScopeRecord(scope=SWARM, mode="running")))
    assert view.claim_refusal() is None and view.revisions["swarm"] == 9
    view.apply("scope.p1", 10, enc.encode(ScopeRecord(scope="p1", mode="paused")))
    assert [r.scope for r in view.paused_scopes()] == ["p1"]
    view.apply("scope.p1", 11, None)
    assert view.paused_scopes() == []
    view.apply("swarm", 12, b"not json")  # ignored, never raises
    assert view.mode == "running"


def test_task_refusal_by_scope_ancestry_and_open_breaker() -> None:
    view = view_with(
        ("scope.root", ScopeRecord(scope="root", mode="paused", reason="budget")),
        ("breaker.gpu", BreakerRecord(capability="gpu", state="open", failures=5,
                                      opened_ms=1000, until_ms=2000)),
    )
    assert view.task_refusal(task("leaf"), ["mid", "root"], 1500) is not None
    assert view.task_refusal(task("root"), [], 1500) is not None
    assert view.task_refusal(task("other"), ["elsewhere"], 1500) is None
    gpu = view.task_refusal(task("g", ("gpu",)), [], 1500)
    assert gpu is not None and "capability gpu" in str(gpu)
    assert view.task_refusal(task("g", ("gpu",)), [], 2000) is None  # cool-down over


def created(parent: str | None, depth: int) -> ev.TaskCreated:
    return ev.TaskCreated(title="c", parent_id=parent, depth=depth)


def test_check_create_children_and_depth_relative_to_the_scope() -> None:
    view = view_with(("budget.p", BudgetRecord(scope="p", limits={"max_children": 2,
                                                                    "max_depth": 1})))
    # p is at depth 3 under r; its children are at depth 4 (relative depth 1).
    ancestry = [("p", 3), ("q", 2), ("r", 0)]
    assert check_create(view, created("p", 4), ancestry, children=1) is None
    v = check_create(view, created("p", 4), ancestry, children=2)
    assert v is not None and (v.budget, v.limit, v.value, v.pause) == ("max_children", 2, 3, "p")
    deeper = [("c", 4), *ancestry]
    v = check_create(view, created("c", 5), deeper, children=0)
    assert v is not None and (v.budget, v.value, v.pause) == ("max_depth", 2, "p")
    assert check_create(view, created(None, 0), [], 0) is None  # top level: no parent budget


def test_swarm_budget_pauses_the_root_of_the_tree() -> None:
    view = view_with(("budget.swarm", BudgetRecord(scope=SWARM, limits={"max_depth": 2})))
    v = check_create(view, created("b", 3), [("b", 2), ("a", 1), ("root", 0)], 0)
    assert v is not None and (v.scope, v.pause) == (SWARM, "root")
    assert "budget max_depth of the swarm exceeded: 3 > 2" in v.message()


def test_breaker_tracker_counts_consecutive_failures_in_a_window() -> None:
    settings = BreakerSettings(failures=3, window_s=10, cooldown_s=1)
    tracker = BreakerTracker()
    assert tracker.failed(["a", "b"], 0, settings) == []
    assert tracker.failed(["a"], 1000, settings) == []
    tracker.succeeded(["b"])
    assert tracker.failed(["a", "b"], 2000, settings) == [("a", 3)]
    assert tracker.failed(["a"], 3000, settings) == []  # reset after tripping
    assert tracker.failed(["a"], 20_000, settings) == []  # too far apart: streak restarts
    assert tracker.streaks["a"] == (1, 20_000)


def test_check_limits_refuses_unknown_and_negative() -> None:
    assert check_limits({"max_depth": 3}) == {"max_depth": 3.0}
    with pytest.raises(InvalidInput, match="unknown budget"):
        check_limits({"max_tokens": 1})
    with pytest.raises(InvalidInput, match=">= 0"):
        check_limits({"max_children": -1})


@given(st.text(min_size=1, max_size=300))
def test_key_token_is_always_a_valid_token(name: str) -> None:
    token = key_token(name)
    assert ev.check_token(token, "key") == token
    assert key_token(name) == token
