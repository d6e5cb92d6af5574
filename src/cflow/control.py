"""Operating a swarm: pause / resume / stop, budgets, circuit breakers, human gates.

Theory of operation
-------------------
Control state lives in the swarm's ``control`` KV bucket, one key per fact:

- ``swarm``: the swarm's mode (running / paused / stopped), who set it and why;
- ``scope.<task>``: a paused subtree (a parent task and everything under it);
- ``budget.<scope>``: limits for the swarm (``budget.swarm``) or one parent task;
- ``breaker.<capability>``: an open circuit breaker and when it closes;
- ``usage.children.<parent>``, ``usage.attempts.<scope>``, ``usage.spend.<scope>``:
  the counters budgets are checked against (compare-and-set, shared by every process).

Every change is also an event on the control entity (``SwarmPaused``,
``BudgetExceeded``, ``BreakerOpened``, ...) with the actor and the reason, so
the log says who stopped what and why.

Every process keeps a :class:`ControlView` (pure) folded from an ordered
consumer on the bucket, so the guards the claim path calls are dictionary
look-ups, not KV reads:

- the claim guard (:meth:`ControlService.claim_guard`, one of
  ``swarm.tasks.claim_guards``) refuses every claim while the swarm is paused or
  stopped;
- the claim filter (:meth:`ControlService.claim_filter`) skips tasks under a paused
  scope or needing a capability whose breaker is open;
- the create guard (:meth:`ControlService.create_guard`) enforces the children and depth
  budgets before a ``TaskCreated`` is written: a child takes a slot on its parent's
  counter by compare-and-set first (idempotent per task id), so concurrent creators
  in many processes never overshoot ``max_children``;
- the claim guard and filter also refuse a claim that one more attempt would push
  over ``max_attempts``, or under a scope whose spend reached ``max_spend_usd``,
  from the counters in the cache: before the claim is written, in every process.

:class:`~cflow.swarm.Swarm` (the composition root) hands these to the claim and
create paths when it builds the task service.

The attempts and spend counters are kept by :meth:`ControlService.maintain`, which
every long-lived process runs next to the task maintenance loop, on the process's
one task feed (:mod:`cflow.feed`): it counts each
observed claim (idempotent per claim id, so a claim whose claimer reserved it with
:meth:`ControlService.reserve_attempt` is not counted twice) and publishes each
scope's spend up to a stream sequence. It also opens breakers (consecutive failures
of one capability) and pauses a scope a budget was exceeded in. Several processes
may decide the same thing at once: the compare-and-set on the KV key lets one win,
and only the winner appends the events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from cflow import events as ev
from cflow.errors import (
    CflowError,
    ConcurrencyConflict,
    InvalidInput,
    InvalidState,
    LimitExceeded,
    NotFound,
    Paused,
)
from cflow.streams import names
from cflow.streams.client import wall_ms
from cflow.tasks import TaskState, event_ms

if TYPE_CHECKING:
    from cflow.feed import TaskFeed
    from cflow.streams import EventLog, KvEntry
    from cflow.swarm import Swarm

log = logging.getLogger("cflow.control")

SWARM = "swarm"  # the scope name of the whole swarm
Mode = Literal["running", "paused", "stopped"]

# Budget names a `budget.<scope>` record may hold (all optional).
LIMITS: dict[str, str] = {
    "max_children": "tasks created under one parent",
    "max_depth": "depth of sub-task creation below the scope",
    "max_attempts": "claims (attempts) in total per window",
    "window_s": "the window of max_attempts, seconds",
    "max_spend_usd": "reported cost of completed/failed tasks, USD",
    "breaker_failures": "consecutive failures of one capability that open its breaker",
    "breaker_window_s": "failures further apart than this do not add up, seconds",
    "breaker_cooldown_s": "how long an open breaker refuses work, seconds",
}
DEFAULT_WINDOW_S = 3600.0
DEFAULT_BREAKER_FAILURES = 5
DEFAULT_BREAKER_WINDOW_S = 600.0
DEFAULT_BREAKER_COOLDOWN_S = 60.0

_TOKEN_RE = re.compile(ev.TOKEN_PATTERN)


# --------------------------------------------------------------------- records


class ScopeRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Value of ``swarm`` and ``scope.<task>``: the mode of a scope."""

    scope: str
    mode: Mode
    reason: str = ""
    actor: str = ""
    at_ms: int = 0
    budget: str | None = None  # the budget whose excess paused it
    cancel_claims: bool = False  # stop --now: a claim that raced the stop is cancelled too


class BudgetRecord(msgspec.Struct, frozen=True, kw_only=True):
    scope: str
    limits: dict[str, float] = msgspec.field(default_factory=dict)
    actor: str = ""
    at_ms: int = 0


class BreakerRecord(msgspec.Struct, frozen=True, kw_only=True):
    capability: str
    state: Literal["open", "closed"]
    failures: int = 0
    opened_ms: int = 0
    until_ms: int = 0
    reason: str = ""

    def open_at(self, now_ms: int) -> bool:
        return self.state == "open" and now_ms < self.until_ms


class ChildrenUsage(msgspec.Struct, frozen=True, kw_only=True):
    """Value of ``usage.children.<parent>``: children counted against ``max_children``.

    ``recent`` holds the last task ids counted, so a retried create of one of them
    does not count twice.
    """

    parent: str
    count: int = 0
    recent: tuple[str, ...] = ()


class AttemptsUsage(msgspec.Struct, frozen=True, kw_only=True):
    """Value of ``usage.attempts.<scope>``: the claims in the window, as
    ``(claim id, wall ms)`` with claim id ``<task>:<attempt>``."""

    scope: str
    claims: tuple[tuple[str, int], ...] = ()


class SpendUsage(msgspec.Struct, frozen=True, kw_only=True):
    """Value of ``usage.spend.<scope>``: reported cost up to stream sequence ``upto_seq``."""

    scope: str
    spent: float = 0.0
    upto_seq: int = 0


_enc = msgspec.json.Encoder()
_scope_dec = msgspec.json.Decoder(ScopeRecord)
_budget_dec = msgspec.json.Decoder(BudgetRecord)
_breaker_dec = msgspec.json.Decoder(BreakerRecord)
_children_dec = msgspec.json.Decoder(ChildrenUsage)
_attempts_dec = msgspec.json.Decoder(AttemptsUsage)
_spend_dec = msgspec.json.Decoder(SpendUsage)

RECENT_CHILDREN = 256  # task ids a children counter remembers for idempotent retries


def key_token(value: str) -> str:
    """A KV key / entity id token for a free-form name (capability names may be anything)."""
    if _TOKEN_RE.match(value) and len(value) <= 100:
        return value
    return "h" + hashlib.sha256(value.encode()).hexdigest()[:24]


