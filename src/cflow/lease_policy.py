"""Lease policy and verdicts: the claim path's rules as pure functions (no I/O, no clock).

Theory of operation
-------------------
A claim is the ``TaskClaimed`` event at stream sequence *epoch*; its liveness is
a key in the leases bucket that the server removes when its TTL passes (leaving
a *marker*). Three clocks are involved and only two may decide anything:

- the **server clock** stamps every stored message; all deadlines that other
  processes act on (reaping an expired or never-leased claim, start-to-close
  timeouts, retry ``not_before``) are durations from a server-stamped event,
  compared with the caller's estimate of server time (a lower bound: never
  ahead of the server, so a judgement errs towards "still alive");
- the **holder's monotonic clock** bounds the holder's own work: a renewal that
  succeeded pushes its deadline to ``sent + TTL - margin``. A renewal is stored
  after it was sent, so the server's expiry is always later than the holder's
  deadline: the holder stops before anyone can reclaim;
- the **wall clock** of a client orders nothing and times nothing out (the HLC
  uses it only to be close to real time).

:func:`judge` turns what a reader sees of a lease key into a :class:`Verdict`;
the adapter (:mod:`cflow.leases`) carries out what the verdict calls for.
"""

from __future__ import annotations

import enum
import math
from typing import Literal

import msgspec

LeaseOp = Literal["PUT", "DEL", "PURGE", "MARKER"]


# msgspec Structs, not dataclasses: a dataclass costs some 3 ms of every cold start
# to define here (its methods are generated and compiled), a Struct a tenth (issue 18).
class LeasePolicy(msgspec.Struct, frozen=True):
    """Timing of one lease: how often to renew, when the holder and reapers give up."""

    ttl_s: float
    beats_per_ttl: int = 3
    reap_margin_s: float = 2.0  # grace after the TTL before "claimed but never leased"

    @property
    def heartbeat_interval_s(self) -> float:
        return max(0.2, self.ttl_s / self.beats_per_ttl)

    @property
    def holder_margin_s(self) -> float:
        """How long before the server's TTL the holder stops on its own."""
        return min(2.0, max(0.25, self.ttl_s / 6))

    def holder_deadline(self, renewal_sent_mono: float) -> float:
        """Monotonic time at which the holder treats its lease as lost.

        ``renewal_sent_mono`` is when the last renewal that succeeded was *sent*
        (the server stored it later, so its TTL runs out later than this).
        """
        return renewal_sent_mono + self.ttl_s - self.holder_margin_s

    def retry_delay_s(self, renewal_failures: int) -> float:
        """Pause before retrying a renewal that failed for a transient reason."""
        return min(self.heartbeat_interval_s, 0.2 * 2.0 ** max(0, renewal_failures - 1))

    def never_leased_at_ms(self, claimed_server_ms: int) -> int:
        """Server time after which a claim with no lease is reaped."""
        return claimed_server_ms + int((self.ttl_s + self.reap_margin_s) * 1000)

    def lapsed_at_ms(self, renewed_server_ms: int) -> int:
        """Server time after which a lease stored at ``renewed_server_ms`` is surely gone.

        The server removes it at its TTL (whole seconds, rounded up); the margin
        covers the rounding and the marker being written.
        """
        return renewed_server_ms + int((_whole_seconds(self.ttl_s) + self.reap_margin_s) * 1000)


def _whole_seconds(ttl_s: float) -> int:
    whole = int(ttl_s)
    return max(1, whole if whole == ttl_s else whole + 1)


class Verdict(enum.Enum):
    """What a reader concludes about claim ``epoch`` from its lease key."""

    ALIVE = "alive"  # a live lease names this epoch
    PENDING = "pending"  # no lease for this epoch yet, the claimer is within its grace
    EXPIRED = "expired"  # the server removed the lease (marker), or it is long past its TTL
    DROPPED = "dropped"  # the lease was deleted (the holder finished or gave up)
    NEVER_LEASED = "never leased"  # no lease for this epoch long after the claim
    TAKEN_OVER = "taken over"  # the key names a newer claim

    @property
    def gone(self) -> bool:
        """The claim has no live lease and may be reaped."""
        return self in (Verdict.EXPIRED, Verdict.DROPPED, Verdict.NEVER_LEASED)

    @property
    def reap_reason(self) -> str:
        return {
            Verdict.EXPIRED: "lease expired",
            Verdict.DROPPED: "lease expired",
            Verdict.NEVER_LEASED: "claimed but never leased",
        }.get(self, self.value)


class LeaseView(msgspec.Struct, frozen=True):
    """What a reader saw of a lease key: the last message, decoded where it is a PUT."""

    op: LeaseOp
    stored_ms: int  # server timestamp of that message
    epoch: int | None = None  # from the record of a PUT, or the record a marker replaced
    revision: int = 0  # that message's revision (stream sequence); 0 when unknown


