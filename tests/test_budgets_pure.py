"""Budget counters (pure): children, attempts in a window, spend; no server."""

from __future__ import annotations

from cflow.control import (
    AttemptsUsage,
    BudgetRecord,
    ChildrenUsage,
    ControlView,
    SpendUsage,
    Violation,
    attempts_in_window,
    budget_key,
    count_attempt,
    count_child,
    uncount_attempt,
)


def test_count_child_remembers_recent_ids_and_catches_up_with_the_board() -> None:
    usage = count_child(ChildrenUsage(parent="p"), "a")
    assert (usage.count, usage.recent) == (1, ("a",))
    usage = count_child(usage, "b", at_least=5)  # children made while no budget applied
    assert (usage.count, usage.recent) == (6, ("a", "b"))


def test_attempts_window_prunes_and_dedupes() -> None:
    usage = AttemptsUsage(scope="swarm")
    first = count_attempt(usage, "t@1", at_ms=1_000, now_ms=1_000, window_ms=500)
    assert first is not None and attempts_in_window(first, 1_000, 500) == 1
    assert count_attempt(first, "t@1", 1_100, 1_100, 500) is None  # counted already
    assert count_attempt(first, "u@1", 400, 1_100, 500) is None  # older than the window
    later = count_attempt(first, "u@1", 1_600, 1_600, 500)
    assert later is not None and later.claims == (("u@1", 1_600),)  # t@1 slid out
    assert uncount_attempt(later, "u@1") == AttemptsUsage(scope="swarm")
    assert uncount_attempt(later, "nope") is None


def test_claim_violation_from_the_counters() -> None:
    view = ControlView()
    view.budgets[budget_key("swarm")] = BudgetRecord(
        scope="swarm", limits={"max_attempts": 2, "window_s": 1, "max_spend_usd": 1.0})
    view.usage["usage.attempts.swarm"] = AttemptsUsage(
        scope="swarm", claims=(("a@1", 10_000), ("b@1", 10_500)))
    v = view.claim_violation(["swarm"], 10_600)
    assert v == Violation("swarm", "swarm", "max_attempts", 2, 3)
    assert "exceeded: 3 > 2" in v.message()
    assert view.claim_violation(["swarm"], 11_200) is None  # a@1 left the window
    view.usage["usage.spend.swarm"] = SpendUsage(scope="swarm", spent=1.0, upto_seq=9)
    v = view.claim_violation(["swarm"], 11_200)
    assert v is not None and v.budget == "max_spend_usd"
    assert "reached: 1 of 1" in v.message()