def scope_key(scope: str) -> str:
    return SWARM if scope == SWARM else f"scope.{key_token(scope)}"


def budget_key(scope: str) -> str:
    return f"budget.{key_token(scope)}"


def breaker_key(capability: str) -> str:
    return f"breaker.{key_token(capability)}"


def children_key(parent: str) -> str:
    return f"usage.children.{key_token(parent)}"


def attempts_key(scope: str) -> str:
    return f"usage.attempts.{key_token(scope)}"


def spend_key(scope: str) -> str:
    return f"usage.spend.{key_token(scope)}"


def check_limits(limits: Mapping[str, float]) -> dict[str, float]:
    """Refuse unknown budget names and negative values (pure)."""
    out: dict[str, float] = {}
    for name, value in limits.items():
        if name not in LIMITS:
            raise InvalidInput(f"unknown budget {name!r}; known: {', '.join(LIMITS)}")
        if value < 0:
            raise InvalidInput(f"budget {name} must be >= 0, got {value:g}")
        out[name] = float(value)
    return out


# ------------------------------------------------------------------ the view


# msgspec Structs, not dataclasses: a dataclass costs some 3 ms of every cold start
# to define here (its methods are generated and compiled), a Struct a tenth (issue 18).
class ControlView(msgspec.Struct):
    """Everything the control bucket says, folded from its entries (pure)."""

    swarm: ScopeRecord = msgspec.field(
        default_factory=lambda: ScopeRecord(scope=SWARM, mode="running"))
    scopes: dict[str, ScopeRecord] = msgspec.field(default_factory=dict)
    budgets: dict[str, BudgetRecord] = msgspec.field(default_factory=dict)
    breakers: dict[str, BreakerRecord] = msgspec.field(default_factory=dict)
    usage: dict[str, ChildrenUsage | AttemptsUsage | SpendUsage] = msgspec.field(
        default_factory=dict)
    revisions: dict[str, int] = msgspec.field(default_factory=dict)

    def apply(self, key: str, revision: int, value: bytes | None) -> None:
        """Fold one KV entry; ``value`` None is a delete. Undecodable values are ignored."""
        self.revisions[key] = revision
        try:
            if key == SWARM:
                self.swarm = (_scope_dec.decode(value) if value
                              else ScopeRecord(scope=SWARM, mode="running"))
            elif key.startswith("scope."):
                self._put(self.scopes, key, value and _scope_dec.decode(value))
            elif key.startswith("budget."):
                self._put(self.budgets, key, value and _budget_dec.decode(value))
            elif key.startswith("breaker."):
                self._put(self.breakers, key, value and _breaker_dec.decode(value))
            elif key.startswith("usage.children."):
                self._put(self.usage, key, value and _children_dec.decode(value))
            elif key.startswith("usage.attempts."):
                self._put(self.usage, key, value and _attempts_dec.decode(value))
            elif key.startswith("usage.spend."):
                self._put(self.usage, key, value and _spend_dec.decode(value))
        except msgspec.DecodeError:
            log.warning("ignoring undecodable control entry %s", key)

    @staticmethod
    def _put(table: dict[str, Any], key: str, record: Any) -> None:
        if record:
            table[key] = record
        else:
            table.pop(key, None)

    @property
    def mode(self) -> Mode:
        return self.swarm.mode

    def scope(self, scope: str) -> ScopeRecord:
        if scope == SWARM:
            return self.swarm
        return self.scopes.get(scope_key(scope)) or ScopeRecord(scope=scope, mode="running")

    def paused_scopes(self) -> list[ScopeRecord]:
        return [r for r in self.scopes.values() if r.mode != "running"]

    def budget(self, scope: str) -> dict[str, float]:
        record = self.budgets.get(budget_key(scope))
        return dict(record.limits) if record else {}

    def attempts(self, scope: str) -> AttemptsUsage:
        usage = self.usage.get(attempts_key(scope))
        return usage if isinstance(usage, AttemptsUsage) else AttemptsUsage(scope=scope)

    def spend(self, scope: str) -> SpendUsage:
        usage = self.usage.get(spend_key(scope))
        return usage if isinstance(usage, SpendUsage) else SpendUsage(scope=scope)

    def breaker(self, capability: str) -> BreakerRecord | None:
        return self.breakers.get(breaker_key(capability))

    def open_breakers(self, now_ms: int) -> list[BreakerRecord]:
        return [b for b in self.breakers.values() if b.open_at(now_ms)]

    def breaker_settings(self, defaults: BreakerSettings) -> BreakerSettings:
        limits = self.budget(SWARM)
        return BreakerSettings(
            failures=int(limits.get("breaker_failures", defaults.failures)),
            window_s=limits.get("breaker_window_s", defaults.window_s),
            cooldown_s=limits.get("breaker_cooldown_s", defaults.cooldown_s),
        )

    # -- decisions (pure)

    def claim_refusal(self) -> Paused | None:
        """Why no claim at all may happen now (the swarm is paused or stopped)."""
        if self.swarm.mode == "running":
            return None
        who = f" by {self.swarm.actor}" if self.swarm.actor else ""
        reason = self.swarm.reason or "no reason given"
        return Paused(SWARM, f"{self.swarm.mode}{who}: {reason}")

    def task_refusal(self, task: TaskState, ancestry: Iterable[str], now_ms: int
                     ) -> Paused | None:
        """Why this task may not be claimed now: a paused scope or an open breaker."""
        for cap in task.capabilities:
            breaker = self.breaker(cap)
            if breaker is not None and breaker.open_at(now_ms):
                left = (breaker.until_ms - now_ms) / 1000
                return Paused(f"capability {cap}",
                              f"circuit breaker open for {left:.1f} s more "
                              f"({breaker.failures} consecutive failures)")
        if self.scopes:
            for scope in (task.task_id, *ancestry):
                record = self.scopes.get(scope_key(scope))
                if record is not None and record.mode != "running":
                    return Paused(f"scope {scope}", record.reason or record.mode)
        return None

    def claim_violation(self, scopes: Iterable[str], now_ms: int) -> Violation | None:
        """A budget one more claim under ``scopes`` would exceed, from the counters (pure).

        ``max_attempts``: the claims already in the scope's window plus this one;
        ``max_spend_usd``: no new work once the reported spend reached the limit.
        """
        for scope in scopes:
            limits = self.budget(scope)
            if not limits:
                continue
            max_attempts = limits.get("max_attempts")
            if max_attempts is not None:
                window_ms = int(limits.get("window_s", DEFAULT_WINDOW_S) * 1000)
                used = attempts_in_window(self.attempts(scope), now_ms, window_ms)
                if used + 1 > max_attempts:
                    return Violation(scope, scope, "max_attempts", max_attempts, used + 1)
            max_spend = limits.get("max_spend_usd")
            if max_spend is not None:
                spent = self.spend(scope).spent
                if spent >= max_spend:
                    return Violation(scope, scope, "max_spend_usd", max_spend, round(spent, 6))
        return None

    def to_dict(self, now_ms: int) -> dict[str, Any]:
        return {
            "mode": self.swarm.mode,
            "reason": self.swarm.reason,
            "actor": self.swarm.actor,
            "since_ms": self.swarm.at_ms or None,
            "paused_scopes": [msgspec.to_builtins(r) for r in self.paused_scopes()],
            "budgets": {r.scope: dict(r.limits) for r in self.budgets.values()},
            "open_breakers": [msgspec.to_builtins(b) for b in self.open_breakers(now_ms)],
        }


