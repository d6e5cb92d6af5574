"""The pure lease core: verdicts on a lease key and the holder's own deadline (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cflow import events as ev
from cflow import tasks
from cflow.hlc import HybridClock
from cflow.lease_policy import HolderClock, LeasePolicy, LeaseView, Verdict, judge

CLAIMED_MS = 1_700_000_000_000
EPOCH = 10

ttls = st.sampled_from([1.0, 2.0, 3.0, 5.5, 30.0, 300.0])
ops = st.sampled_from(["PUT", "DEL", "PURGE", "MARKER"])


@st.composite
def views(draw: st.DrawFn) -> LeaseView | None:
    if draw(st.booleans()):
        return None
    op = draw(ops)
    epoch = draw(st.sampled_from([None, EPOCH - 3, EPOCH, EPOCH + 4])) if op == "PUT" else None
    stored = CLAIMED_MS + draw(st.integers(-120_000, 400_000))
    return LeaseView(op=op, stored_ms=stored, epoch=epoch)


@settings(max_examples=500)
@given(view=views(), ttl=ttls, elapsed=st.integers(0, 900_000))
def test_every_verdict_follows_the_rules(view: LeaseView | None, ttl: float, elapsed: int) -> None:
    policy = LeasePolicy(ttl)
    now = CLAIMED_MS + elapsed
    verdict = judge(view, epoch=EPOCH, claimed_ms=CLAIMED_MS, now_ms=now, policy=policy)
    # The key is the claim's own: a marker or delete on it ended this claim's lease,
    # even one stored before the claim (the lease and the claim go out together).
    ours = view is not None and view.epoch in (None, EPOCH)
    if view is not None and view.epoch is not None and view.epoch > EPOCH:
        assert verdict is Verdict.TAKEN_OVER
    elif not ours:
        # Nothing written for this claim: never leased once TTL + margin passed.
        late = now >= CLAIMED_MS + (ttl + policy.reap_margin_s) * 1000
        assert verdict is (Verdict.NEVER_LEASED if late else Verdict.PENDING)
    elif view is not None and view.op == "MARKER":
        assert verdict is Verdict.EXPIRED
    elif view is not None and view.op == "PUT":
        assert verdict in (Verdict.ALIVE, Verdict.EXPIRED)
        # A live lease is never judged gone before its TTL could have run out.
        if now < view.stored_ms + ttl * 1000:
            assert verdict is Verdict.ALIVE
    else:
        assert verdict is Verdict.DROPPED
    assert verdict.gone == (verdict in (Verdict.EXPIRED, Verdict.DROPPED, Verdict.NEVER_LEASED))


def test_a_lease_that_expired_before_its_claim_was_stored_is_expired() -> None:
    """The claim and its lease go to two streams at once: with the events stream
    electing a leader, the lease can be stored, and its TTL run out, seconds before
    the TaskClaimed. The marker on the claim's own key ends that claim all the same
    (judged "never leased", the reaper's fence would meet the marker and give up)."""
    policy = LeasePolicy(2.5)
    marker = LeaseView(op="MARKER", stored_ms=CLAIMED_MS - 1_500)
    late = CLAIMED_MS + 5_000
    assert judge(marker, epoch=EPOCH, claimed_ms=CLAIMED_MS, now_ms=late,
                 policy=policy) is Verdict.EXPIRED
    assert judge(marker, epoch=EPOCH, claimed_ms=CLAIMED_MS, now_ms=CLAIMED_MS,
                 policy=policy) is Verdict.EXPIRED


@settings(max_examples=300)
@given(ttl=ttls, events=st.lists(st.tuples(st.sampled_from(["renewed", "failed", "refused"]),
                                           st.floats(0, 5)), max_size=20))
def test_the_holder_stops_before_the_server_could_expire_its_lease(
        ttl: float, events: list[tuple[str, float]]) -> None:
    """Whatever renewals succeed or fail, the holder's deadline is before the lease's TTL.

    The server stores a renewal after the holder sent it, so its expiry is at
    least ``sent + ttl``; the holder gives up at ``sent + ttl - margin``.
    """
    policy = LeasePolicy(ttl)
    now = 0.0
    clock = HolderClock.start(policy, now)
    last_success_sent = now
    for kind, gap in events:
        sent = now + gap
        now = sent + gap / 2
        was_lost = clock.lost is not None
        clock = clock.after(kind, sent_mono=sent, now_mono=now, reason="r")  # type: ignore[arg-type]
        if kind == "renewed" and clock.lost is None:
            last_success_sent = max(last_success_sent, sent)
        if clock.lost is None:
            assert clock.deadline <= last_success_sent + ttl - policy.holder_margin_s + 1e-9
            assert clock.deadline < last_success_sent + ttl
            assert clock.next_attempt(now) <= clock.deadline
        if kind == "refused" and not was_lost:
            assert clock.lost == "r"
    after_deadline = clock.check(clock.deadline)
    assert after_deadline.lost is not None


def test_a_lost_holder_stays_lost() -> None:
    policy = LeasePolicy(3.0)
    clock = HolderClock.start(policy, 0.0).check(10.0)
    assert clock.lost is not None and "cut off" in clock.lost
    assert clock.after("renewed", sent_mono=11.0, now_mono=11.1).lost == clock.lost


def test_heartbeats_come_three_times_per_ttl_and_retries_back_off() -> None:
    policy = LeasePolicy(30.0)
    assert policy.heartbeat_interval_s == 10.0
    assert policy.holder_margin_s == 2.0
    assert [policy.retry_delay_s(n) for n in (1, 2, 3)] == [0.2, 0.4, 0.8]
    assert LeasePolicy(1.0).holder_margin_s == 0.25


# ------------------------------------------------------ server time in the fold


def _event(data: ev.EventData, hlc_ms: int, actor: str = "a") -> ev.Event:
    clock = HybridClock("n")
    return ev.make_event(data, swarm="s", entity_id="T", hlc=str(clock.now(hlc_ms)), actor=actor)


@pytest.mark.parametrize("skew_ms", [-600_000, 0, 600_000])
def test_deadlines_and_backoff_come_from_server_time_not_the_writers_clock(skew_ms: int) -> None:
    server = CLAIMED_MS
    created = tasks.apply(None, _event(ev.TaskCreated(title="t", start_to_close_s=60,
                                                      backoff_initial_s=1.0), server), 1, server)
    # The claimer's clock is off by skew_ms: its HLC says so; the server stamp does not.
    claimed = tasks.apply(created, _event(ev.TaskClaimed(owner="w", attempt=1, lease_ttl_s=5),
                                          server + skew_ms), 2, server + 10)
    assert claimed.claimed_ms == server + 10
    assert claimed.deadline_ms == server + 10 + 60_000
    final, retry_after = tasks.failure_outcome(claimed, retry=True)
    assert (final, retry_after) == (False, 1000)
    failed = tasks.apply(claimed, _event(ev.TaskFailed(epoch=2, error="x", final=False,
                                                       retry_after_ms=retry_after),
                                         server + skew_ms), 3, server + 20)
    assert failed.not_before_ms == server + 20 + 1000  # hidden for 1 s, whatever the skew


def test_a_claim_that_never_got_a_lease_gives_its_attempt_back() -> None:
    s = tasks.apply(None, _event(ev.TaskCreated(title="t", max_attempts=1), 1), 1)
    s = tasks.apply(s, _event(ev.TaskClaimed(owner="w", attempt=1, lease_ttl_s=5), 2), 2)
    assert s.attempt == 1
    s = tasks.apply(s, _event(ev.TaskLeaseExpired(epoch=2, owner="w", refund=True), 3), 3)
    assert s.attempt == 0
    board = tasks.TaskBoard()
    board.tasks["T"] = s
    [action] = board.actions_for("T")
    assert action.kind == "requeue"  # not "fail": max_attempts=1 and it never ran


def test_the_holder_stops_a_margin_before_its_start_to_close_timeout() -> None:
    """Reapers expire a claim start-to-close after it was stored, however it renews;
    the holder, counting from when it sent the claim, stops a margin before that."""
    policy = LeasePolicy(30.0)
    clock = HolderClock.start(policy, 100.0, start_to_close_s=3.0)
    assert 102.0 <= clock.closes < 103.0 and clock.deadline == clock.closes
    renewed = clock.after("renewed", sent_mono=101.0, now_mono=101.1)
    assert renewed.deadline == clock.closes  # a renewal never carries it past
    assert renewed.check(clock.closes - 0.01).lost is None
    lost = renewed.check(clock.closes)
    assert lost.lost is not None and lost.lost.startswith("start-to-close timeout")
    # Without one, the lease alone decides.
    free = HolderClock.start(policy, 100.0)
    assert free.deadline == policy.holder_deadline(100.0)
    assert free.check(free.deadline).lost.startswith("no successful renewal")  # type: ignore[union-attr]


@given(ttl=st.floats(0.5, 120), sent=st.floats(0, 1e6), later=st.floats(0, 60),
       start_to_close=st.one_of(st.none(), st.floats(0.5, 600)))
def test_a_holders_work_is_killed_after_its_deadline_and_before_anyone_can_take_over(
        ttl: float, sent: float, later: float, start_to_close: float | None) -> None:
    """The watcher kills the work at ``kill_by``: after the holder's own deadline (it
    stops its work itself first) and before the server's TTL of the last renewal
    or the reapers' start-to-close expiry, both counted from when it was sent."""
    policy = LeasePolicy(ttl)
    clock = HolderClock.start(policy, sent, start_to_close)
    renewed = clock.after("renewed", sent_mono=sent + later, now_mono=sent + later + 0.01)
    for state, last in ((clock, sent), (renewed, sent + later)):
        expiry = last + ttl
        if start_to_close is not None:
            expiry = min(expiry, sent + start_to_close)
        assert state.deadline < state.kill_by < expiry
