"""The claim path: create, claim, heartbeat, complete/fail/release, cancel, expiry.

Authority is the task's subject (compare-and-set on its last sequence); liveness
is the lease key in the ``leases`` bucket with a server-side TTL; exclusivity is
the epoch (the ``TaskClaimed`` sequence) that every holder write must match.
See DESIGN.md, "Tasks and leases", for the step table this module implements.

Each ``TaskService`` keeps a ``TaskBoard`` fed by an ordered push consumer on the
swarm's task events. It is what makes ``claim(wait=...)`` push-woken, and what
the maintenance loop (reaper + readiness evaluator) works from. Every process
that runs ``maintain()`` (worker, MCP adapter, projector, ``cfctl up``) acts as a
reaper; their actions carry deterministic Msg-Ids and expected sequences, so a
crowd of reapers produces each expiry and requeue once.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from cflow import events as ev
from cflow.background import stop_tasks
from cflow.errors import (
    AlreadyClaimed,
    CflowError,
    ConcurrencyConflict,
    InvalidInput,
    InvalidState,
    LeaseLost,
    NotFound,
    Paused,
    Unavailable,
)
from cflow.streams import StoredEvent, names
from cflow.streams.client import wall_ms
from cflow.tasks import (
    Action,
    TaskBoard,
    TaskState,
    apply,
    failure_outcome,
    fold,
    validate_create,
)

if TYPE_CHECKING:
    from cflow.swarm import Swarm

log = logging.getLogger("cflow.leases")

NO_LEASE_MARGIN_S = 2.0
BOARD_CATCH_UP_S = 60.0  # grace before "claimed but never leased" is reaped
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


def task_id_for_key(swarm: str, key: str) -> str:
    """Same idempotency key, same task id: creation is then naturally idempotent."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{swarm}\x00{key}"))


HeartbeatStatus = Literal["ok", "cancelled"]


class Lease:
    """A claim held by this process. ``async with lease.keep_alive():`` heartbeats it."""

    def __init__(self, service: TaskService, task: TaskState, revision: int) -> None:
        self.service = service
        self.task = task
        self.task_id = task.task_id
        self.epoch = task.epoch
        self.attempt = task.attempt
        self.owner = task.owner or ""
        self.ttl_s = task.lease_ttl_s
        self.revision = revision
        self.lost = asyncio.Event()  # set when the lease is lost or the task cancelled
        self.lost_reason: str | None = None
        self.cancelled = False
        self._beat_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"Lease({self.task_id}, epoch={self.epoch}, attempt={self.attempt})"

    async def heartbeat(self) -> HeartbeatStatus:
        async with self._beat_lock:
            status, self.revision = await self.service._heartbeat(self.task_id, self.epoch,
                                                                  self.revision)
        if status == "cancelled":
            self.cancelled = True
            self._mark_lost("cancelled")
        return status

    def _mark_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()

    async def complete(self, result: str | None = None, *, cost_usd: float | None = None,
                       output_ref: str | None = None) -> TaskState:
        return await self.service.complete(self.task_id, self.epoch, result, cost_usd=cost_usd,
                                           output_ref=output_ref, known=self.task)

    async def fail(self, error: str, *, retry: bool = True,
                   cost_usd: float | None = None) -> TaskState:
        return await self.service.fail(self.task_id, self.epoch, error, retry=retry,
                                       cost_usd=cost_usd, known=self.task)

    async def release(self, reason: str = "") -> TaskState:
        return await self.service.release(self.task_id, self.epoch, reason, known=self.task)

    @contextlib.asynccontextmanager
    async def keep_alive(self, interval_s: float | None = None,
                         on_lost: Callable[[Lease], None] | None = None
                         ) -> AsyncIterator[Lease]:
        """Heartbeat every TTL/3 in the background while the block runs.

        When the lease is lost or the task cancelled, ``self.lost`` is set and
        ``on_lost`` is called so the holder can stop its work.
        """
        period = interval_s or max(0.2, self.ttl_s / 3)

        async def beat() -> None:
            while not self.lost.is_set():
                await asyncio.sleep(period)  # a heartbeat is a timer by nature
                try:
                    await self.heartbeat()
                except LeaseLost as lost:
                    self._mark_lost(lost.reason)
                except CflowError as exc:  # NATS unreachable: keep trying until the TTL
                    log.warning("heartbeat for %s failed: %s", self.task_id, exc)
                    continue
                if self.lost.is_set() and on_lost is not None:
                    on_lost(self)
            if on_lost is not None and not self.cancelled:
                on_lost(self)

        task = asyncio.create_task(beat(), name=f"heartbeat-{self.task_id}")
        try:
            yield self
        finally:
            await stop_tasks([task])