class BreakerSettings(msgspec.Struct, frozen=True):
    failures: int = DEFAULT_BREAKER_FAILURES
    window_s: float = DEFAULT_BREAKER_WINDOW_S
    cooldown_s: float = DEFAULT_BREAKER_COOLDOWN_S


# ------------------------------------------------------------ budget checks


class Violation(msgspec.Struct, frozen=True):
    """A budget a step would exceed, and the scope to pause for it."""

    scope: str  # where the budget is set
    pause: str  # the scope to pause (the budget's scope, or the tree for swarm budgets)
    budget: str
    limit: float
    value: float

    def message(self) -> str:
        what = LIMITS.get(self.budget, self.budget)
        where = "the swarm" if self.scope == SWARM else f"scope {self.scope}"
        how = (f"exceeded: {self.value:g} > {self.limit:g}" if self.value > self.limit
               else f"reached: {self.value:g} of {self.limit:g}")
        return f"budget {self.budget} of {where} {how} ({what}); scope {self.pause} paused"


def check_create(view: ControlView, data: ev.TaskCreated, ancestry: list[tuple[str, int]],
                 children: int) -> Violation | None:
    """Children and depth budgets for a new task (pure).

    ``ancestry`` is ``[(task_id, depth)]`` from the new task's parent up to its
    root; ``children`` the number of tasks already under the parent.
    """
    if data.parent_id is None:
        return None
    root = ancestry[-1][0] if ancestry else data.parent_id
    scopes: list[tuple[str, int, str]] = [(SWARM, -1, root)]
    scopes += [(tid, depth, tid) for tid, depth in ancestry]
    for scope, scope_depth, pause in scopes:
        limits = view.budget(scope)
        if not limits:
            continue
        max_children = limits.get("max_children")
        if max_children is not None and children + 1 > max_children:
            return Violation(scope, pause, "max_children", max_children, children + 1)
        max_depth = limits.get("max_depth")
        depth = data.depth if scope == SWARM else data.depth - scope_depth
        if max_depth is not None and depth > max_depth:
            return Violation(scope, pause, "max_depth", max_depth, depth)
    return None


def children_limited(view: ControlView, ancestry: Iterable[tuple[str, int]]) -> bool:
    """Whether a ``max_children`` budget applies to a new task under this ancestry (pure)."""
    return any("max_children" in view.budget(scope)
               for scope in (SWARM, *(tid for tid, _ in ancestry)))


def count_child(usage: ChildrenUsage, task_id: str, at_least: int = 0) -> ChildrenUsage:
    """The counter with ``task_id`` counted (pure); ``at_least`` raises a counter that
    missed children created while no budget applied."""
    recent = (*usage.recent, task_id)[-RECENT_CHILDREN:]
    return msgspec.structs.replace(usage, count=max(usage.count, at_least) + 1, recent=recent)


def claim_id(task_id: str, expected: int) -> str:
    """One claim of a task: the task's sequence the ``TaskClaimed`` was appended on."""
    return f"{task_id}@{expected}"


def attempts_in_window(usage: AttemptsUsage, now_ms: int, window_ms: int) -> int:
    return sum(1 for _, at in usage.claims if at > now_ms - window_ms)


def count_attempt(usage: AttemptsUsage, claim_id: str, at_ms: int, now_ms: int,
                  window_ms: int) -> AttemptsUsage | None:
    """The counter with one more claim, pruned to the window; None if the claim is already
    counted or older than the window (pure)."""
    if at_ms <= now_ms - window_ms or any(cid == claim_id for cid, _ in usage.claims):
        return None
    kept = tuple((cid, at) for cid, at in usage.claims if at > now_ms - window_ms)
    return msgspec.structs.replace(usage, claims=(*kept, (claim_id, at_ms)))


def uncount_attempt(usage: AttemptsUsage, claim_id: str) -> AttemptsUsage | None:
    """The counter without a claim that never happened (pure); None if it is not there."""
    kept = tuple((cid, at) for cid, at in usage.claims if cid != claim_id)
    return None if len(kept) == len(usage.claims) else msgspec.structs.replace(
        usage, claims=kept)


class BreakerTracker:
    """Consecutive failures per capability (pure): which breakers to open."""

    def __init__(self) -> None:
        self.streaks: dict[str, tuple[int, int]] = {}  # capability -> (count, last failure ms)

    def failed(self, capabilities: Iterable[str], at_ms: int, settings: BreakerSettings
               ) -> list[tuple[str, int]]:
        """Record a failure; returns ``[(capability, failures)]`` whose threshold is reached."""
        tripped = []
        for cap in capabilities:
            count, last = self.streaks.get(cap, (0, 0))
            if count and at_ms - last > settings.window_s * 1000:
                count = 0
            count += 1
            self.streaks[cap] = (count, at_ms)
            if settings.failures > 0 and count >= settings.failures:
                tripped.append((cap, count))
                self.streaks[cap] = (0, at_ms)
        return tripped

    def succeeded(self, capabilities: Iterable[str]) -> None:
        for cap in capabilities:
            self.streaks.pop(cap, None)


# ------------------------------------------------------------------ service


