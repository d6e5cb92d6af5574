"""The claim path: create, claim, heartbeat, complete/fail/release, cancel, expiry.

Authority is the task's subject (compare-and-set on its last sequence); liveness
is the lease key in the ``leases`` bucket with a server-side TTL; exclusivity is
the epoch (the ``TaskClaimed`` sequence) that every holder write must match.
See DESIGN.md, "Tasks and leases", for the step table this module implements.

Each ``TaskService`` keeps a ``TaskBoard`` fed by an ordered push consumer on the
swarm's task events. It is what makes ``claim(wait=...)`` push-woken, and what
the maintenance loop (reaper + readiness evaluator) works from. Every process
that runs ``maintain()`` (worker, MCP adapter, projector, ``cfctl up``) acts as a
reaper, and so does a claimer that meets a dead claim; their actions carry
deterministic Msg-Ids (a reaper's never equal a holder's) and expected
sequences, so a crowd of reapers produces each expiry and requeue once.

Time: deadlines are judged in server time (:meth:`EventLog.server_time_ms`, an
estimate anchored on server timestamps and moved by the monotonic clock) and
the holder bounds its own work on its monotonic clock; the rules are the pure
:mod:`cflow.lease_policy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from cflow import events as ev
from cflow import offers as offers_mod
from cflow.background import stop_tasks
from cflow.errors import (
    AlreadyClaimed,
    CflowError,
    ConcurrencyConflict,
    InvalidInput,
    InvalidState,
    LeaseLost,
    NotFound,
    NotHolder,
    Paused,
    ReservationConflict,
    Unavailable,
)
from cflow.keepalive import kept_alive
from cflow.lease_policy import HolderClock, LeaseOp, LeasePolicy, LeaseView, Verdict, judge
from cflow.streams import StoredEvent, names
from cflow.streams.client import (
    Appended,
    Outgoing,
    build_kv_delete,
    publish,
    ttl_header,
)
from cflow.tasks import (
    Action,
    TaskBoard,
    TaskState,
    apply,
    declared_paths,
    failure_outcome,
    fold,
    validate_create,
)

if TYPE_CHECKING:
    from cflow.feed import TaskFeed
    from cflow.swarm import Swarm

log = logging.getLogger("cflow.leases")

BOARD_CATCH_UP_S = 60.0
OFFER_REFUSED_DELAY_S = 2.0  # an offer under a paused scope comes back after this
PATHS_RECHECK_S = 0.5  # an offer whose declared paths another owner holds comes back after this
PATHS_SNAPSHOT_S = 0.2  # how old a claimer's view of the live reservations may be
PATHS_MIN_TTL_S = 2.0  # a claim's reservation of its task's paths lives at least this
OFFER_REPAIR_S = 15.0  # a ready task unoffered this long is offered again by maintainers
OFFER_REPAIR_MAX = 2000  # offers one sweep may repair (the next sweep does the rest)
LEASE_TOMBSTONE_TTL_S = 300.0  # a finished claim's lease key disappears after this
RELEASE_LATE_MAX_S = 5.0  # a late claim's release waits no longer (then the reapers do)
DROP_DEFER_S = 0.02  # a finished claim's lease delete waits this long for a write to ride with
SWEEP_INTERVAL_S = 10.0  # every maintainer re-sweeps the whole board this often
ACTION_RETRY_MAX_S = 5.0  # a maintenance write that failed is retried at least this often
SUPERVISOR_BACKOFF_MIN_S = 0.5
SUPERVISOR_BACKOFF_MAX_S = 30.0
SUPERVISOR_HEALTHY_S = 60.0  # a loop that ran this long restarts with the minimum backoff
_ID_NAMESPACE = uuid.UUID("6d1c5f8e-8a4e-4b7e-9a53-1c0f7d1e2a77")


class LeaseRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The value of a lease key: who holds the task under which epoch."""

    task_id: str
    owner: str
    epoch: int
    attempt: int
    ttl_s: float


_lease_encoder = msgspec.json.Encoder()
_lease_decoder = msgspec.json.Decoder(LeaseRecord)


def claim_lease_key(state: TaskState) -> str:
    """The leases-bucket key of a task's current (or last) claim: one key per claim."""
    return state.lease_key or f"{state.task_id}.{state.epoch}"