class TaskService:
    """Tasks and leases of one swarm, for one agent identity (``swarm.agent``)."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.log = swarm.log
        self.leases_bucket = swarm.log.bucket(names.LEASES)
        self.board = TaskBoard()
        self._board_task: asyncio.Task[None] | None = None
        self._caught_up = asyncio.Event()
        self._changed = asyncio.Condition()
        self._version = 0
        self._maint_task: asyncio.Task[None] | None = None
        self._marker_task: asyncio.Task[None] | None = None
        self._timers: list[tuple[int, str, str, int]] = []
        self._timer_wake = asyncio.Event()
        self._actions: asyncio.Queue[str] = asyncio.Queue()
        self.claim_guards: list[Callable[[str, Sequence[str]], Any]] = []
        # Per-task refusals (paused scope, open breaker); the control module adds them.
        self.claim_filters: list[Callable[[TaskState], Paused | None]] = []
        self.reaped = 0

    # ------------------------------------------------------------------ the board

    async def ensure_board(self) -> TaskBoard:
        """Start following task events (once) and wait until the board is caught up."""
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
        filt = names.events_filter(self.swarm.name, "task")
        async for item in self.log.follow(filt, caught_up=self._caught_up):
            if isinstance(item, StoredEvent):
                self._absorb(item.seq, item.event)
            self._version += 1
            async with self._changed:
                self._changed.notify_all()

    def _absorb(self, seq: int, event: ev.Event) -> TaskState | None:
        state = self.board.apply(seq, event)
        if state is not None and self._maint_task is not None:
            self._actions.put_nowait(state.task_id)
            if state.status == "claimed":
                self._schedule_claim_check(state)
        return state

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
    ) -> TaskState:
        """Create a task (idempotent by ``idempotency_key``) and return its state.

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
        if task_id is None and request_id is not None:
            task_id = task_id_for_key(self.swarm.name, f"request\x00{request_id}")
        if task_id is None:
            task_id = (task_id_for_key(self.swarm.name, idempotency_key) if idempotency_key
                       else ev.new_id())
        ev.check_token(task_id, "task id")
        if idempotency_key is not None or request_id is not None:
            with contextlib.suppress(NotFound):
                return await self.get(task_id)
        if data.depends_on:
            board = await self.ensure_board()
            await self._wait_for_tasks(data.depends_on)
            board.check_new_dependencies(task_id, data.depends_on)
        for guard in self.swarm_create_guards():
            await guard(data, task_id)
        try:
            await self.log.append(data, task_id, expected=0, msg_id=f"create-{task_id}")
        except ConcurrencyConflict:
            return await self.get(task_id)  # created before, by us or a retry
        state = await self.get(task_id)
        if state.status == "pending":
            await self._evaluate(state)
            state = await self.get(task_id)
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

    async def _board_at_least(self, seq: int, within_s: float) -> None:
        """Wait until the board has folded task events up to stream sequence ``seq``."""

        def reached() -> bool:
            return self.board.last_seq >= seq

        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(reached), within_s)

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
        state = fold((item.seq, item.event) for item in items) if items else None
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
        claimed.

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
            return await self._claim_one(await self.get(task_id), owner, strict=True)
        board = await self.ensure_board()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait)
        tried: dict[str, int] = {}
        while True:
            seen = self._version
            now = wall_ms()
            lost_race = False
            for state in _spread(board.candidates(caps, now), owner):
                if tried.get(state.task_id) == state.seq or self._refused(state):
                    continue  # lost a race on this version; wait for the board to move
                try:
                    lease = await self._claim_one(state, owner, strict=False)
                except ConcurrencyConflict as lost:
                    tried[state.task_id] = state.seq
                    # Our view is behind the winner's write. Racing down a stale list
                    # costs a round trip per task someone already holds; let the push
                    # bring the board up to the winner first, then look again.
                    await self._board_at_least(
                        lost.actual or state.seq + 1,
                        min(1.0, max(0.05, deadline - loop.time())))
                    lost_race = True
                    break
                if lease is not None:
                    return lease
                tried[state.task_id] = state.seq
            if lost_race:
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            wake = remaining
            soonest = board.next_not_before(now)
            if soonest is not None:
                wake = min(wake, max(0.0, (soonest - now) / 1000))
            await self._board_moves(seen, wake)
            for guard in self.claim_guards:
                await guard(owner, caps)

    async def _claim_one(self, state: TaskState, owner: str, *, strict: bool) -> Lease | None:
        if not state.claimable_by(state.capabilities, wall_ms()):
            if strict:
                if state.kind == "gate":
                    raise InvalidState(f"task {state.task_id} is a gate: a human approves it")
                if state.status == "ready":
                    raise InvalidState(f"task {state.task_id} is backing off until "
                                       f"{state.not_before_ms} (wall ms)")
                raise AlreadyClaimed(state.task_id, state.status, state.owner)
            return None
        refusal = self._refused(state)
        if refusal is not None:
            if strict:
                raise refusal
            return None
        attempt = state.attempt + 1
        deadline = (wall_ms() + int(state.start_to_close_s * 1000)
                    if state.start_to_close_s else None)
        data = ev.TaskClaimed(owner=owner, attempt=attempt, lease_ttl_s=state.lease_ttl_s,
                              deadline_ms=deadline)
        try:
            appended = await self.log.append(data, state.task_id, expected=state.seq,
                                             actor=owner)
        except ConcurrencyConflict:
            if strict:
                now = await self.get(state.task_id)
                raise AlreadyClaimed(now.task_id, now.status, now.owner) from None
            raise  # the best-ready loop decides what losing means
        epoch = appended.seq
        record = LeaseRecord(task_id=state.task_id, owner=owner, epoch=epoch, attempt=attempt,
                             ttl_s=state.lease_ttl_s)
        prior = await self.log.kv_last(self.leases_bucket, state.task_id)
        revision = await self._put_lease(record, prior.revision if prior else 0)
        claimed = replace(state, status="claimed", seq=epoch, epoch=epoch, owner=owner,
                          attempt=attempt, deadline_ms=deadline, claimed_ms=wall_ms())
        return Lease(self, claimed, revision)

    def _refused(self, state: TaskState) -> Paused | None:
        for check in self.claim_filters:
            refusal = check(state)
            if refusal is not None:
                return refusal
        return None

    async def poke(self) -> None:
        """Wake claimers waiting for work: control state changed (resume, breaker closed)."""
        self._version += 1
        async with self._changed:
            self._changed.notify_all()

    async def _put_lease(self, record: LeaseRecord, expected: int) -> int:
        value = _lease_encoder.encode(record)
        for _ in range(5):
            try:
                return await self.log.kv_put(self.leases_bucket, record.task_id, value,
                                             expected_revision=expected, ttl_s=record.ttl_s)
            except ConcurrencyConflict:
                last = await self.log.kv_last(self.leases_bucket, record.task_id)
                current = _decode_lease(last)
                if current is not None and current.epoch > record.epoch:
                    raise LeaseLost(record.task_id, record.epoch, "a newer claim holds the lease"
                                    ) from None
                expected = last.revision if last else 0
        raise LeaseLost(record.task_id, record.epoch, "could not write the lease")

    # ----------------------------------------------------------------- heartbeat

    async def heartbeat(self, task_id: str, epoch: int) -> HeartbeatStatus:
        """Renew the lease of ``(task_id, epoch)`` (CLI form: revision read first).

        Raises:
            LeaseLost: the lease expired, was taken over, or the task moved on.
        """
        last = await self.log.kv_last(self.leases_bucket, task_id)
        current = _decode_lease(last)
        if last is None or current is None or current.epoch != epoch:
            raise LeaseLost(task_id, epoch, await self._why_lost(task_id, epoch))
        status, _ = await self._heartbeat(task_id, epoch, last.revision)
        return status

    async def _heartbeat(self, task_id: str, epoch: int, revision: int
                         ) -> tuple[HeartbeatStatus, int]:
        last_task_seq = await self.log.last_seq("task", task_id)
        if last_task_seq != epoch:
            reason = await self._why_lost(task_id, epoch)
            if reason == "cancelled":
                return "cancelled", revision
            raise LeaseLost(task_id, epoch, reason)
        for _ in range(3):
            last = await self.log.kv_last(self.leases_bucket, task_id)
            record = _decode_lease(last)
            if last is None or record is None or record.epoch != epoch:
                raise LeaseLost(task_id, epoch, "lease expired")
            # A renewal by another heartbeat of ours moves the revision; the record
            # still names our epoch, so adopting its revision is safe.
            revision = max(revision, last.revision)
            try:
                new_rev = await self.log.kv_put(self.leases_bucket, task_id, last.value,
                                                expected_revision=revision, ttl_s=record.ttl_s)
            except ConcurrencyConflict:
                continue
            return "ok", new_rev
        raise LeaseLost(task_id, epoch, "lease expired or taken over")

    async def _why_lost(self, task_id: str, epoch: int) -> str:
        items = await self.log.entity_events("task", task_id)
        if not items:
            raise NotFound("task", task_id)
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
        if items[-1].seq < epoch or not any(i.seq == epoch for i in items):
            return "epoch is not a claim of this task"
        return "lease expired"

    # ----------------------------------------------------- complete / fail / release

    async def _finish(self, task_id: str, epoch: int, data: ev.EventData, kind: str,
                      known: TaskState | None = None) -> TaskState:
        try:
            appended = await self.log.append(data, task_id, expected=epoch,
                                             msg_id=f"{kind}-{task_id}-{epoch}")
        except ConcurrencyConflict:
            raise LeaseLost(task_id, epoch, await self._why_lost(task_id, epoch)) from None
        await self._drop_lease(task_id, epoch)
        if known is not None and known.seq == epoch and not appended.duplicate:
            state = apply(known, appended.event, appended.seq)
        else:
            state = await self.get(task_id)
        if state.terminal:
            await self._evaluate_dependents(task_id)
        return state

    async def complete(self, task_id: str, epoch: int, result: str | None = None, *,
                       cost_usd: float | None = None, output_ref: str | None = None,
                       known: TaskState | None = None) -> TaskState:
        """Record the holder's result, fenced by ``epoch``.

        ``known`` is the holder's state at claim time; with it the new state is
        folded locally instead of read back.

        Raises:
            LeaseLost: the holder was fenced off; its result is not recorded.
        """
        data = ev.TaskCompleted(epoch=epoch, result=result, cost_usd=cost_usd,
                                output_ref=output_ref)
        return await self._finish(task_id, epoch, data, "complete", known)

    async def fail(self, task_id: str, epoch: int, error: str, *, retry: bool = True,
                   cost_usd: float | None = None, known: TaskState | None = None) -> TaskState:
        """Fail the attempt; retried after backoff until max attempts unless ``retry=False``.

        Raises:
            LeaseLost: the holder was fenced off.
        """
        state = known if known is not None and known.epoch == epoch else await self.get(task_id)
        if state.status != "claimed" or state.epoch != epoch:
            raise LeaseLost(task_id, epoch, await self._why_lost(task_id, epoch))
        final, not_before = failure_outcome(state, wall_ms(), retry=retry)
        data = ev.TaskFailed(epoch=epoch, error=error, final=final, not_before_ms=not_before,
                             cost_usd=cost_usd)
        return await self._finish(task_id, epoch, data, "fail", known)

    async def release(self, task_id: str, epoch: int, reason: str = "",
                      known: TaskState | None = None) -> TaskState:
        """Give the task back (the attempt is not counted).

        Raises:
            LeaseLost: the holder was fenced off.
        """
        return await self._finish(task_id, epoch, ev.TaskReleased(epoch=epoch, reason=reason),
                                  "release", known)

    async def _drop_lease(self, task_id: str, epoch: int) -> None:
        last = await self.log.kv_last(self.leases_bucket, task_id)
        record = _decode_lease(last)
        if last is not None and record is not None and record.epoch == epoch:
            with contextlib.suppress(ConcurrencyConflict):
                await self.log.kv_delete(self.leases_bucket, task_id,
                                         expected_revision=last.revision)

    async def note(self, task_id: str, text: str = "", *, epoch: int | None = None,
                   paths: Sequence[str] = (), artifact: str | None = None) -> int:
        """A progress note or artifact; never on the task's own subject."""
        await self.get(task_id)
        appended = await self.log.append(
            ev.TaskNoted(task_id=task_id, epoch=epoch, text=text, paths=tuple(paths),
                         artifact=artifact), task_id)
        return appended.seq

    # -------------------------------------------------------------------- cancel

    async def cancel(self, task_id: str, reason: str = "") -> TaskState:
        """Cancel a task; a holder learns it at its next heartbeat.

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
                await self.log.append(ev.TaskCancelled(reason=reason, epoch=epoch), task_id,
                                      expected=state.seq)
            except ConcurrencyConflict:
                continue
            if epoch is not None:
                await self._drop_lease(task_id, epoch)
            await self._evaluate_dependents(task_id)
            return await self.get(task_id)
        raise InvalidState(f"task {task_id} keeps changing; cancel not applied")

    # ----------------------------------------------------- maintenance (reaper)

    async def _evaluate_dependents(self, task_id: str) -> None:
        board = await self.ensure_board()
        # Let the board see our own write, so the evaluation uses it.
        await self._board_reaches(task_id, await self.log.last_seq("task", task_id))
        for action in board.actions_for(task_id, wall_ms()):
            await self._act(action)

    async def _act(self, action: Action, state: TaskState | None = None) -> None:
        """Carry out one idempotent maintenance action; losing the race is fine."""
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
                _, not_before = failure_outcome(state, wall_ms(), retry=True)
                data = ev.TaskRequeued(attempt=state.attempt, not_before_ms=not_before,
                                       reason=action.reason)
            case "fail":
                data = ev.TaskFailed(epoch=state.epoch, final=True,
                                     error=f"{action.reason}; attempts exhausted "
                                           f"({state.attempt}/{state.max_attempts})")
        with contextlib.suppress(ConcurrencyConflict, InvalidInput):
            await self.log.append(data, action.task_id, expected=action.expected,
                                  msg_id=action.msg_id)

    async def reap(self, task_id: str, epoch: int, reason: str) -> bool:
        """Expire the claim ``epoch`` of a task if its lease is really gone.

        Returns True if this call (or an identical earlier one) recorded the expiry.
        """
        state = self.board.get(task_id) or await self.get(task_id)
        if state.status != "claimed" or state.epoch != epoch:
            return False
        if reason != "start-to-close timeout":
            last = await self.log.kv_last(self.leases_bucket, task_id)
            record = _decode_lease(last)
            if last is not None and last.live and record is not None and record.epoch == epoch:
                return False  # still alive
        try:
            await self.log.append(
                ev.TaskLeaseExpired(epoch=epoch, owner=state.owner or "", reason=reason),
                task_id, expected=epoch, msg_id=f"expired-{task_id}-{epoch}")
        except ConcurrencyConflict:
            return False
        self.reaped += 1
        if reason == "start-to-close timeout":
            await self._drop_lease(task_id, epoch)
        expired = await self.get(task_id)
        action = self.board.after_expiry(expired, wall_ms())
        if action:
            await self._act(action, expired)
        return True

    def _schedule_claim_check(self, state: TaskState) -> None:
        now = wall_ms()
        check_at = (state.claimed_ms or now) + int((state.lease_ttl_s + NO_LEASE_MARGIN_S) * 1000)
        heapq.heappush(self._timers, (check_at, state.task_id, "lease", state.epoch))
        if state.deadline_ms is not None:
            heapq.heappush(self._timers, (state.deadline_ms, state.task_id, "deadline",
                                          state.epoch))
        self._timer_wake.set()

    async def maintain(self) -> None:
        """Run the reaper and readiness evaluator until cancelled.

        Listens for the server's lease-expiry markers, checks every claim once its
        TTL (plus a margin) has passed without a live lease, enforces
        start-to-close deadlines, and turns completed/failed dependencies into
        TaskReady/TaskBlocked. Every action is idempotent across processes.
        """
        if self._maint_task is not None:
            await asyncio.shield(self._maint_task)
            return
        self._maint_task = asyncio.current_task()
        board = await self.ensure_board()
        for state in list(board.claimed()):
            self._schedule_claim_check(state)
        for action in board.sweep(wall_ms()):
            await self._guarded(self._act(action))
        tasks = [
            asyncio.create_task(self._marker_loop(), name="lease-markers"),
            asyncio.create_task(self._timer_loop(), name="lease-timers"),
            asyncio.create_task(self._action_loop(), name="task-actions"),
            *(asyncio.create_task(hook(), name="maintenance-hook")
              for hook in getattr(self.swarm, "maintenance_hooks", ())),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            await stop_tasks(tasks)
            self._maint_task = None

    async def _guarded(self, coro: Any) -> None:
        try:
            await coro
        except CflowError as exc:
            log.warning("maintenance step failed: %s", exc)

    async def _action_loop(self) -> None:
        while True:
            task_id = await self._actions.get()
            for action in self.board.actions_for(task_id, wall_ms()):
                await self._guarded(self._act(action))

    async def _timer_loop(self) -> None:
        while True:
            self._timer_wake.clear()
            now = wall_ms()
            while self._timers and self._timers[0][0] <= now:
                _, task_id, kind, epoch = heapq.heappop(self._timers)
                state = self.board.get(task_id)
                if state is None or state.status != "claimed" or state.epoch != epoch:
                    continue
                try:
                    if kind == "deadline":
                        await self.reap(task_id, epoch, "start-to-close timeout")
                        continue
                    last = await self.log.kv_last(self.leases_bucket, task_id)
                    record = _decode_lease(last)
                    if (last is not None and last.live and record is not None
                            and record.epoch == epoch):
                        # Alive: look again one TTL after its last renewal could lapse.
                        heapq.heappush(self._timers, (now + int(state.lease_ttl_s * 1000),
                                                      task_id, "lease", epoch))
                        continue
                    reason = "lease expired" if last is not None else "claimed but never leased"
                    await self.reap(task_id, epoch, reason)
                except CflowError as exc:
                    # e.g. a stream leader election after a node loss: the check is
                    # not done, so it must not be dropped; look again shortly.
                    log.warning("lease check of %s failed, retrying: %s", task_id, exc)
                    heapq.heappush(self._timers, (now + 1000, task_id, kind, epoch))
            delay = (self._timers[0][0] - wall_ms()) / 1000 if self._timers else 3600.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), max(0.0, delay))

    async def _marker_loop(self) -> None:
        """React to the server removing a lease (TTL marker) at once."""
        async with self.log.kv_subscription(self.leases_bucket) as (queue, _):
            while True:
                msg = await queue.get()
                if "Nats-Marker-Reason" not in (msg.headers or {}):
                    continue
                task_id = msg.subject.rsplit(".", 1)[-1]
                state = self.board.get(task_id)
                if state is not None and state.status == "claimed":
                    await self._guarded(self.reap(task_id, state.epoch, "lease expired"))

    async def aclose(self) -> None:
        await stop_tasks([self._board_task])
        self._board_task = None


def _spread(candidates: Iterable[TaskState], owner: str, width: int = 8) -> list[TaskState]:
    """Best-first candidates, with the head of equal top priority rotated per claimer.

    Claimers that all reach for the single oldest task collide on one
    compare-and-set and all but one pay a wasted round trip; starting each at a
    different place among the oldest few of the top priority keeps strict
    priority order and spreads the herd.
    """
    ordered = list(candidates)
    if len(ordered) < 2:
        return ordered
    top = ordered[0].priority
    head = [s for s in ordered[:width] if s.priority == top]
    start = zlib.crc32(owner.encode()) % len(head)
    return head[start:] + head[:start] + ordered[len(head):]


def _decode_lease(entry: Any) -> LeaseRecord | None:
    if entry is None or not entry.live or not entry.value:
        return None
    try:
        return _lease_decoder.decode(entry.value)
    except msgspec.DecodeError:
        return None