class ControlService:
    """Pause, budgets, breakers and gates of one swarm (``swarm.control``)."""

    def __init__(self, swarm: Swarm, *, feed: TaskFeed,
                 on_change: Callable[[], Awaitable[None]] | None = None,
                 breaker: BreakerSettings | None = None) -> None:
        """Built by :class:`~cflow.swarm.Swarm`, which hands it the process's task feed
        (for :meth:`maintain`) and ``on_change``, called whenever the cached control
        state moves (the claim path wakes waiting claimers with it)."""
        self.swarm = swarm
        self.log = swarm.log
        self.feed = feed
        self._on_change = on_change
        self.bucket = swarm.log.bucket(names.CONTROL)
        self.view = ControlView()
        self.defaults = breaker or BreakerSettings()
        self.stopped = asyncio.Event()  # set while the swarm is stopped
        self.paused = asyncio.Event()  # set while the swarm is paused or stopped
        self._caught_up = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._version = 0
        self._background: set[asyncio.Task[Any]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # maintenance state (folded from task events)
        self._parents: dict[str, str | None] = {}
        self._caps: dict[str, tuple[str, ...]] = {}
        self._breakers = BreakerTracker()
        self._last_seq: dict[str, int] = {}  # task -> its last event's sequence
        self._spent: dict[str, float] = {}  # reported cost, per scope
        self._folded_seq = 0  # the last task event maintenance folded

    # ------------------------------------------------------------ the cache

    async def ensure(self) -> ControlView:
        """Start watching the control bucket (once) and wait until the cache is current.

        Raises:
            Unavailable: NATS unreachable. NotFound: the swarm has no control bucket.
        """
        if self._watch_task is not None and self._watch_task.done():
            # The watch died (connection lost for good, ...): start over rather than
            # guard claims with a stale cache.
            if not self._watch_task.cancelled() and self._watch_task.exception() is not None:
                log.warning("control watch stopped: %s", self._watch_task.exception())
            self._watch_task = None
            self._caught_up.clear()
        if self._watch_task is None:
            self._watch_task = asyncio.create_task(self._watch(), name="control-watch")
        if not self._caught_up.is_set():
            waiter = asyncio.create_task(self._caught_up.wait())
            done, _ = await asyncio.wait({waiter, self._watch_task},
                                         return_when=asyncio.FIRST_COMPLETED)
            if self._watch_task in done and not self._caught_up.is_set():
                waiter.cancel()
                self._watch_task.result()
        return self.view

    async def _watch(self) -> None:
        async with _kv_watch(self.log, self.bucket) as (empty, entries):
            if empty:
                await self._mark_changed()
                self._caught_up.set()
            async for entry, pending in entries:
                # A delete, purge or (for keys with a TTL) the server's expiry marker
                # all mean the key is gone.
                self.view.apply(entry.key, entry.revision, entry.value if entry.live else None)
                if pending == 0 or self._caught_up.is_set():
                    await self._mark_changed()
                    self._caught_up.set()

    async def _mark_changed(self) -> None:
        """The cache moved: update the events, arm breaker timers, wake claimers."""
        view = self.view
        if view.mode == "stopped":
            self.stopped.set()
        else:
            self.stopped.clear()
        if view.mode == "running":
            self.paused.clear()
        else:
            self.paused.set()
        now = wall_ms()
        loop = asyncio.get_running_loop()
        for key, breaker in view.breakers.items():
            if breaker.open_at(now) and key not in self._timers:
                self._timers[key] = loop.call_later(
                    (breaker.until_ms - now) / 1000 + 0.01, self._breaker_elapsed, key)
        self._version += 1
        async with self._changed:
            self._changed.notify_all()
        if self._on_change is not None:
            await self._on_change()

    def _breaker_elapsed(self, key: str) -> None:
        self._timers.pop(key, None)
        asyncio.get_running_loop().create_task(self._mark_changed())

    def _moved_since(self, seen: int) -> Callable[[], bool]:
        return lambda: self._version != seen

    async def state(self) -> dict[str, Any]:
        """The control state as a JSON-ready dict (mode, paused scopes, budgets, breakers)."""
        view = await self.ensure()
        return view.to_dict(wall_ms())

    async def watch(self) -> AsyncIterator[ControlView]:
        """Yield the view now and after every change (pause, stop, breaker...) until cancelled."""
        view = await self.ensure()
        seen = -1
        while True:
            if self._version != seen:
                seen = self._version
                yield view
            async with self._changed:
                await self._changed.wait_for(self._moved_since(seen))

    async def wait_mode(self, *modes: Mode, timeout_s: float = 10.0) -> bool:
        """Wait until this process's cache shows the swarm in one of ``modes``."""
        await self.ensure()
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.view.mode in modes), timeout_s)
            except TimeoutError:
                return False
        return True

    # ------------------------------------------------------------- guards

    async def claim_guard(self, owner: str, capabilities: Any) -> None:
        """The claim path's guard: no claim while the swarm is paused or stopped, or when
        a swarm-wide attempts or spend budget is reached.

        Raises:
            Paused: why no claim may happen now.
        """
        view = await self.ensure()
        refusal = view.claim_refusal()
        if refusal is not None:
            raise refusal
        # Swarm-wide attempts and spend: checked before any claim, from the counters.
        violation = view.claim_violation([SWARM], wall_ms())
        if violation is not None:
            await self._exceeded(violation, owner)
            raise Paused(SWARM, violation.message())

    def _ancestry(self, task_id: str | None, parent_id: str | None = None) -> list[str]:
        """Parent chain from the board (cheap dictionary look-ups); ``parent_id``, when the
        caller knows it, is the first link (a claimer that does not fold the board)."""
        out: list[str] = []
        board = self.swarm.tasks.board
        while task_id is not None and len(out) < 1000:
            state = board.get(task_id)
            parent = state.parent_id if state else self._parents.get(task_id)
            if not out and parent is None:
                parent = parent_id
            if parent is None or parent in out:
                break
            out.append(parent)
            task_id = parent
        return out

    def claim_filter(self, state: TaskState) -> Paused | None:
        """The claim path's per-task filter: why this task may not be claimed now (a
        paused scope, an open breaker, a budget of its scopes), or None. Cache only."""
        view = self.view
        if not view.scopes and not view.breakers and not view.budgets:
            return None
        ancestry = (self._ancestry(state.task_id, state.parent_id)
                    if view.scopes or view.budgets else [])
        refusal = view.task_refusal(state, ancestry, wall_ms())
        if refusal is not None or not view.budgets:
            return refusal
        # Attempts and spend budgets of the task's own scopes (the swarm's is the guard's).
        violation = view.claim_violation([state.task_id, *ancestry], wall_ms())
        if violation is None:
            return None
        self._in_background(self._exceeded(violation))
        return Paused(f"scope {violation.scope}", violation.message())

    def _in_background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------ counters

    async def _update(self, key: str, decode: Callable[[bytes], Any],
                      change: Callable[[Any], Any]) -> Any:
        """Compare-and-set one counter: read it, ``change(current or None)`` returns the new
        value (or None: leave it), put it expecting the revision read; retry on conflict.

        Raises:
            ConcurrencyConflict: the key kept changing under 50 tries.
        """
        for _ in range(50):
            last = await self.log.kv_last(self.bucket, key)
            current = None
            if last is not None and last.live:
                with contextlib.suppress(msgspec.DecodeError):
                    current = decode(last.value)
            new = change(current)
            if new is None:
                return current
            try:
                await self.log.kv_put(self.bucket, key, _enc.encode(new),
                                      expected_revision=last.revision if last else 0)
            except ConcurrencyConflict:
                continue
            return new
        raise ConcurrencyConflict(names.kv_subject(self.bucket, key), None,
                                  detail="budget counter kept changing")

    async def create_guard(self, data: ev.TaskCreated, task_id: str) -> None:
        """Children and depth budgets, before the ``TaskCreated`` is written.

        A ``max_children`` budget is enforced on the parent's counter in the control
        bucket: the slot is reserved by compare-and-set before the task exists, so
        concurrent creators in any number of processes never overshoot. The reservation
        is idempotent per task id (a retried create does not count twice).

        Raises:
            LimitExceeded: a budget would be exceeded; its scope is paused.
        """
        if data.parent_id is None:
            return
        view = await self.ensure()
        if not view.budgets:
            return
        tasks = self.swarm.tasks
        board = await tasks.ensure_board()
        if task_id in board.tasks:
            return  # exists already: the append finds it, nothing new is counted
        ancestry: list[tuple[str, int]] = []
        current: str | None = data.parent_id
        while current is not None and len(ancestry) < 1000:
            state = board.get(current) or await tasks.get(current)
            ancestry.append((state.task_id, state.depth))
            current = state.parent_id
        on_board = sum(1 for s in board.tasks.values() if s.parent_id == data.parent_id)
        violation: Violation | None = None
        if not children_limited(view, ancestry):
            violation = check_create(view, data, ancestry, on_board)
        else:
            parent = data.parent_id

            def reserve(usage: ChildrenUsage | None) -> ChildrenUsage | None:
                nonlocal violation
                violation = None
                usage = usage or ChildrenUsage(parent=parent)
                if task_id in usage.recent:
                    return None  # a retry of a create that was counted
                violation = check_create(view, data, ancestry, max(usage.count, on_board))
                return None if violation else count_child(usage, task_id, on_board)

            await self._update(children_key(parent), _children_dec.decode, reserve)
        if violation is not None:
            await self._exceeded(violation, self.swarm.agent)  # this process creates it
            raise LimitExceeded(violation.message(), scope=violation.scope,
                                budget=violation.budget, limit=violation.limit,
                                value=violation.value, paused=violation.pause)

    def _claim_scopes(self, task_id: str) -> list[str]:
        return [SWARM, task_id, *self._ancestry(task_id)]

    async def reserve_attempt(self, state: TaskState, owner: str = "") -> list[str]:
        """Count the next claim of ``state`` against every ``max_attempts`` budget above it,
        before its ``TaskClaimed`` is written; returns the scopes counted.

        One compare-and-set per budgeted scope, idempotent per claim (named by the task
        sequence the claim's append expects); the maintenance counts an observed claim
        under the same id, so a claim is counted once whether or not its claimer reserved.
        A claim that then does not happen (lost race, never leased) gives its slot back
        with :meth:`refund_attempt`.

        Raises:
            Paused: one more claim would exceed a budget; its scope is paused.
        """
        view = await self.ensure()
        if not self.attempts_budgeted():
            return []  # the common case: no attempts budget anywhere, nothing to count
        await self.swarm.tasks.ensure_board()  # the ancestry comes from the board
        cid = claim_id(state.task_id, state.seq)
        counted: list[str] = []
        for scope in self._claim_scopes(state.task_id):
            limits = view.budget(scope)
            if "max_attempts" not in limits:
                continue
            limit = limits["max_attempts"]
            window_ms = int(limits.get("window_s", DEFAULT_WINDOW_S) * 1000)
            violation: Violation | None = None

            def reserve(usage: AttemptsUsage | None, scope: str = scope, limit: float = limit,
                        window_ms: int = window_ms) -> AttemptsUsage | None:
                nonlocal violation
                violation = None
                usage = usage or AttemptsUsage(scope=scope)
                now = wall_ms()
                used = attempts_in_window(usage, now, window_ms)
                if any(cid_ == cid for cid_, _ in usage.claims):
                    return None
                if used + 1 > limit:
                    violation = Violation(scope, scope, "max_attempts", limit, used + 1)
                    return None
                return count_attempt(usage, cid, now, now, window_ms)

            await self._update(attempts_key(scope), _attempts_dec.decode, reserve)
            if violation is not None:
                for done in counted:
                    await self._uncount(done, cid)
                await self._exceeded(violation, owner or None)
                raise Paused(SWARM if scope == SWARM else f"scope {scope}",
                             violation.message())
            counted.append(scope)
        return counted

    def attempts_budgeted(self) -> bool:
        """Whether any scope of the swarm has a ``max_attempts`` budget (cached view)."""
        return any("max_attempts" in r.limits for r in self.view.budgets.values() if r)

    async def refund_attempt(self, state: TaskState) -> None:
        """Give back the slot :meth:`reserve_attempt` took for a claim that did not happen."""
        if not self.attempts_budgeted():
            return
        await self.swarm.tasks.ensure_board()
        cid = claim_id(state.task_id, state.seq)
        for scope in self._claim_scopes(state.task_id):
            if attempts_key(scope) in self.view.usage:
                await self._uncount(scope, cid)

    async def _uncount(self, scope: str, cid: str) -> None:
        await self._update(attempts_key(scope), _attempts_dec.decode,
                           lambda usage: usage and uncount_attempt(usage, cid))

    # ------------------------------------------------------------ commands

    def _actor(self, actor: str | None) -> str:
        return actor or self.swarm.agent

    async def _set_scope(self, record: ScopeRecord, *, expected: int | None = None) -> int:
        return await self.log.kv_put(self.bucket, scope_key(record.scope), _enc.encode(record),
                                     expected_revision=expected)

    async def pause(self, scope: str = SWARM, reason: str = "", *, actor: str | None = None
                    ) -> dict[str, Any]:
        """Stop all claiming in the swarm (or under one parent task).

        Raises:
            NotFound: ``scope`` is neither "swarm" nor a task.
        """
        return await self._set_mode(scope, "paused", reason, actor)

    async def resume(self, scope: str = SWARM, reason: str = "", *, actor: str | None = None
                     ) -> dict[str, Any]:
        """Let claiming start again (after a pause, a stop or an exceeded budget)."""
        return await self._set_mode(scope, "running", reason, actor)

    async def _set_mode(self, scope: str, mode: Mode, reason: str, actor: str | None
                        ) -> dict[str, Any]:
        if scope != SWARM:
            await self.swarm.tasks.get(scope)  # NotFound for an unknown scope
        who = self._actor(actor)
        record = ScopeRecord(scope=scope, mode=mode, reason=reason, actor=who, at_ms=wall_ms())
        await self._set_scope(record)
        data: ev.EventData = (ev.SwarmPaused(scope=scope, reason=reason) if mode == "paused"
                              else ev.SwarmResumed(scope=scope, reason=reason))
        appended = await self.log.append(data, key_token(scope), actor=who)
        return {"scope": scope, "mode": mode, "reason": reason, "actor": who,
                "seq": appended.seq}

    async def stop(self, reason: str = "", *, now: bool = False, actor: str | None = None
                   ) -> dict[str, Any]:
        """Stop the swarm: no more claims, workers exit; ``now`` also cancels every claim.

        Holders of cancelled tasks learn it at their next heartbeat.
        """
        who = self._actor(actor)
        record = ScopeRecord(scope=SWARM, mode="stopped", reason=reason, actor=who,
                             at_ms=wall_ms(), cancel_claims=now)
        await self._set_scope(record)
        appended = await self.log.append(ev.SwarmStopped(reason=reason), SWARM, actor=who)
        cancelled: list[str] = []
        if now:
            tasks = self.swarm.tasks
            why = f"swarm stopped by {who}: {reason}" if reason else f"swarm stopped by {who}"
            for state in list((await tasks.ensure_board()).claimed()):
                with contextlib.suppress(InvalidState, NotFound):
                    # The task service's cancel, recording who stopped the swarm.
                    await tasks.cancel(state.task_id, why, actor=who)
                    cancelled.append(state.task_id)
        return {"scope": SWARM, "mode": "stopped", "reason": reason, "actor": who,
                "seq": appended.seq, "cancelled": cancelled}

    async def set_budget(self, scope: str, limits: Mapping[str, float], *,
                         replace_all: bool = False, actor: str | None = None) -> dict[str, Any]:
        """Set (merge) budget limits of the swarm or one parent task.

        Raises:
            InvalidInput: unknown budget name or negative value.
            NotFound: ``scope`` is neither "swarm" nor a task.
        """
        checked = check_limits(limits)
        if scope != SWARM:
            await self.swarm.tasks.get(scope)
        view = await self.ensure()
        merged = checked if replace_all else {**view.budget(scope), **checked}
        who = self._actor(actor)
        record = BudgetRecord(scope=scope, limits=merged, actor=who, at_ms=wall_ms())
        await self.log.kv_put(self.bucket, budget_key(scope), _enc.encode(record))
        await self.log.append(ev.BudgetSet(scope=scope, limits=merged), key_token(scope),
                              actor=who)
        await self._wait_revision(budget_key(scope))
        return {"scope": scope, "limits": merged, "actor": who}

    async def _wait_revision(self, key: str) -> None:
        """Let our own cache see our own write (best effort, short)."""
        last = await self.log.kv_last(self.bucket, key)
        if last is None:
            return
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(
                    lambda: self.view.revisions.get(key, 0) >= last.revision), 5.0)

    async def budgets(self) -> dict[str, dict[str, float]]:
        view = await self.ensure()
        return {r.scope: dict(r.limits) for r in view.budgets.values()}

    async def _exceeded(self, v: Violation, by: str | None = None) -> bool:
        """Pause the violated scope (once, across processes) and record why.

        The pause is the budget's doing: its actor is ``budget``, or ``budget:AGENT``
        naming the agent whose claim or create went over it, never the process that
        happened to notice (a projector's maintenance, say).
        """
        view = await self.ensure()
        key = scope_key(v.pause)
        if view.scope(v.pause).mode != "running":
            return False
        actor = f"budget:{by}" if by else "budget"
        record = ScopeRecord(scope=v.pause, mode="paused", reason=v.message(), actor=actor,
                             at_ms=wall_ms(), budget=v.budget)
        last = await self.log.kv_last(self.bucket, key)
        if last is not None and last.live:
            try:
                if _scope_dec.decode(last.value).mode != "running":
                    return False
            except msgspec.DecodeError:
                pass
        try:
            await self._set_scope(record, expected=last.revision if last else 0)
        except ConcurrencyConflict:
            return False  # another process paused it first
        entity = key_token(v.pause)
        await self.log.append(ev.BudgetExceeded(scope=v.pause, budget=v.budget, limit=v.limit,
                                                value=v.value), entity, actor=actor)
        await self.log.append(ev.SwarmPaused(scope=v.pause, reason=v.message()), entity,
                              actor=actor)
        log.warning("%s", v.message())
        return True

    # ------------------------------------------------------------ breakers

    async def open_breaker(self, capability: str, failures: int, *, at_ms: int | None = None,
                           cooldown_s: float | None = None) -> bool:
        """Open a capability's breaker (once across processes). True if this call did."""
        view = await self.ensure()
        settings = view.breaker_settings(self.defaults)
        cool = settings.cooldown_s if cooldown_s is None else cooldown_s
        start = at_ms if at_ms is not None else wall_ms()
        until = start + int(cool * 1000)
        if until <= wall_ms():
            return False
        key = breaker_key(capability)
        last = await self.log.kv_last(self.bucket, key)
        if last is not None and last.live:
            with contextlib.suppress(msgspec.DecodeError):
                if _breaker_dec.decode(last.value).open_at(wall_ms()):
                    return False
        record = BreakerRecord(capability=capability, state="open", failures=failures,
                               opened_ms=start, until_ms=until,
                               reason=f"{failures} consecutive failures")
        try:
            await self.log.kv_put(self.bucket, key, _enc.encode(record),
                                  expected_revision=last.revision if last else 0)
        except ConcurrencyConflict:
            return False
        await self.log.append(ev.BreakerOpened(scope=capability, failures=failures,
                                               cool_down_s=cool),
                              "breaker-" + key_token(capability), actor="breaker")
        log.warning("breaker for capability %s opened after %d failures", capability, failures)
        return True

    async def close_breaker(self, capability: str, *, actor: str = "breaker") -> bool:
        """Close an open breaker (cool-down elapsed, or a human). True if this call did."""
        key = breaker_key(capability)
        last = await self.log.kv_last(self.bucket, key)
        if last is None or not last.live:
            return False
        try:
            record = _breaker_dec.decode(last.value)
        except msgspec.DecodeError:
            return False
        if record.state != "open":
            return False
        closed = replace_record(record, state="closed")
        try:
            await self.log.kv_put(self.bucket, key, _enc.encode(closed),
                                  expected_revision=last.revision)
        except ConcurrencyConflict:
            return False
        await self.log.append(ev.BreakerClosed(scope=capability),
                              "breaker-" + key_token(capability), actor=actor)
        return True

    # --------------------------------------------------------- maintenance

    async def maintain(self) -> None:
        """Evaluate breakers, attempts and spend budgets from task events, until cancelled.

        Folds the process's task feed (events after the feed caught up are *live*: they
        may open breakers and pause scopes as news; earlier ones are history). Runs in
        every long-lived process (started by ``swarm.tasks.maintain()``);
        decisions are compare-and-set on the control keys, so running it in many
        processes opens a breaker or pauses a scope once.
        """
        await self.ensure()
        closer = asyncio.create_task(self._close_elapsed_breakers(), name="breaker-closer")
        try:
            # After a restart, go on from the last event folded (not fold twice).
            async with self.feed.subscribe("control",
                                           start_seq=self._folded_seq + 1) as events:
                async for item in events:
                    try:
                        await self._observe(item.seq, item.event, live=self.feed.live(item.seq))
                    except CflowError as exc:
                        log.warning("control maintenance step failed: %s", exc)
                    self._folded_seq = item.seq
        finally:
            closer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await closer

    def _scopes_of(self, task_id: str) -> list[str]:
        """The swarm and every ancestor (the task itself only if it has a budget): usage is
        kept per scope that can have descendants, not per task."""
        chain: list[str] = []
        current = self._parents.get(task_id)
        while current is not None and len(chain) < 1000:
            chain.append(current)
            current = self._parents.get(current)
        own = [task_id] if budget_key(task_id) in self.view.budgets else []
        return [SWARM, *own, *chain]

    async def _observe(self, seq: int, event: ev.Event, *, live: bool) -> None:
        data = event.data
        task_id = event.entity_id
        at = event_ms(event)
        now = wall_ms()
        prior = self._last_seq.get(task_id, 0)
        self._last_seq[task_id] = seq
        match data:
            case ev.TaskCreated():
                if data.parent_id is not None:
                    self._parents[task_id] = data.parent_id
                if data.capabilities:
                    self._caps[task_id] = tuple(data.capabilities)
            case ev.TaskClaimed():
                stop = self.view.swarm
                if live and stop.mode == "stopped" and stop.cancel_claims:
                    # A claimer that had not seen the stop yet: cancel it like the rest.
                    with contextlib.suppress(InvalidState, NotFound):
                        await self.swarm.tasks.cancel(
                            task_id, f"swarm stopped by {stop.actor}: {stop.reason}")
                await self._count_claim(task_id, claim_id(task_id, prior), at, live=live,
                                        owner=data.owner)
            case ev.TaskCompleted() | ev.TaskFailed():
                caps = self._caps.get(task_id, ())
                if isinstance(data, ev.TaskCompleted):
                    self._breakers.succeeded(caps)
                elif data.epoch != 0:  # a rejected gate is not a failing capability
                    settings = self.view.breaker_settings(self.defaults)
                    for cap, count in self._breakers.failed(caps, at, settings):
                        if live or at + settings.cooldown_s * 1000 > now:
                            await self.open_breaker(cap, count, at_ms=max(at, now) if live
                                                    else at)
                if data.cost_usd:
                    await self._spend(task_id, data.cost_usd, seq, live=live)
            case _:
                pass

    async def _count_claim(self, task_id: str, cid: str, at: int, *, live: bool,
                           owner: str | None = None) -> None:
        """Count an observed claim on the attempts counters (a claim its claimer reserved
        is there already), and pause a scope it pushed over its budget."""
        for scope in self._scopes_of(task_id):
            limits = self.view.budget(scope)
            if "max_attempts" not in limits:
                continue
            limit = limits["max_attempts"]
            window_ms = int(limits.get("window_s", DEFAULT_WINDOW_S) * 1000)
            now = wall_ms()
            cached = self.view.attempts(scope)
            if at <= now - window_ms or any(c == cid for c, _ in cached.claims):
                continue  # out of the window, or counted already: no round trip
            def add(u: AttemptsUsage | None, scope: str = scope,
                    window_ms: int = window_ms) -> AttemptsUsage | None:
                return count_attempt(u or AttemptsUsage(scope=scope), cid, at, wall_ms(),
                                     window_ms)

            usage = await self._update(attempts_key(scope), _attempts_dec.decode, add)
            used = attempts_in_window(usage, wall_ms(), window_ms) if usage else 0
            if used > limit and (live or at >= now - window_ms):
                await self._exceeded(Violation(scope, scope, "max_attempts", limit, used), owner)

    async def _spend(self, task_id: str, cost: float, seq: int, *, live: bool) -> None:
        """Add a reported cost to every scope above the task; publish the total of each
        scope with a spend budget on its counter, so every process's claim guard refuses
        new work there once the budget is reached (not only after a pause)."""
        for scope in self._scopes_of(task_id):
            spent = self._spent[scope] = self._spent.get(scope, 0.0) + cost
            limit = self.view.budget(scope).get("max_spend_usd")
            if limit is None:
                continue
            if self.view.spend(scope).upto_seq < seq:
                # Every maintainer folds the same history, so its total at ``seq`` is the
                # same: publishing it is idempotent, and a later sequence always wins.
                total = SpendUsage(scope=scope, spent=round(spent, 6), upto_seq=seq)

                def publish(u: SpendUsage | None, total: SpendUsage = total
                            ) -> SpendUsage | None:
                    return total if u is None or u.upto_seq < total.upto_seq else None

                await self._update(spend_key(scope), _spend_dec.decode, publish)
            if spent > limit and live:
                await self._exceeded(Violation(scope, scope, "max_spend_usd", limit,
                                               round(spent, 6)))

    async def _close_elapsed_breakers(self) -> None:
        while True:
            now = wall_ms()
            due = [b for b in self.view.breakers.values()
                   if b.state == "open" and b.until_ms <= now]
            for breaker in due:
                try:
                    await self.close_breaker(breaker.capability)
                except CflowError as exc:
                    log.warning("closing breaker %s failed: %s", breaker.capability, exc)
            pending = [b.until_ms for b in self.view.breakers.values() if b.state == "open"
                       and b.until_ms > now]
            delay = (min(pending) - now) / 1000 + 0.01 if pending else 3600.0
            seen = self._version
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._changed.wait_for(self._moved_since(seen)),
                        min(delay, 3600.0))
            if due:
                # our own close is in flight; let the cache see it before looking again
                await asyncio.sleep(0)

    # --------------------------------------------------------------- gates

    async def pending_gates(self) -> list[dict[str, Any]]:
        """Gates waiting for a human (ready), and gates still waiting for dependencies."""
        board = await self.swarm.tasks.ensure_board()
        out = []
        for state in sorted(board.tasks.values(), key=lambda s: s.created_seq):
            if state.kind == "gate" and state.status in ("ready", "pending"):
                out.append({"task_id": state.task_id, "title": state.title,
                            "status": state.status, "waiting_for_deps": state.status == "pending",
                            "parent_id": state.parent_id, "created_ms": state.created_ms,
                            "depends_on": list(state.depends_on)})
        return out

    async def approve(self, task_id: str, note: str = "", *, actor: str | None = None
                      ) -> TaskState:
        """Approve a gate: ``TaskCompleted(epoch=0)`` by the human; its dependents get ready.

        Raises:
            NotFound: no such task. InvalidState: not a gate, or not waiting for a decision.
        """
        return await self._decide(task_id, ev.TaskCompleted(epoch=0, result=note or None),
                                  actor)

    async def reject(self, task_id: str, note: str = "", *, actor: str | None = None
                     ) -> TaskState:
        """Reject a gate: ``TaskFailed(final)``; its dependents are blocked with the reason.

        Raises:
            NotFound: no such task. InvalidState: not a gate, or not waiting for a decision.
        """
        error = f"rejected: {note}" if note else "rejected"
        return await self._decide(task_id, ev.TaskFailed(epoch=0, error=error, final=True),
                                  actor)

    async def _decide(self, task_id: str, data: ev.TaskCompleted | ev.TaskFailed,
                      actor: str | None) -> TaskState:
        """Store one decision on a ready gate; only the stored decision acts.

        Each decision has its own Msg-Id (``gate-approve-<task>`` / ``gate-reject-<task>``)
        and expects the gate's last sequence, so an approve racing a reject stores one of
        them: the other gets a conflict (never a duplicate ack of the winner's Msg-Id) and
        changes nothing. A retry of the same decision is deduplicated and acts again,
        idempotently.
        """
        tasks = self.swarm.tasks
        who = self._actor(actor)
        verb = "approve" if isinstance(data, ev.TaskCompleted) else "reject"
        state = await tasks.get(task_id)
        if state.kind != "gate":
            raise InvalidState(f"task {task_id} is not a gate (kind {state.kind})",
                               task_id=task_id)
        if state.status == "pending":
            raise InvalidState(f"gate {task_id} still waits for its dependencies",
                               task_id=task_id, status=state.status)
        if state.status != "ready":
            raise await self._already_decided(task_id, verb)
        try:
            await self.log.append(data, task_id, expected=state.seq, actor=who,
                                  msg_id=f"gate-{verb}-{task_id}")
        except ConcurrencyConflict:
            raise await self._already_decided(task_id, verb) from None
        if isinstance(data, ev.TaskFailed):
            await self._block_dependents(task_id, data.error, who)
        await self._cascade(task_id)
        return await tasks.get(task_id)

    async def _already_decided(self, task_id: str, verb: str) -> InvalidState:
        """The error for a decision that lost: it names the one that is stored."""
        history = await self.swarm.tasks.history(task_id)
        state = await self.swarm.tasks.get(task_id)
        decision = ""
        for item in reversed(history):
            event = item.event
            if isinstance(event.data, ev.TaskCompleted | ev.TaskFailed | ev.TaskCancelled):
                how = {"TaskCompleted": "approved", "TaskFailed": "rejected",
                       "TaskCancelled": "cancelled"}[event.type]
                decision = f" ({how} by {event.actor})"
                break
        past = {"approve": "approved", "reject": "rejected"}
        return InvalidState(f"gate {task_id} is already {state.status}{decision}; "
                            f"not {past[verb]}", task_id=task_id, status=state.status,
                            decided_by=decision.strip(" ()") or None)

    async def _cascade(self, task_id: str) -> None:
        """Readiness of the gate's dependents, and of theirs when they got blocked (so a
        rejection reaches the whole DAG even when no maintenance process runs)."""
        tasks = self.swarm.tasks
        todo, seen = [task_id], set[str]()
        while todo and len(seen) < 10_000:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            await tasks.evaluate_dependents(current)
            for dep_id in tasks.board.dependents.get(current, ()):
                state = await tasks.get(dep_id)
                if state.status == "blocked":
                    todo.append(dep_id)

    async def _block_dependents(self, gate_id: str, error: str, actor: str) -> None:
        """Block a rejected gate's dependents with the human's reason (same Msg-Id as the
        readiness evaluator, so whichever comes first is the one recorded)."""
        board = await self.swarm.tasks.ensure_board()
        for dep_id in sorted(board.dependents.get(gate_id, ())):
            dep = board.get(dep_id)
            if dep is None or dep.status != "pending":
                continue
            with contextlib.suppress(ConcurrencyConflict, InvalidInput):
                await self.log.append(
                    ev.TaskBlocked(reason=f"gate {gate_id} {error}", blocked_by=gate_id),
                    dep_id, expected=dep.seq, msg_id=f"blocked-{dep_id}", actor=actor,
                    dedupe_by_msg_id=True)

    # --------------------------------------------------------------- status

    async def status(self) -> dict[str, Any]:
        """Control state plus pending gates: the ``control`` section of ``cfctl status``."""
        out = await self.state()
        out["pending_gates"] = await self.pending_gates()
        return out

    async def aclose(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        pending = list(self._background)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
            self._watch_task = None


@contextlib.asynccontextmanager
async def _kv_watch(log: EventLog, bucket: str
                    ) -> AsyncIterator[tuple[bool, AsyncIterator[tuple[KvEntry, int]]]]:
    """Every key's current entry, then every change: ``(empty, entries)`` where each
    item is a typed entry (``PUT``, ``DEL``, ``PURGE``, ``MARKER``) and how many of the
    keys' current entries are still to come (0: the cache is current).

    An adapter over :meth:`EventLog.kv_subscription` because :meth:`EventLog.kv_entries`
    yields typed entries but not the pending count a cache needs to know it is current.
    """
    from cflow.streams.errors import nats_errors

    async with log.kv_subscription(bucket, last_per_subject=True) as (queue, sub):
        with nats_errors(bucket):
            info = await sub.consumer_info()
        # Only "nothing pending and nothing delivered yet" means empty (see EventLog.follow).
        delivered = info.delivered.consumer_seq if info.delivered else 0
        empty = info.num_pending == 0 and not delivered and queue.empty()

        async def entries() -> AsyncIterator[tuple[KvEntry, int]]:
            while True:
                msg = await queue.get()
                yield log.kv_entry(bucket, msg), int(msg.metadata.num_pending)

        yield empty, entries()


def replace_record(record: BreakerRecord, **changes: Any) -> BreakerRecord:
    return msgspec.structs.replace(record, **changes)


async def status_section(swarm: Swarm) -> dict[str, Any]:
    """``STATUS_SECTIONS`` entry: the control state and pending gates."""
    return await swarm.control.status()


__all__ = [
    "LIMITS",
    "SWARM",
    "BreakerRecord",
    "BreakerSettings",
    "BreakerTracker",
    "BudgetRecord",
    "ControlService",
    "ControlView",
    "ScopeRecord",
    "Violation",
    "check_create",
    "check_limits",
    "status_section",
]