def task_id_for_key(swarm: str, key: str) -> str:
    """Same idempotency key, same task id: creation is then naturally idempotent."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{swarm}\x00{key}"))


HeartbeatStatus = Literal["ok", "cancelled"]


class Lease:
    """A claim held by this process. ``async with lease.keep_alive():`` renews it.

    The holder enforces its own deadline: every renewal that succeeds moves it to
    ``sent + TTL - margin`` on the monotonic clock (see :mod:`cflow.lease_policy`).
    When it passes without a successful renewal, for instance because this
    process is cut off from NATS, the lease is treated as lost and ``on_lost``
    tells the holder to stop its work, before the server can expire the lease
    and another agent claim the task. A task's start-to-close timeout caps that
    deadline (counted from when the claim was sent, less a margin), so the holder
    stops before reapers expire the claim however it renews.
    """

    def __init__(self, service: TaskService, task: TaskState, revision: int,
                 leased_sent_mono: float, value: bytes) -> None:
        self.service = service
        self.value = value  # the lease record as stored (renewals write it again)
        self.key = claim_lease_key(task)  # the claim's own key in the leases bucket
        self.task = task
        self.task_id = task.task_id
        self.epoch = task.epoch
        self.attempt = task.attempt
        self.owner = task.owner or ""
        self.ttl_s = task.lease_ttl_s
        self.policy = LeasePolicy(task.lease_ttl_s)
        self.revision = revision
        self.clock = HolderClock.start(self.policy, leased_sent_mono, task.start_to_close_s)
        self.lost = asyncio.Event()  # set when the lease is lost or the task cancelled
        self.lost_reason: str | None = None
        self.cancelled = False
        self._beat_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"Lease({self.task_id}, epoch={self.epoch}, attempt={self.attempt})"

    @property
    def deadline(self) -> float:
        """Monotonic time at which this holder gives the lease up without a renewal."""
        return self.clock.deadline

    @property
    def kill_by(self) -> float:
        """Monotonic time by which the holder's work must be dead, frozen holder or not
        (:attr:`cflow.lease_policy.HolderClock.kill_by`)."""
        return self.clock.kill_by

    async def heartbeat(self) -> HeartbeatStatus:
        """Renew once. Raises LeaseLost when the lease is gone or the deadline passed."""
        async with self._beat_lock:
            self._check_deadline()
            sent = time.monotonic()
            try:
                status, self.revision = await self.service._heartbeat(
                    self.task_id, self.epoch, self.key, self.revision, owner=self.owner,
                    ttl_s=self.ttl_s, value=self.value)
            except LeaseLost as lost:
                self.clock = self.clock.after("refused", sent_mono=sent,
                                              now_mono=time.monotonic(), reason=lost.reason)
                self._mark_lost(lost.reason)
                raise
            except CflowError:
                self.clock = self.clock.after("failed", sent_mono=sent, now_mono=time.monotonic())
                self._check_deadline()
                raise
            self.clock = self.clock.after("renewed", sent_mono=sent, now_mono=time.monotonic())
        if status == "cancelled":
            self.cancelled = True
            self._mark_lost("cancelled")
        return status

    def _check_deadline(self) -> None:
        self.clock = self.clock.check(time.monotonic())
        if self.clock.lost is not None:
            self._mark_lost(self.clock.lost)
        if self.lost.is_set() and not self.cancelled:
            raise LeaseLost(self.task_id, self.epoch, self.lost_reason or "lease lost")

    def _mark_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()

    async def complete(self, result: str | None = None, *, cost_usd: float | None = None,
                       output_ref: str | None = None) -> TaskState:
        return await self.service.complete(self.task_id, self.epoch, result, cost_usd=cost_usd,
                                           output_ref=output_ref, known=self.task,
                                           agent=self.owner)

    async def fail(self, error: str, *, retry: bool = True,
                   cost_usd: float | None = None) -> TaskState:
        return await self.service.fail(self.task_id, self.epoch, error, retry=retry,
                                       cost_usd=cost_usd, known=self.task, agent=self.owner)

    async def checkpoint(self, data: str) -> int:
        """Save progress for the next attempt (``CFLOW_CHECKPOINT``); fenced like a result.

        A note with artifact ``checkpoint``, accepted only from the holder of record.

        Raises:
            LeaseLost / NotHolder: this holder was fenced off.
        """
        return await self.service.note(self.task_id, data, epoch=self.epoch,
                                       artifact="checkpoint", actor=self.owner)

    async def release(self, reason: str = "") -> TaskState:
        return await self.service.release(self.task_id, self.epoch, reason, known=self.task,
                                          agent=self.owner)

    async def release_late(self) -> bool:
        """Give back a claim that came back past this holder's deadline (a slow link, a
        paused process): its lease may be gone and the task another agent's, so
        nothing may start on it. True if released.

        Fenced by the epoch (refused if the claim was reaped or taken meanwhile) and
        the attempt not counted, unless the deadline was the task's start-to-close
        timeout: that claim is left to expire and its attempt counts, or a timeout
        shorter than a claim takes would be claimed and given back forever. A release
        not stored within ``RELEASE_LATE_MAX_S`` is left to the reapers.
        """
        if self.clock.closed:
            return False
        try:
            async with asyncio.timeout(min(self.ttl_s, RELEASE_LATE_MAX_S)):
                await self.release("claim answered past its holder's deadline")
        except (CflowError, TimeoutError):
            return False
        return True

    @contextlib.asynccontextmanager
    async def keep_alive(self, interval_s: float | None = None,
                         on_lost: Callable[[Lease], None] | None = None,
                         on_renewed: Callable[[Lease], None] | None = None
                         ) -> AsyncIterator[Lease]:
        """Renew every ``interval_s`` (default TTL/3) in the background while the block runs.

        The keep-alive loop shared with presence and reservations
        (:mod:`cflow.keepalive`): a renewal that fails for a transient reason is
        retried at once with a short backoff, and one hanging on a dead connection is
        abandoned at the deadline; the holder's deadline bounds how long that may go
        on. When the lease is lost (refused, deadline passed) or the task cancelled,
        ``self.lost`` is set and ``on_lost`` is called (once) so the holder stops its
        work. ``on_renewed`` is called after each renewal that succeeded (the
        deadlines moved).
        """
        def lost() -> None:
            if on_lost is not None:
                on_lost(self)

        async def renew() -> HeartbeatStatus:
            status = await self.heartbeat()
            if on_renewed is not None:
                on_renewed(self)
            return status

        # heartbeat() records each renewal on self.clock and marks a refusal lost.
        async with kept_alive(self, renew, name=f"lease on {self.task_id}",
                              interval_s=interval_s, on_lost=lost):
            yield self


# An offer another process holds (its prefetch) comes back within PREFETCH_HOLD_S,
# later on a loaded machine; a claim looks again this often until then plus the slack.
ON_LOAN_RECHECK_S = 0.02
ON_LOAN_SLACK_S = 0.4
HEALTH_STALL_S = 0.05  # `cfctl status` stops gathering maintainers this long after the last


class TaskService:
    """Tasks and leases of one swarm, for one agent identity (``swarm.agent``)."""

    def __init__(self, swarm: Swarm, *, feed: TaskFeed,
                 claim_guards: Iterable[Callable[[str, Sequence[str]], Any]] = (),
                 claim_filters: Iterable[Callable[[TaskState], Paused | None]] = ()) -> None:
        """Built by :class:`~cflow.swarm.Swarm`, which hands it the process's task feed
        (the board follows it) and what guards claims (control: pause, budgets,
        breakers)."""
        self.swarm = swarm
        self.log = swarm.log
        self.feed = feed
        self.leases_bucket = swarm.log.bucket(names.LEASES)
        self.board = TaskBoard()
        self._board_task: asyncio.Task[None] | None = None
        self._caught_up = asyncio.Event()
        self._changed = asyncio.Condition()
        self._version = 0
        self._maint_task: asyncio.Task[None] | None = None
        self._marker_task: asyncio.Task[None] | None = None
        self._timers: list[tuple[int, str, str, int]] = []  # (server ms, task, kind, epoch)
        self._scheduled: dict[tuple[str, str, int], int] = {}
        self._timer_wake = asyncio.Event()
        self._actions: asyncio.Queue[tuple[str, int]] = asyncio.Queue()  # (task, failures)
        self.health = MaintenanceHealth()
        self.offers = offers_mod.OfferDesk(swarm.log)
        self._offer_due = 0.0  # loop time an offer we handed back (backoff) is due again
        self._last_offer_subject: str | None = None  # where this process last took work
        self._offered: dict[str, int] = {}  # task -> sequence of the last offer seen (maintainers)
        # Refusals of any claim (swarm paused) and per task (paused scope, open breaker).
        self.claim_guards: list[Callable[[str, Sequence[str]], Any]] = list(claim_guards)
        self.claim_filters: list[Callable[[TaskState], Paused | None]] = list(claim_filters)
        self.reaped = 0
        self._drops: list[str] = []  # finished claims' lease keys not deleted yet
        self._drop_timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Future[None]] = set()

    # ------------------------------------------------------------------ the board

    async def ensure_board(self) -> TaskBoard:
        """Subscribe the board to the task feed (once) and wait until it is caught up."""
        if self._board_task is None:
            self._board_task = asyncio.create_task(self._follow(), name="task-board")
        if not self._caught_up.is_set():
            waiter = asyncio.create_task(self._caught_up.wait())
            done, _ = await asyncio.wait({waiter, self._board_task}, timeout=BOARD_CATCH_UP_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not self._caught_up.is_set():
                waiter.cancel()
                if self._board_task in done:
                    self._board_task.result()  # re-raise why following stopped
                raise Unavailable(f"task events of swarm {self.swarm.name} not caught up "
                                  f"within {BOARD_CATCH_UP_S:g} s")
        return self.board

    async def _follow(self) -> None:
        async with self.feed.subscribe("task-board", start_seq=self.board.last_seq + 1,
                                       caught_up=self._caught_up) as events:
            async for item in events:
                self._absorb(item.seq, item.event, item.time_ms or None)
                self._version += 1
                async with self._changed:
                    self._changed.notify_all()

    def _absorb(self, seq: int, event: ev.Event, at_ms: int | None) -> TaskState | None:
        state = self.board.apply(seq, event, at_ms)
        if state is not None and self._maint_task is not None:
            self._actions.put_nowait((state.task_id, 0))
            if state.status == "claimed":
                self._schedule_claim_check(state)
        return state

    def _applied(self, state: TaskState | None, appended: Appended) -> TaskState:
        """Fold our own write locally, timed by our estimate of server time (the
        writer's wall clock, which the event's HLC carries, may be minutes off)."""
        return apply(state, appended.event, appended.seq, self.log.server_now_ms() or None)

    # -------------------------------------------------------------------- create

    async def create(
        self,
        title: str,
        *,
        body: str = "",
        priority: int = 0,
        capabilities: Iterable[str] = (),
        depends_on: Iterable[str] = (),
        parent_id: str | None = None,
        lease_ttl_s: float = 30.0,
        max_attempts: int = 3,
        backoff_initial_s: float = 1.0,
        backoff_multiplier: float = 2.0,
        backoff_max_s: float = 60.0,
        start_to_close_s: float | None = None,
        idempotency_key: str | None = None,
        labels: dict[str, str] | None = None,
        kind: Literal["task", "gate"] = "task",
        task_id: str | None = None,
        request_id: str | None = None,
        actor: str | None = None,
    ) -> TaskState:
        """Create a task (idempotent by ``idempotency_key``) and return its state.

        ``actor`` is who creates it (default: this agent), e.g. the human who requeued.

        ``request_id`` names the caller's intent: a retry with the same request id
        (after a timeout that may or may not have stored the write) returns the
        task the first try created instead of making a second one.

        Raises:
            InvalidInput: bad options.
            DependencyError: unknown dependency or a cycle.
        """
        depth = 0
        if parent_id is not None:
            parent = await self.get(parent_id)
            depth = parent.depth + 1
        data = ev.TaskCreated(
            title=title, body=body, priority=priority,
            capabilities=tuple(sorted(set(capabilities))), depends_on=tuple(depends_on),
            parent_id=parent_id, lease_ttl_s=lease_ttl_s, max_attempts=max_attempts,
            backoff_initial_s=backoff_initial_s, backoff_multiplier=backoff_multiplier,
            backoff_max_s=backoff_max_s, start_to_close_s=start_to_close_s,
            idempotency_key=idempotency_key, labels=dict(labels or {}), kind=kind, depth=depth,
        )
        validate_create(data)
        if task_id is None and idempotency_key is not None:
            task_id = task_id_for_key(self.swarm.name, idempotency_key)
        if task_id is None and request_id is not None:
            task_id = task_id_for_key(self.swarm.name, f"request\x00{request_id}")
        if task_id is None:
            task_id = ev.new_id()
        ev.check_token(task_id, "task id")
        if idempotency_key is not None or request_id is not None:
            with contextlib.suppress(NotFound):
                return await self._created_before(task_id)
        if data.depends_on:
            board = await self.ensure_board()
            await self._wait_for_tasks(data.depends_on)
            board.check_new_dependencies(task_id, data.depends_on)
        for guard in self.swarm_create_guards():
            await guard(data, task_id)
        try:
            appended = await self.log.append(data, task_id, expected=0,
                                             msg_id=f"create-{task_id}", actor=actor)
        except ConcurrencyConflict:
            return await self._created_before(task_id)  # by us or a retry
        except Unavailable as exc:
            if request_id is None and idempotency_key is None:
                raise
            again = (f"request_id={request_id!r}" if request_id is not None
                     else f"idempotency_key={idempotency_key!r}")
            raise Unavailable(f"{exc}; the task may have been stored: create it again with "
                              f"{again} to get it without making a second one",
                              task_id=task_id, request_id=request_id) from exc
        state = self._applied(None, appended)
        if state.status == "pending":
            await self._evaluate(state)
            return await self.get(task_id)
        try:
            await self._after_write(state)
        except CflowError as exc:  # the task is stored; maintainers offer it again
            log.warning("offering new task %s failed: %s", task_id, exc)
        return state

    async def _created_before(self, task_id: str) -> TaskState:
        """A task an earlier try created (maybe a process that died before offering
        it): offered again if still ready (offers are named by task and sequence)."""
        state = await self.get(task_id)
        try:
            await self._after_write(state)
        except CflowError as exc:
            log.warning("offering task %s again failed: %s", task_id, exc)
        return state

    def swarm_create_guards(self) -> list[Callable[[ev.TaskCreated, str], Any]]:
        """Hooks (budgets) that may refuse a creation; the control module adds them."""
        guards: list[Callable[[ev.TaskCreated, str], Any]] = getattr(
            self.swarm, "create_guards", [])
        return guards

    async def _wait_for_tasks(self, task_ids: Iterable[str]) -> None:
        """Let the board see tasks that exist on the stream but are not folded yet."""
        missing = [t for t in task_ids if t not in self.board.tasks]
        for task_id in missing:
            if await self.log.last_seq("task", task_id) == 0:
                continue  # truly unknown: check_new_dependencies refuses it
            await self._board_reaches(task_id, 1)

    async def _evaluate(self, state: TaskState) -> None:
        """Decide readiness of a freshly created pending task (its deps may be done)."""
        board = await self.ensure_board()
        await self._board_reaches(state.task_id, state.seq)
        current = board.get(state.task_id)
        action = board.readiness(current) if current is not None else None
        if action:
            await self._act(action)

    async def _board_reaches(self, task_id: str, seq: int, within_s: float = 10.0) -> None:
        """Wait until the board has folded ``task_id`` up to ``seq`` (our own write)."""
        def seen() -> bool:
            state = self.board.get(task_id)
            return state is not None and state.seq >= seq

        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(seen), within_s)

    async def _board_moves(self, seen: int, within_s: float) -> None:
        """Wait until the board changes after version ``seen`` (a push), or time out."""

        def moved() -> bool:
            return self._version != seen

        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(moved), within_s)

    # ---------------------------------------------------------------------- read

    async def get(self, task_id: str) -> TaskState:
        """The task's current state, folded from its own events (authoritative).

        Raises:
            NotFound: no such task.
        """
        ev.check_token(task_id, "task id")
        items = await self.log.entity_events("task", task_id)
        state = fold((item.seq, item.event, item.time_ms) for item in items) if items else None
        if state is None:
            raise NotFound("task", task_id)
        return state

    async def history(self, task_id: str) -> list[StoredEvent]:
        """Every event of the task and its notes, in stream order."""
        items = await self.log.entity_events("task", task_id)
        if not items:
            raise NotFound("task", task_id)
        notes = await self.log.entity_events("note", task_id)
        return sorted(items + notes, key=lambda item: item.seq)

    async def list(self, status: str | None = None, limit: int | None = None) -> list[TaskState]:
        board = await self.ensure_board()
        states = sorted(board.tasks.values(), key=lambda s: s.created_seq)
        if status:
            states = [s for s in states if s.status == status]
        return states[:limit] if limit else states

    # --------------------------------------------------------------------- claim

    async def claim(
        self,
        task_id: str | None = None,
        *,
        agent: str | None = None,
        capabilities: Iterable[str] = (),
        wait: float = 0.0,
    ) -> Lease | None:
        """Claim a given task, or the best ready task this agent can do.

        With ``wait`` > 0, waits up to that many seconds for work, woken by the
        task-event subscription (never a poll). Returns ``None`` when nothing was
        claimed. A named task whose holder's lease is gone (judged by server
        time) is reaped first, so reclaim needs no long-lived process.

        Raises:
            NotFound: ``task_id`` does not exist.
            AlreadyClaimed: ``task_id`` is not claimable (held, finished, pending...).
            Paused: the swarm is paused.
        """
        owner = agent or self.swarm.agent
        caps = tuple(capabilities)
        for guard in self.claim_guards:
            await guard(owner, caps)
        if task_id is not None:
            state = await self._reap_if_gone(await self.get(task_id))
            if state.status == "ready":
                await self._paths_free(state, owner)
            return await self._claim_one(state, owner, strict=True)
        return await self._claim_offered(owner, caps, wait)

    async def _claim_offered(self, owner: str, caps: tuple[str, ...], wait: float
                             ) -> Lease | None:
        """The best offer this agent may take: highest band first, one claimer per offer.

        Push-woken when waiting (an eligible offer published, or a poke); an idle
        claimer also looks again every few seconds for offers handed back with a
        delay (retry backoff, paused scope).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait)
        # Offers other claimers hold (a prefetch comes back within PREFETCH_HOLD_S):
        # even a claim that does not wait looks again once they are back.
        on_loan_until = loop.time() + offers_mod.PREFETCH_HOLD_S + ON_LOAN_SLACK_S
        while True:
            lease, on_loan = await self._take_an_offer(owner, caps)
            if lease is not None:
                return lease
            now = loop.time()
            on_loan = on_loan and self._offer_due <= now  # not an offer we handed back
            remaining = deadline - now
            if remaining <= 0 and not (on_loan and now < on_loan_until):
                return None
            look_again = min(max(remaining, 0.0) or offers_mod.IDLE_RECHECK_S,
                             offers_mod.IDLE_RECHECK_S)
            # An offer we handed back for its backoff is due again at a known time
            # (one due in the past was there to take just now: it sets no deadline).
            due = self._offer_due - now
            if due > 0:
                look_again = min(look_again, max(0.01, due))
            if on_loan:  # handed back by its holder at no known instant: look often, briefly
                look_again = min(look_again, max(0.01, on_loan_until - now), ON_LOAN_RECHECK_S)
            await self.offers.wait(caps, look_again)
            for guard in self.claim_guards:
                await guard(owner, caps)

    async def _take_an_offer(self, owner: str, caps: tuple[str, ...]
                             ) -> tuple[Lease | None, bool]:
        """A claim on the best offer, or None and whether offers exist that were
        not handed to us (held by another claimer right now: on loan)."""
        on_loan = False
        for fresh in (False, True):
            before = self.offers.refreshes
            subjects = offers_mod.eligible(await self.offers.subjects(fresh=fresh), caps)
            for subject in subjects:
                while True:
                    msg = await self.offers.fetch(subject)
                    if msg is None:
                        self.offers.forget(subject)
                        on_loan = on_loan or self.offers.refreshes != before or fresh
                        break
                    lease = await self._take(msg, owner)
                    if lease is not None:
                        self._last_offer_subject = subject
                        return lease, False
            if self.offers.refreshes != before:
                break  # that was a fresh look already
        return None, on_loan

    async def _take(self, msg: Any, owner: str) -> Lease | None:
        """Claim the task of one offer; the offer is settled whatever happens."""
        state = offers_mod.decode_offer(msg.data)
        if state is None or state.kind != "task":
            await offers_mod.settle(msg, "term")  # not an offer we can act on
            return None
        now = await self.log.server_time_ms()
        if state.not_before_ms > now:
            # Backing off (retry policy): hand it back until then, by server time.
            delay = (state.not_before_ms - now) / 1000
            await offers_mod.settle(msg, "nak", delay)
            loop = asyncio.get_running_loop()
            if self._offer_due < loop.time():
                self._offer_due = loop.time() + delay
            else:
                self._offer_due = min(self._offer_due, loop.time() + delay)
            return None
        if self._refused(state) is not None:
            await offers_mod.settle(msg, "nak", OFFER_REFUSED_DELAY_S)
            return None
        try:
            lease = await self._claim_with_paths(state, owner, now)
        except ReservationConflict:
            await offers_mod.settle(msg, "nak", PATHS_RECHECK_S)
            self._due_in(PATHS_RECHECK_S)
            return None
        except ConcurrencyConflict:
            await offers_mod.settle(msg, "term")  # stale: the task moved on since the offer
            return None
        except Paused:
            await offers_mod.settle(msg, "nak", OFFER_REFUSED_DELAY_S)
            return None
        await offers_mod.settle(msg, "ack" if lease is not None else "term")
        return lease

    async def _claim_one(self, state: TaskState, owner: str, *, strict: bool,
                         now_ms: int | None = None) -> Lease | None:
        now = now_ms if now_ms is not None else await self.log.server_time_ms()
        if not state.claimable_by(state.capabilities, now):
            if strict:
                if state.kind == "gate":
                    raise InvalidState(f"task {state.task_id} is a gate: a human approves it")
                if state.status == "ready":
                    wait_s = (state.not_before_ms - now) / 1000
                    raise InvalidState(f"task {state.task_id} is backing off for another "
                                       f"{wait_s:.1f} s (retry policy)", task_id=state.task_id)
                raise AlreadyClaimed(state.task_id, state.status, state.owner)
            return None
        refusal = self._refused(state)
        if refusal is not None:
            if strict:
                raise refusal
            return None
        # Budgets: an attempts budget above the task takes its slot before the claim.
        await self.swarm.control.reserve_attempt(state, owner)
        nonce = uuid.uuid4().hex[:16]
        data = ev.TaskClaimed(owner=owner, attempt=state.attempt + 1,
                              lease_ttl_s=state.lease_ttl_s, lease=nonce)
        record = LeaseRecord(task_id=state.task_id, owner=owner, epoch=0,
                             attempt=state.attempt + 1, ttl_s=state.lease_ttl_s)
        key = f"{state.task_id}.{nonce}"
        sent = time.monotonic()
        # The claim and its lease go out together (one flush, one round trip): the
        # lease write is started first and the append runs in this task (no gather:
        # fewer tasks and loop hops per claim). The lease key is the claim's own, so
        # a lease whose claim lost the race is just deleted.
        lease_write = asyncio.ensure_future(self._create_lease(key, record))
        claim_try: Appended | Exception
        lease_try: int | Exception
        try:
            claim_try = await self.log.append(data, state.task_id, expected=state.seq,
                                              actor=owner, after_hlc=state.hlc)
        except Exception as exc:  # decided below, once the lease write is done too
            claim_try = exc
        except BaseException:
            lease_write.cancel()
            raise
        try:
            lease_try = await lease_write
        except Exception as exc:
            lease_try = exc
        if isinstance(claim_try, BaseException):
            if not isinstance(lease_try, BaseException):
                await self._drop_lease(key)
            if not isinstance(claim_try, ConcurrencyConflict):
                raise claim_try
            with contextlib.suppress(CflowError):
                await self.swarm.control.refund_attempt(state)
            if strict:
                now_state = await self.get(state.task_id)
                raise AlreadyClaimed(now_state.task_id, now_state.status,
                                     now_state.owner) from None
            raise claim_try  # the best-ready loop decides what losing means
        claimed = self._applied(state, claim_try)
        if isinstance(lease_try, BaseException):
            # A claim without a lease must not hold the task until a reaper notices:
            # give it back (the attempt is not counted), best effort.
            with contextlib.suppress(CflowError):
                await self._finish(state.task_id, claimed.epoch,
                                   ev.TaskReleased(epoch=claimed.epoch, reason="lease not written"),
                                   "release", claimed, owner)
                await self.swarm.control.refund_attempt(state)
            if isinstance(lease_try, CflowError):
                raise lease_try
            raise Unavailable(f"lease of task {state.task_id} not written: {lease_try}")
        return Lease(self, claimed, lease_try, sent, _lease_encoder.encode(record))

    async def _claim_with_paths(self, state: TaskState, owner: str, now_ms: int
                                ) -> Lease | None:
        """Claim an offered task, its declared paths (label ``paths``) reserved for the
        claimer first: exclusive, tied to the task, as long-lived as its lease (the attempt
        renews them, :func:`cflow.gitflow.executor.attempt_paths`). Of two claimers of tasks
        sharing a path one gets the reservation, the other hands its offer back; a claim
        that is not made gives them back.

        Raises:
            ReservationConflict: another task's holder has them (released or expired,
                the offer is claimed when it comes back, every PATHS_RECHECK_S).
        """
        paths = declared_paths(state.labels)
        if not paths:
            return await self._claim_one(state, owner, strict=False, now_ms=now_ms)
        svc = self.swarm.reservations
        await svc.ensure_free(paths, owner=owner, task_id=state.task_id,
                              max_age_s=PATHS_SNAPSHOT_S)  # reads only: cheap when held
        held = await svc.reserve(paths, owner=owner, task_id=state.task_id,
                                 ttl_s=max(PATHS_MIN_TTL_S, state.lease_ttl_s))
        lease = None
        try:
            lease = await self._claim_one(state, owner, strict=False, now_ms=now_ms)
        finally:
            if lease is None:  # only this one: a stale offer may find the task held by us
                with contextlib.suppress(CflowError):
                    await svc.release(owner, reservation_id=held.id, reason="not claimed")
        return lease

    async def _paths_free(self, state: TaskState, owner: str) -> None:
        """A claim by id of a task whose declared paths another task's holder has is refused.

        Raises:
            ReservationConflict: they are held.
        """
        paths = declared_paths(state.labels)
        if paths:
            await self.swarm.reservations.ensure_free(paths, owner=owner, task_id=state.task_id)

    def _due_in(self, delay_s: float) -> None:
        """An offer handed back is due again in ``delay_s``: a waiting claim looks then."""
        loop = asyncio.get_running_loop()
        if self._offer_due < loop.time():
            self._offer_due = loop.time() + delay_s
        else:
            self._offer_due = min(self._offer_due, loop.time() + delay_s)

    def _refused(self, state: TaskState) -> Paused | None:
        for check in self.claim_filters:
            refusal = check(state)
            if refusal is not None:
                return refusal
        return None

    async def poke(self) -> None:
        """Wake claimers waiting for work: control state changed (a pause refuses them at
        once, a resume or a closed breaker lets them look again)."""
        self._version += 1
        self.offers.wake.set()
        async with self._changed:
            self._changed.notify_all()

    async def _create_lease(self, key: str, record: LeaseRecord) -> int:
        """Write the lease of a fresh claim: its own key, created (never overwritten).

        The key is per claim (``<task>.<lease>`` of its ``TaskClaimed``), so
        creating it needs no read, and a reaper that judged the claim never
        leased fences a late creation by writing the key first.

        Raises:
            LeaseLost: the key exists (a reaper fenced this claim off).
        """
        value = _lease_encoder.encode(record)
        await self._send_drops()  # earlier claims' deletes share this write's flush
        try:
            return await self.log.kv_put(self.leases_bucket, key, value, expected_revision=0,
                                         ttl_s=record.ttl_s, msg_id=f"lease-{key}")
        except ConcurrencyConflict:
            last = await self.log.kv_last(self.leases_bucket, key)
            if last is not None and last.live and last.value == value:
                return last.revision  # our own earlier try (a timeout that did store it)
            raise LeaseLost(record.task_id, record.epoch,
                            "claim reaped before its lease was written") from None

    # ------------------------------------------------------------ lease verdicts

    async def lease_view(self, state: TaskState) -> LeaseView | None:
        """What the leases bucket holds for a task's claim (the server's marker included)."""
        last = await self.log.kv_last(self.leases_bucket, claim_lease_key(state))
        if last is None:
            return None
        record = _decode_lease(last)
        op: LeaseOp = last.operation if last.operation in ("PUT", "DEL", "PURGE",  # type: ignore[assignment]
                                                            "MARKER") else "DEL"
        # The key is the claim's own; old records also name the epoch.
        return LeaseView(op=op, stored_ms=last.time_ms,
                         epoch=record.epoch if record is not None and record.epoch else None,
                         revision=last.revision)

    async def verdict(self, state: TaskState) -> Verdict:
        """Whether the claim of record of a claimed task still has a live lease."""
        verdict, _ = await self._judge(state)
        return verdict

    async def _judge(self, state: TaskState) -> tuple[Verdict, LeaseView | None]:
        view = await self.lease_view(state)
        # A missing key may mean the bucket lost its keys: then its generation,
        # not the claim, starts the holder's grace.
        generation = await self.lease_generation_ms() if view is None else 0
        now = await self.log.server_time_ms()
        verdict = judge(view, epoch=state.epoch,
                        claimed_ms=state.claimed_ms or state.created_ms, now_ms=now,
                        policy=LeasePolicy(state.lease_ttl_s), generation_ms=generation)
        return verdict, view

    async def lease_generation_ms(self) -> int:
        """Server time since which the leases bucket has kept its keys.

        Leases are soft state; the claim of record is on the task's subject. If
        the bucket loses its keys (a purge, a re-created stream), the first reader
        after that writes the generation key again, and its server timestamp
        starts every holder's grace to write its lease back before a missing key
        counts as a dead holder.
        """
        for _ in range(3):
            last = await self.log.kv_last(self.leases_bucket, names.LEASES_GENERATION_KEY)
            if last is not None and last.live:
                return last.time_ms
            try:
                await self.log.kv_put(self.leases_bucket, names.LEASES_GENERATION_KEY, b"{}",
                                      expected_revision=last.revision if last else 0)
            except ConcurrencyConflict:
                continue  # another reader wrote it: read theirs
        return await self.log.server_time_ms()

    async def _reap_if_gone(self, state: TaskState) -> TaskState:
        """Anyone may reap: expire a dead claim (and requeue it) before deciding."""
        if state.status == "claimed" and (await self.verdict(state)).gone:
            await self.reap(state.task_id, state.epoch)
            return await self.get(state.task_id)
        if state.status == "expired":
            action = self.board.after_expiry(state)
            if action is not None:
                await self._act(action, state)
            return await self.get(state.task_id)
        return state

    # ----------------------------------------------------------------- heartbeat

    async def heartbeat(self, task_id: str, epoch: int, *,
                        agent: str | None = None) -> HeartbeatStatus:
        """Renew the lease of ``(task_id, epoch)`` (CLI form: claim and lease read first).

        Raises:
            LeaseLost: the lease expired, was taken over, or the task moved on.
            NotHolder: the lease is held by another agent.
        """
        owner = agent or self.swarm.agent
        state = await self.get(task_id)
        if state.status != "claimed" or state.epoch != epoch:
            reason = await self._why_lost(task_id, epoch)
            if reason == "cancelled":
                return "cancelled"
            raise LeaseLost(task_id, epoch, reason)
        if state.owner != owner:
            raise NotHolder(task_id, epoch, state.owner or "nobody", owner)
        key = claim_lease_key(state)
        last = await self.log.kv_last(self.leases_bucket, key)
        current = _decode_lease(last)
        if last is None:
            # No trace of the key (the bucket lost its keys): write it again,
            # unless a reaper fenced it first.
            value = _lease_encoder.encode(LeaseRecord(
                task_id=task_id, owner=owner, epoch=0, attempt=state.attempt,
                ttl_s=state.lease_ttl_s))
            status, _ = await self._heartbeat(task_id, epoch, key, 0, owner=owner,
                                              ttl_s=state.lease_ttl_s, value=value)
            return status
        if current is None:
            raise LeaseLost(task_id, epoch, "lease expired")
        status, _ = await self._heartbeat(task_id, epoch, key, last.revision, owner=owner,
                                          ttl_s=current.ttl_s, value=last.value)
        return status

    async def _heartbeat(self, task_id: str, epoch: int, key: str, revision: int, *,
                         owner: str, ttl_s: float, value: bytes) -> tuple[HeartbeatStatus, int]:
        """One compare-and-set renewal on the lease's revision (one round trip).

        Whatever ends a claim also moves its lease key (expiry leaves a marker,
        completion, release, cancel and reaping delete it), so a renewal that
        succeeds proves the claim is still the holder's; a refused one is
        diagnosed from the task's events.
        """
        try:
            new_rev = await self.log.kv_put(self.leases_bucket, key, value,
                                            expected_revision=revision, ttl_s=ttl_s)
        except ConcurrencyConflict:
            last = await self.log.kv_last(self.leases_bucket, key)
            record = _decode_lease(last)
            if last is not None and record is not None and last.live:
                if record.owner != owner:
                    raise NotHolder(task_id, epoch, record.owner, owner) from None
                # Renewed by another renewal of ours meanwhile: adopt its revision.
                return await self._heartbeat(task_id, epoch, key, last.revision, owner=owner,
                                             ttl_s=ttl_s, value=value)
            if last is None and await self.log.last_seq("task", task_id) == epoch:
                # No trace of the key at all (the bucket lost its keys) and the
                # claim is still ours: write the lease again. A reaper that judged
                # it gone fenced the key first, and then this fails.
                with contextlib.suppress(ConcurrencyConflict):
                    rev = await self.log.kv_put(self.leases_bucket, key, value,
                                                expected_revision=0, ttl_s=ttl_s)
                    return "ok", rev
            reason = await self._why_lost(task_id, epoch)
            if reason == "cancelled":
                return "cancelled", revision
            raise LeaseLost(task_id, epoch, reason) from None
        return "ok", new_rev

    async def _why_lost(self, task_id: str, epoch: int) -> str:
        items = await self.log.entity_events("task", task_id)
        if not items:
            raise NotFound("task", task_id)
        if not any(i.seq == epoch and isinstance(i.event.data, ev.TaskClaimed) for i in items):
            return "epoch is not a claim of this task"
        for item in items:
            if item.seq <= epoch:
                continue
            data = item.event.data
            if isinstance(data, ev.TaskCancelled):
                return "cancelled"
            if isinstance(data, ev.TaskLeaseExpired):
                return f"{data.reason} (reaped by {item.event.actor})"
            if isinstance(data, ev.TaskCompleted | ev.TaskFailed | ev.TaskReleased):
                return f"already {item.event.type[4:].lower()}"
            return f"task moved on ({item.event.type})"
        return "lease expired"

    # ----------------------------------------------------- complete / fail / release

    async def _holder_state(self, task_id: str, epoch: int, owner: str,
                            known: TaskState | None) -> TaskState:
        """The task as claimed at ``epoch``, checked to be held by ``owner``.

        Raises:
            LeaseLost: ``epoch`` is not the current claim.
            NotHolder: it is, but another agent holds it.
        """
        if known is not None and known.status == "claimed" and known.epoch == epoch:
            state = known
        else:
            state = await self.get(task_id)
            if state.status != "claimed" or state.epoch != epoch:
                raise LeaseLost(task_id, epoch, await self._why_lost(task_id, epoch))
        if state.owner != owner:
            raise NotHolder(task_id, epoch, state.owner or "nobody", owner)
        return state

    async def _finish(self, task_id: str, epoch: int, data: ev.EventData, kind: str,
                      known: TaskState | None = None, agent: str | None = None) -> TaskState:
        owner = agent or self.swarm.agent
        before = await self._holder_state(task_id, epoch, owner, known)
        if self._last_offer_subject is not None:
            # A holder that finishes usually claims again at once: pull its next
            # offer now, in the same flush as this write.
            await self.offers.prefetch(self._last_offer_subject)
        msg_id = f"{kind}-{task_id}-{epoch}"
        try:
            appended = await self.log.append(data, task_id, expected=epoch, actor=owner,
                                             msg_id=msg_id, after_hlc=before.hlc,
                                             event_id=ev.intent_id(self.swarm.name, msg_id))
        except ConcurrencyConflict:
            raise LeaseLost(task_id, epoch, await self._why_lost(task_id, epoch)) from None
        if appended.duplicate:
            # An earlier try of ours is stored (its ack was lost): report what was
            # stored, not this retry, and do what that try may not have lived to do.
            with contextlib.suppress(CflowError):
                stored = await self.get(task_id)
                await self._after_finish(before, stored, kind)
                return stored
        state = self._applied(before, appended)
        await self._after_finish(before, state, kind)
        return state

    async def _after_finish(self, before: TaskState, state: TaskState, kind: str) -> None:
        """Drop the finished claim's lease and offer or evaluate what the result left
        (idempotent: offers are named by task and sequence)."""
        # The result is stored: nothing after this point may report it as failed.
        # What is left undone here, every maintainer redoes from the event.
        try:
            self._drop_lease_soon(claim_lease_key(before))
            await self._after_write(state)
        except CflowError as exc:
            log.warning("after %s of %s: %s (maintenance will finish it)", kind,
                        state.task_id, exc)

    async def _after_write(self, state: TaskState) -> None:
        """What a write that changed a task's status owes the others.

        A task it left ready is offered; a task it finished makes its dependents
        ready or blocked, evaluated here when this process folds the board (a
        worker, the MCP adapter, a projector) and by every maintainer otherwise.

        Raises:
            Unavailable: not done; maintainers redo it from the event.
        """
        if state.status == "ready" and state.kind == "task":
            await self.offers.publish(state)
        elif state.terminal and (self._board_task is not None or self._maint_task is not None):
            await self._evaluate_dependents(state.task_id)

    async def complete(self, task_id: str, epoch: int, result: str | None = None, *,
                       cost_usd: float | None = None, output_ref: str | None = None,
                       known: TaskState | None = None, agent: str | None = None) -> TaskState:
        """Record the holder's result, fenced by ``epoch`` and the holder's identity.

        ``known`` is the holder's state at claim time; with it the holder check
        needs no read. ``agent`` defaults to this swarm connection's agent.

        Raises:
            LeaseLost: the holder was fenced off; its result is not recorded.
            NotHolder: ``agent`` is not the holder of record.
        """
        data = ev.TaskCompleted(epoch=epoch, result=result, cost_usd=cost_usd,
                                output_ref=output_ref)
        return await self._finish(task_id, epoch, data, "complete", known, agent)

    async def fail(self, task_id: str, epoch: int, error: str, *, retry: bool = True,
                   cost_usd: float | None = None, known: TaskState | None = None,
                   agent: str | None = None) -> TaskState:
        """Fail the attempt; retried after backoff until max attempts unless ``retry=False``.

        A fenced holder's error and cost are kept as a note on the task.

        Raises:
            LeaseLost: the holder was fenced off.
            NotHolder: ``agent`` is not the holder of record.
        """
        owner = agent or self.swarm.agent
        try:
            state = await self._holder_state(task_id, epoch, owner, known)
            final, retry_after = failure_outcome(state, retry=retry)
            data = ev.TaskFailed(epoch=epoch, error=error, final=final,
                                 retry_after_ms=None if final else retry_after,
                                 cost_usd=cost_usd)
            return await self._finish(task_id, epoch, data, "fail", state, owner)
        except LeaseLost as lost:
            if not isinstance(lost, NotHolder):
                cost = f" (cost {cost_usd:g} USD)" if cost_usd else ""
                with contextlib.suppress(CflowError):
                    await self.note(task_id, f"late failure refused ({lost.reason}): "
                                             f"{error}{cost}", actor=owner)
            raise

    async def release(self, task_id: str, epoch: int, reason: str = "",
                      known: TaskState | None = None, agent: str | None = None) -> TaskState:
        """Give the task back (the attempt is not counted).

        Raises:
            LeaseLost: the holder was fenced off.
            NotHolder: ``agent`` is not the holder of record.
        """
        return await self._finish(task_id, epoch, ev.TaskReleased(epoch=epoch, reason=reason),
                                  "release", known, agent)

    async def _drop_lease(self, key: str) -> None:
        """Delete a finished claim's lease so its holder learns at once; may be lost.

        The key belongs to this one claim, which is over, so the delete needs no
        read and no expectation, and nobody waits for it (a lost delete only
        lets the lease run out its TTL, harmlessly). The tombstone expires too,
        so finished claims leave no key.
        """
        out = build_kv_delete(self.leases_bucket, key)
        headers = {**out.headers, "Nats-TTL": ttl_header(LEASE_TOMBSTONE_TTL_S)}
        # A core publish: JetStream stores it, nobody waits for the ack.
        with contextlib.suppress(Exception):
            await self.log.nc.publish(out.subject, out.payload, headers=headers)

    def _drop_lease_soon(self, key: str) -> None:
        """:meth:`_drop_lease`, sent with this process's next lease write (a holder
        that finishes usually claims again at once) or after ``DROP_DEFER_S``.

        Saves a write of its own on every finished claim; the only effect of the
        delay is a finished claim's lease key living a few milliseconds longer.
        """
        self._drops.append(key)
        if self._drop_timer is None:
            loop = asyncio.get_running_loop()
            self._drop_timer = loop.call_later(DROP_DEFER_S, self._drops_due)

    def _drops_due(self) -> None:
        self._drop_timer = None
        if self._drops:
            task = asyncio.ensure_future(self._send_drops())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _send_drops(self) -> None:
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._drop_timer = None
        drops, self._drops = self._drops, []
        for key in drops:
            await self._drop_lease(key)

    async def _fence_lease(self, key: str, revision: int = 0) -> bool:
        """Before reaping a claim, take its lease key as it was judged (absent, or
        at ``revision``): a late lease write or a renewal of that claim then fails
        (its holder learns it lost). False if the key moved since (written or renewed
        after all: the claim is alive)."""
        out = build_kv_delete(self.leases_bucket, key, expected_revision=revision)
        fence = Outgoing(out.subject, {**out.headers, "Nats-TTL": ttl_header(
            LEASE_TOMBSTONE_TTL_S)}, out.payload)
        try:
            await publish(self.log.js, fence, expected=revision)
        except ConcurrencyConflict:
            return False
        return True

    async def note(self, task_id: str, text: str = "", *, epoch: int | None = None,
                   paths: Sequence[str] = (), artifact: str | None = None,
                   actor: str | None = None) -> int:
        """A progress note or artifact; never on the task's own subject.

        A note that names an ``epoch`` speaks for the holder: it is accepted only
        from the holder of record at that epoch.

        Raises:
            NotFound: no such task. LeaseLost / NotHolder: a fenced or foreign holder.
        """
        owner = actor or self.swarm.agent
        state = await self.get(task_id)
        if epoch is not None and epoch != 0:
            await self._holder_state(task_id, epoch, owner, state)
        appended = await self.log.append(
            ev.TaskNoted(task_id=task_id, epoch=epoch, text=text, paths=tuple(paths),
                         artifact=artifact), task_id, actor=owner)
        return appended.seq

    # -------------------------------------------------------------------- cancel

    async def cancel(self, task_id: str, reason: str = "", *,
                     actor: str | None = None) -> TaskState:
        """Cancel a task; a holder learns it at its next heartbeat.

        ``actor`` is who cancels (default: this agent), e.g. the human who stopped
        the swarm with ``--now``.

        Raises:
            NotFound: no such task.
            InvalidState: already completed, failed or cancelled.
        """
        for _ in range(10):
            state = await self.get(task_id)
            if state.terminal:
                raise InvalidState(f"task {task_id} is already {state.status}",
                                   task_id=task_id, status=state.status)
            epoch = state.epoch if state.status in ("claimed", "expired") else None
            try:
                appended = await self.log.append(ev.TaskCancelled(reason=reason, epoch=epoch),
                                                 task_id, expected=state.seq,
                                                 after_hlc=state.hlc, actor=actor)
            except ConcurrencyConflict:
                continue
            try:
                if epoch is not None:
                    await self._drop_lease(claim_lease_key(state))
                await self._evaluate_dependents(task_id)
            except CflowError as exc:
                log.warning("after cancel of %s: %s (maintenance will finish it)", task_id, exc)
            return self._applied(state, appended)
        raise InvalidState(f"task {task_id} keeps changing; cancel not applied")

    # ----------------------------------------------------- maintenance (reaper)

    async def evaluate_dependents(self, task_id: str) -> None:
        """Make the dependents of a finished task ready or blocked (idempotent).

        Raises:
            Unavailable: not done; maintainers redo it from the event.
        """
        await self._evaluate_dependents(task_id)

    async def _evaluate_dependents(self, task_id: str) -> None:
        board = await self.ensure_board()
        # Let the board see our own write, so the evaluation uses it.
        await self._board_reaches(task_id, await self.log.last_seq("task", task_id))
        for action in board.actions_for(task_id):
            await self._act(action)

    async def _act(self, action: Action, state: TaskState | None = None) -> None:
        """Carry out one idempotent maintenance action; losing the race is fine.

        Raises:
            Unavailable: not stored; the caller retries.
        """
        state = state or self.board.tasks.get(action.task_id)
        if state is None:
            return
        data: ev.EventData
        match action.kind:
            case "ready":
                data = ev.TaskReady()
            case "blocked":
                data = ev.TaskBlocked(reason=action.reason, blocked_by=action.blocked_by)
            case "requeue":
                data = ev.TaskRequeued(attempt=state.attempt, retry_after_ms=0,
                                       reason=action.reason)
            case "fail":
                data = ev.TaskFailed(epoch=state.epoch, final=True,
                                     error=f"{action.reason}; attempts exhausted "
                                           f"({state.attempt}/{state.max_attempts})")
        try:
            appended = await self.log.append(data, action.task_id, expected=action.expected,
                                          msg_id=action.msg_id, after_hlc=state.hlc,
                                          event_id=ev.intent_id(self.swarm.name, action.msg_id))
        except (ConcurrencyConflict, InvalidInput):
            return  # another maintainer did it, or the task moved on
        after = self._applied(state, appended)
        if after.status == "ready" and after.kind == "task":
            await self.offers.publish(after)

    async def reap(self, task_id: str, epoch: int, reason: str | Verdict | None = None,
                   view: LeaseView | None = None) -> bool:
        """Expire the claim ``epoch`` of a task if its lease is really gone, then requeue it.

        Idempotent across processes (the expiry's Msg-Id and expected sequence are
        the claim's). ``reason`` "start-to-close timeout" expires a live claim; a
        ``Verdict`` is taken as is only with the ``view`` it was judged from.
        Returns True if this call (or an identical earlier one) recorded the expiry;
        False also when another reaper fenced the lease first (it records it).
        """
        state = self.board.get(task_id)
        if state is None or state.seq < epoch:
            state = await self.get(task_id)
        if state.status != "claimed" or state.epoch != epoch:
            return False
        if reason == "start-to-close timeout":
            verdict_text, refund = "start-to-close timeout", False
        else:
            if isinstance(reason, Verdict) and view is not None:
                verdict = reason
            else:  # judged here, so that a standing lease is fenced at what was seen
                verdict, view = await self._judge(state)
            if not verdict.gone:
                return False  # still alive (or still within the claimer's grace)
            verdict_text, refund = verdict.reap_reason, verdict is Verdict.NEVER_LEASED
            # Take the key as it was judged: absent (never leased), or a lease still
            # standing judged lapsed (the server's marker not seen: a late reply, a
            # clock ahead). A lease written or renewed since keeps its claim; a holder
            # that did neither learns at its next write that it lost it.
            fence_at = 0 if refund else view.revision if view and view.op == "PUT" else None
            if fence_at is not None and not await self._fence_lease(claim_lease_key(state),
                                                                    fence_at):
                return False  # the claim is alive
        try:
            appended = await self.log.append(
                ev.TaskLeaseExpired(epoch=epoch, owner=state.owner or "", reason=verdict_text,
                                    refund=refund),
                task_id, expected=epoch, msg_id=f"expired-{task_id}-{epoch}",
                after_hlc=state.hlc,
                event_id=ev.intent_id(self.swarm.name, f"expired-{task_id}-{epoch}"))
        except ConcurrencyConflict:
            return False
        self.reaped += 1
        expired = self._applied(state, appended)
        if reason == "start-to-close timeout":
            await self._drop_lease(claim_lease_key(state))
        action = self.board.after_expiry(expired)
        if action:
            await self._act(action, expired)
        return True

    def _schedule(self, at_ms: int, task_id: str, kind: str, epoch: int) -> None:
        key = (task_id, kind, epoch)
        if self._scheduled.get(key, -1) == at_ms:
            return
        self._scheduled[key] = at_ms
        heapq.heappush(self._timers, (at_ms, task_id, kind, epoch))
        self._timer_wake.set()

    def _schedule_claim_check(self, state: TaskState) -> None:
        """Look at a claim again when its lease could first be missing, in server time."""
        claimed = state.claimed_ms or state.created_ms
        self._schedule(LeasePolicy(state.lease_ttl_s).never_leased_at_ms(claimed),
                       state.task_id, "lease", state.epoch)
        if state.deadline_ms is not None:
            self._schedule(state.deadline_ms, state.task_id, "deadline", state.epoch)

    async def maintain(self) -> None:
        """Run the reaper and readiness evaluator until cancelled (supervised).

        Listens for the server's lease-expiry markers, checks every claim once its
        TTL (plus a margin) has passed without a live lease (server time),
        enforces start-to-close deadlines, turns completed/failed dependencies into
        TaskReady/TaskBlocked, and re-sweeps the whole board periodically. Every
        action is idempotent across processes and retried until it is stored;
        every loop is restarted with backoff when it fails.
        """
        if self._maint_task is not None:
            await asyncio.shield(self._maint_task)
            return
        self._maint_task = asyncio.current_task()
        self.health.running = True
        loops: tuple[tuple[str, Callable[[], Awaitable[None]]], ...] = (
            ("sweep", self._sweep_loop),
            ("lease-markers", self._marker_loop),
            ("lease-timers", self._timer_loop),
            ("task-actions", self._action_loop),
            ("health", self._health_loop),
            ("offers-seen", self._offers_seen_loop),
            *((getattr(hook, "__qualname__", "hook"), hook) for hook in self._hooks()),
        )
        tasks = [asyncio.create_task(self._supervise(name, loop), name=f"maintain-{name}")
                 for name, loop in loops]
        try:
            await asyncio.gather(*tasks)
        finally:
            await stop_tasks(tasks)
            self._maint_task = None
            self.health.running = False

    def _hooks(self) -> tuple[Callable[[], Awaitable[None]], ...]:
        return tuple(getattr(self.swarm, "maintenance_hooks", ()))

    async def _supervise(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one maintenance loop forever: a failure is logged, counted and restarted."""
        backoff = SUPERVISOR_BACKOFF_MIN_S
        while True:
            started = time.monotonic()
            try:
                await loop()
                return  # a loop that ends on its own is done
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure restarts the loop
                self.health.failed(name, exc)
                log.warning("maintenance loop %s failed (restarting in %.1f s): %s",
                            name, backoff, exc, exc_info=not isinstance(exc, CflowError))
            if time.monotonic() - started > SUPERVISOR_HEALTHY_S:
                backoff = SUPERVISOR_BACKOFF_MIN_S
            await asyncio.sleep(backoff)  # a restart backoff is a timer by nature
            backoff = min(SUPERVISOR_BACKOFF_MAX_S, backoff * 2)

    async def _sweep_loop(self) -> None:
        """Catch up, then sweep the whole board now and every SWEEP_INTERVAL_S."""
        board = await self.ensure_board()
        while True:
            for state in list(board.claimed()):
                self._schedule_claim_check(state)
            for action in board.sweep():
                self._retry_action(action.task_id, 0)
            await self._repair_offers(board)
            self.health.swept()
            await asyncio.sleep(SWEEP_INTERVAL_S)  # the periodic re-sweep is a timer

    async def _repair_offers(self, board: TaskBoard) -> None:
        """Offer ready tasks that nobody offered (a writer died between event and offer).

        A duplicate of an offer still queued is harmless: the second one is stale
        when fetched and refused by the compare-and-set.
        """
        now = await self.log.server_time_ms()
        budget = OFFER_REPAIR_MAX
        for state in board.ready():
            if budget <= 0:
                break
            if state.kind != "task" or self._offered.get(state.task_id) == state.seq:
                continue
            if now - (state.ready_ms or state.created_ms) < OFFER_REPAIR_S * 1000:
                continue
            try:
                await self.offers.publish(state)
            except CflowError as exc:
                self.health.failed("offers", exc)
                return
            self._offered[state.task_id] = state.seq
            budget -= 1

    async def _offers_seen_loop(self) -> None:
        """Remember which ready tasks were offered (by anyone), for the repair."""
        async def seen(msg: Any) -> None:
            mid = (msg.headers or {}).get("Nats-Msg-Id", "")
            task_id, _, seq = mid.removeprefix("offer-").rpartition("-")
            if mid.startswith("offer-") and seq.isdigit():
                self._offered[task_id] = int(seq)

        sub = await self.swarm.nc.subscribe(offers_mod.offers_filter(self.swarm.name), cb=seen)
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _retry_action(self, task_id: str, failures: int) -> None:
        if failures == 0:
            self._actions.put_nowait((task_id, 0))
            return
        delay = min(ACTION_RETRY_MAX_S, 0.2 * 2 ** (failures - 1))
        loop = asyncio.get_running_loop()
        loop.call_later(delay, self._actions.put_nowait, (task_id, failures))

    async def _action_loop(self) -> None:
        while True:
            task_id, failures = await self._actions.get()
            try:
                for action in self.board.actions_for(task_id):
                    await self._act(action)
                state = self.board.get(task_id)
                if state is not None and state.status == "cancelled" and state.epoch:
                    # A cancelled claim's holder learns it from its lease: make sure
                    # the lease is gone even if the canceller could not delete it.
                    await self._drop_lease(claim_lease_key(state))
                elif state is not None and state.terminal:
                    self._offered.pop(task_id, None)
            except CflowError as exc:
                # Not stored: try again with backoff until it is (or is moot).
                self.health.failed("task-actions", exc)
                self._retry_action(task_id, failures + 1)

    async def _timer_loop(self) -> None:
        while True:
            self._timer_wake.clear()
            now = await self.log.server_time_ms()
            while self._timers and self._timers[0][0] <= now:
                at, task_id, kind, epoch = heapq.heappop(self._timers)
                if self._scheduled.get((task_id, kind, epoch)) == at:
                    del self._scheduled[(task_id, kind, epoch)]
                state = self.board.get(task_id)
                if state is None or state.status != "claimed" or state.epoch != epoch:
                    continue
                try:
                    await self._check_claim(state, kind)
                except CflowError as exc:
                    # e.g. a stream leader election after a node loss: the check is
                    # not done, so it must not be dropped; look again shortly.
                    self.health.failed("lease-timers", exc)
                    log.warning("lease check of %s failed, retrying: %s", task_id, exc)
                    self._schedule(now + 1000, task_id, kind, epoch)
            # Server time runs at the rate of our monotonic clock: sleep the difference.
            delay = (self._timers[0][0] - self.log.server_now_ms()) / 1000 if self._timers \
                else 3600.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), min(3600.0, max(0.0, delay)))

    async def _check_claim(self, state: TaskState, kind: str) -> None:
        if kind == "deadline":
            await self.reap(state.task_id, state.epoch, "start-to-close timeout")
            return
        verdict, view = await self._judge(state)
        policy = LeasePolicy(state.lease_ttl_s)
        if verdict.gone:
            if not await self.reap(state.task_id, state.epoch, verdict, view):
                # Not expired (written to just now, or over already): if the board
                # still shows this claim, look again a TTL on rather than only at
                # the next sweep.
                now = self.board.get(state.task_id)
                if now is not None and now.status == "claimed" and now.epoch == state.epoch:
                    log.debug("claim %s epoch %d judged %s but not expired; looking again",
                              state.task_id, state.epoch, verdict.name)
                    self._schedule(await self.log.server_time_ms() + int(policy.ttl_s * 1000),
                                   state.task_id, "lease", state.epoch)
        elif verdict is Verdict.ALIVE and view is not None:
            # Look again when this renewal could first have lapsed (the marker
            # normally wakes us before that).
            self._schedule(policy.lapsed_at_ms(view.stored_ms), state.task_id, "lease",
                           state.epoch)
        elif verdict is Verdict.PENDING:
            # Within the holder's grace (a fresh claim, or a bucket just emptied by
            # a restart): look again when it has passed.
            since = max(state.claimed_ms or state.created_ms, await self.lease_generation_ms())
            self._schedule(max(policy.never_leased_at_ms(since),
                               await self.log.server_time_ms() + 100),
                           state.task_id, "lease", state.epoch)

    async def _marker_loop(self) -> None:
        """React to the server removing a lease (TTL marker) at once.

        The key names the claim (``<task>.<epoch>``), so this needs no board.
        """
        async with self.log.kv_entries(self.leases_bucket) as entries:
            async for entry in entries:
                if entry.operation != "MARKER":
                    continue
                task_id, _, suffix = entry.key.rpartition(".")
                if not task_id or not suffix:
                    continue  # not a claim's lease key (a probe, an old-style key)
                try:
                    state = self.board.get(task_id)
                    if state is None or state.status != "claimed":
                        state = await self.get(task_id)
                    if state.status != "claimed" or claim_lease_key(state) != entry.key:
                        continue  # the lease of a claim that is over already
                    await self.reap(task_id, state.epoch)
                except (NotFound, InvalidInput):
                    continue
                except CflowError as exc:
                    # Not reaped yet: the claim's timer looks again.
                    self.health.failed("lease-markers", exc)
                    state = self.board.get(task_id)
                    if state is not None and state.status == "claimed":
                        self._schedule_claim_check(state)

    async def _health_loop(self) -> None:
        """Answer `cfctl status`: how this process's maintenance is doing."""
        async def reply(msg: Any) -> None:
            body = {"agent": self.swarm.agent, "host": socket.gethostname(),
                    "pid": os.getpid(), "reaped": self.reaped, **self.health.to_dict()}
            with contextlib.suppress(Exception):
                await msg.respond(json.dumps(body).encode())

        sub = await self.swarm.nc.subscribe(health_subject(self.swarm.name), cb=reply)
        try:
            await asyncio.Event().wait()  # serve until cancelled
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def aclose(self) -> None:
        await self.offers.aclose()
        await self._send_drops()
        await stop_tasks([self._board_task])
        self._board_task = None


def health_subject(swarm: str) -> str:
    return f"{names.PREFIX}.{swarm}.maint.health"


async def maintenance_status(swarm: Swarm, within_s: float = 0.3,
                             stall_s: float = HEALTH_STALL_S) -> list[dict[str, Any]]:
    """Every maintaining process of the swarm, with its health (scatter-gather).

    Replies come from an unknown number of processes, so the gathering ends
    ``stall_s`` after the latest reply (NATS's "stall" strategy for a request to
    many), at once when the server says nobody listens (its "no responders"
    status), or ``within_s`` after the question when none answers.
    """
    nc = swarm.nc
    inbox = nc.new_inbox()
    replies: list[dict[str, Any]] = []
    arrived = asyncio.Event()
    nobody = False

    async def collect(msg: Any) -> None:
        nonlocal nobody
        if msg.headers and msg.headers.get("Status") == "503":
            nobody = True
            arrived.set()
        with contextlib.suppress(ValueError):
            replies.append(json.loads(msg.data))
            arrived.set()

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(health_subject(swarm.name), b"", reply=inbox)
        await nc.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while not nobody and (left := deadline - loop.time()) > 0:
            arrived.clear()
            try:
                async with asyncio.timeout(min(left, stall_s) if replies else left):
                    await arrived.wait()
            except TimeoutError:
                break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return sorted(replies, key=lambda r: (str(r.get("agent")), int(r.get("pid") or 0)))


class MaintenanceHealth(msgspec.Struct):  # a Struct: cheap to define (issue 18)
    """What `cfctl status` and the metrics show of a process's maintenance loop."""

    running: bool = False
    failures: int = 0
    last_error: str | None = None
    last_error_loop: str | None = None
    last_error_mono: float | None = None
    last_sweep_mono: float | None = None
    sweeps: int = 0

    def failed(self, loop: str, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.last_error_loop = loop
        self.last_error_mono = time.monotonic()

    def swept(self) -> None:
        self.sweeps += 1
        self.last_sweep_mono = time.monotonic()

    def to_dict(self) -> dict[str, object]:
        now = time.monotonic()
        return {
            "running": self.running,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_error_loop": self.last_error_loop,
            "last_error_age_s": (round(now - self.last_error_mono, 1)
                                 if self.last_error_mono is not None else None),
            "sweeps": self.sweeps,
            "last_sweep_age_s": (round(now - self.last_sweep_mono, 1)
                                 if self.last_sweep_mono is not None else None),
        }


def _decode_lease(entry: Any) -> LeaseRecord | None:
    if entry is None or not entry.live or not entry.value:
        return None
    try:
        return _lease_decoder.decode(entry.value)
    except msgspec.DecodeError:
        return None