def judge(view: LeaseView | None, *, epoch: int, claimed_ms: int, now_ms: int,
          policy: LeasePolicy, generation_ms: int = 0) -> Verdict:
    """The verdict on claim ``epoch``, claimed at server time ``claimed_ms``.

    ``view`` is what the claim's own lease key holds (one key per claim), so a
    marker or delete on it ended this claim's lease, whenever it was stored: the
    lease and the ``TaskClaimed`` go to two streams at once, and the lease may be
    stored, and expire, before the claim is (its holder then starts nothing).
    ``now_ms`` is the reader's estimate of server time (a lower bound).
    ``generation_ms`` is when the leases bucket last started empty (it lost its
    keys: a purge, a re-created stream): a missing key is judged from the later
    of the claim and that, so holders get a whole TTL to write their leases again.
    """
    if view is None or (view.epoch is not None and view.epoch < epoch):
        # Nothing written for this claim (absent, or a record of an older one).
        if now_ms >= policy.never_leased_at_ms(max(claimed_ms, generation_ms)):
            return Verdict.NEVER_LEASED
        return Verdict.PENDING
    if view.epoch is not None and view.epoch > epoch:
        return Verdict.TAKEN_OVER
    match view.op:
        case "PUT":
            if now_ms >= policy.lapsed_at_ms(view.stored_ms):
                return Verdict.EXPIRED
            return Verdict.ALIVE
        case "MARKER":
            return Verdict.EXPIRED
        case _:
            return Verdict.DROPPED


# ----------------------------------------------------------------- the holder


HolderEvent = Literal["renewed", "failed", "refused"]


class HolderClock(msgspec.Struct, frozen=True):
    """The holder's own view of its lease, on its monotonic clock (pure state)."""

    policy: LeasePolicy
    deadline: float  # monotonic time at which the holder gives up
    failures: int = 0  # renewals failed in a row (transient errors)
    lost: str | None = None  # why the holder stopped, once it has
    closes: float = math.inf  # the task's start-to-close timeout, less the margin
    close_margin: float = 0.0  # that margin

    @classmethod
    def start(cls, policy: LeasePolicy, leased_sent_mono: float,
              start_to_close_s: float | None = None) -> HolderClock:
        """``start_to_close_s`` caps the claim: reapers expire it that long after it
        was stored, so the holder stops a margin before, counted from when it sent it."""
        closes, margin = math.inf, 0.0
        if start_to_close_s:
            margin = min(policy.holder_margin_s, start_to_close_s / 6)
            closes = leased_sent_mono + start_to_close_s - margin
        return cls(policy, min(closes, policy.holder_deadline(leased_sent_mono)),
                   closes=closes, close_margin=margin)

    def after(self, event: HolderEvent, *, sent_mono: float, now_mono: float,
              reason: str = "") -> HolderClock:
        """The state after a renewal attempt sent at ``sent_mono`` ended at ``now_mono``."""
        if self.lost is not None:
            return self
        match event:
            case "renewed":
                return msgspec.structs.replace(self, failures=0, deadline=min(self.closes, max(
                    self.deadline, self.policy.holder_deadline(sent_mono))))
            case "refused":
                return msgspec.structs.replace(self, lost=reason or "refused")
            case "failed":
                state = msgspec.structs.replace(self, failures=self.failures + 1)
                return state.check(now_mono)

    @property
    def closed(self) -> bool:
        """Whether the start-to-close timeout, not a missed renewal, set the deadline."""
        return self.deadline >= self.closes

    @property
    def kill_by(self) -> float:
        """Monotonic time by which the holder's work must be dead whatever became of
        the holder: half-way through the margin between its deadline and the
        server's expiry of the lease (or the reapers' of the claim). A watcher in
        another process enforces it, since a holder frozen by SIGSTOP or a blocked
        event loop cannot stop its own commands."""
        return min(self.deadline + self.policy.holder_margin_s / 2,
                   self.closes + self.close_margin / 2)

    def check(self, now_mono: float) -> HolderClock:
        """Lost once the deadline passed without a successful renewal, or the claim's
        start-to-close time is up."""
        if self.lost is None and now_mono >= self.deadline:
            if self.closed:
                return msgspec.structs.replace(
                    self, lost="start-to-close timeout: stopped before the reapers "
                               "expire the claim")
            quiet = self.policy.ttl_s - self.policy.holder_margin_s
            return msgspec.structs.replace(
                self, lost=f"no successful renewal for {quiet:.1f} s (cut off from NATS?); "
                           "stopped before the lease could be taken over")
        return self

    def next_attempt(self, now_mono: float) -> float:
        """Monotonic time of the next renewal attempt (never after the deadline)."""
        if self.failures:
            return min(self.deadline, now_mono + self.policy.retry_delay_s(self.failures))
        return min(self.deadline, now_mono + self.policy.heartbeat_interval_s)
