"""The worker runtime: register, stay present, claim, run, heartbeat, report.

Theory of operation
-------------------
A :class:`Worker` registers its agent and keeps its presence key alive, runs
the swarm's maintenance loop in the background (``swarm.tasks.maintain()``:
every worker is a lease reaper and, through its hooks, a presence observer),
and runs ``concurrency`` *slots*. A slot claims the
best ready task it can do (``claim(wait=...)``, woken by the task-event
subscription, never a poll), runs it through the executor inside
``lease.keep_alive()``, and records the outcome fenced by the lease's epoch:
``complete(result)`` or ``fail(error)``. When the lease is lost or the task is
cancelled, the heartbeat loop cancels the executor, which kills the process
group or stops the container; nothing is recorded (the holder was fenced off).

Output: a result is capped at ``RESULT_CAP_BYTES`` (16 KiB). When the output is
longer, the full output is kept and the completion's ``output_ref`` says where:
``note:<seq>`` is a ``TaskNoted`` event (artifact ``"output"``) on the task's
note subject, readable from any machine (outputs up to ``NOTE_OUTPUT_MAX``);
``file:<path>`` is a file under the worker's data dir for larger ones.

Stopping: :meth:`Worker.drain` (SIGTERM, first SIGINT) stops claiming and lets
running tasks finish for ``drain_grace_s``; then they are stopped and their
leases released. :meth:`Worker.abort` (second SIGINT) stops and releases at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from cflow.background import stop_tasks
from cflow.errors import CflowError, LeaseLost, Unavailable
from cflow.keepalive import check_deadline
from cflow.worker.executor import RESULT_CAP_BYTES, Executor, Outcome, TaskContext
from cflow.worker.guard import guard

if TYPE_CHECKING:
    from cflow import events as ev
    from cflow.agents import Agent
    from cflow.leases import Lease
    from cflow.swarm import Swarm

log = logging.getLogger("cflow.worker")

NOTE_OUTPUT_MAX = 512 * 1024
DEFAULT_CLAIM_WAIT_S = 30.0
STATUS_RETRY_S = 2.0  # a status write that failed is tried again this often
DEFAULT_DRAIN_GRACE_S = 30.0
CLAIM_SETTLE_S = 0.5
SLOT_STOP_SLACK_S = 5.0  # past the grace period, a slot that has not stopped is cancelled
# (a safety net: the drain hang seen in CI was a claim that lost its cancel, see
# cflow.streams.cancel_safe)
RECORD_RETRY_MAX_S = 5.0
_T = TypeVar("_T")


@dataclass
class WorkerOptions:
    name: str
    capabilities: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    concurrency: int = 1
    url: str = ""
    lease_ttl_s: float | None = None  # caps the heartbeat period at a third of this
    claim_wait_s: float = DEFAULT_CLAIM_WAIT_S
    drain_grace_s: float = DEFAULT_DRAIN_GRACE_S
    max_tasks: int | None = None  # stop (drain) after this many claims
    output_dir: Path | None = None
    runtime: str = "worker"


@dataclass
class WorkerStats:
    claimed: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    released: int = 0
    cost_usd: float = 0.0

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


@dataclass
class _Running:
    lease: Lease
    work: asyncio.Task[Outcome]
    stop_reason: str | None = None  # set when we stop it ourselves (drain/abort)


class Worker:
    """One worker process acting as agent ``options.name``."""

    def __init__(self, swarm: Swarm, executor: Executor, options: WorkerOptions,
                 *, on_event: Callable[[str, str], None] | None = None) -> None:
        self.swarm = swarm
        self.executor = executor
        self.opts = options
        self.stats = WorkerStats()
        self.agent: Agent | None = None
        self.running: dict[str, _Running] = {}
        self.draining = asyncio.Event()
        self.aborting = asyncio.Event()
        self.started = asyncio.Event()  # registered, present, slots claiming
        self._on_event = on_event
        self._claims = 0  # claims made or being made (reserved before claiming)
        self._interrupts = 0
        self._last_claim_error: str | None = None
        # The status the agent should show, written by _write_statuses: a write that
        # hangs through an outage must not hold a slot (or a lost lease's cleanup).
        self._status: tuple[ev.AgentStatus, str | None] = ("idle", None)
        self._status_changed = asyncio.Event()

    # ----------------------------------------------------------------- control

    def drain(self) -> None:
        """Stop claiming; running tasks get ``drain_grace_s`` to finish."""
        if not self.draining.is_set():
            self._emit("drain", f"draining; {_count(len(self.running), 'task')} running")
            self.draining.set()

    def abort(self) -> None:
        """Stop claiming, stop running tasks now and release them."""
        self.draining.set()
        if not self.aborting.is_set():
            self._emit("abort", "stopping now")
            self.aborting.set()
        for item in self.running.values():
            self._stop(item, "worker stopped")

    def interrupt(self) -> None:
        """SIGINT: first drains, second aborts."""
        self._interrupts += 1
        if self._interrupts == 1:
            self.drain()
        else:
            self.abort()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.drain)
        loop.add_signal_handler(signal.SIGINT, self.interrupt)

    def _emit(self, kind: str, text: str) -> None:
        log.info("%s: %s", kind, text)
        if self._on_event is not None:
            self._on_event(kind, text)

    @staticmethod
    def _stop(item: _Running, reason: str) -> None:
        if item.stop_reason is None:
            item.stop_reason = reason
        item.work.cancel()

    # --------------------------------------------------------------------- run

    async def run(self) -> WorkerStats:
        """Run until drained or aborted; returns what this worker did.

        Raises:
            CflowError: the executor's start check failed, or NATS is unreachable.
        """
        await self.executor.check()
        labels = {"executor": self.executor.name, **self.opts.labels}
        self.agent = await self.swarm.agents.register(
            self.opts.name, self.opts.capabilities, labels, runtime=self.opts.runtime)
        async with self.agent.present(reason="worker stopped"):
            background = [
                asyncio.create_task(self.swarm.tasks.maintain(), name="task-maintenance"),
                asyncio.create_task(self._exit_on_swarm_stop(), name="swarm-stop"),
                asyncio.create_task(self._write_statuses(), name="agent-status"),
            ]
            try:
                await self.swarm.tasks.ensure_board()
                await self.agent.set_status("idle", reason="ready")
                slots = [asyncio.create_task(self._slot(i), name=f"slot-{i}")
                         for i in range(max(1, self.opts.concurrency))]
                self.started.set()
                self._emit("start", f"{self.opts.name} claiming with {_count(len(slots), 'slot')}")
                await self.draining.wait()
                grace = asyncio.create_task(self._grace_period())
                try:
                    await self._stop_slots(slots)
                finally:
                    grace.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await grace
            finally:
                await stop_tasks(background)
                closer = getattr(self.executor, "aclose", None)
                if closer is not None:
                    await closer()
        return self.stats

    async def _stop_slots(self, slots: list[asyncio.Task[None]]) -> None:
        """Wait for the slots to finish after a drain; a slot still stuck well past
        the grace period is cancelled (and named in the log with where it hung)."""
        limit = (self.opts.drain_grace_s if self.running else 0.0) + SLOT_STOP_SLACK_S
        _, stuck = await asyncio.wait(slots, timeout=limit)
        for slot in stuck:
            where = "".join(f"\n  {f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}"
                            for f in slot.get_stack(limit=12))
            log.warning("worker %s: %s did not stop within %.0f s; cancelled at:%s",
                        self.opts.name, slot.get_name(), limit, where)
            slot.cancel()
        results = await asyncio.gather(*slots, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                raise result

    async def _exit_on_swarm_stop(self) -> None:
        # `cfctl swarm stop`: workers exit (drain). With --now the tasks are also
        # cancelled, so their heartbeats stop the executors at once.
        await self.swarm.control.ensure()
        await self.swarm.control.stopped.wait()
        self._emit("stop", f"swarm stopped ({self.swarm.control.view.swarm.reason}); draining")
        self.drain()

    async def _grace_period(self) -> None:
        if self.aborting.is_set() or not self.running:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.opts.drain_grace_s):
                await self.aborting.wait()
        for item in list(self.running.values()):
            self._stop(item, "drain grace period over")

    async def _slot(self, index: int) -> None:
        while not self.draining.is_set():
            if not self._reserve_claim():
                # Every claim max_tasks allows is made or being made. Once all are made,
                # drain; else leave the rest to the slot making one (it claims again
                # should its claim come back empty).
                if self.stats.claimed >= (self.opts.max_tasks or 0):
                    self.drain()
                break
            lease = None
            try:
                lease = await self._claim()
            finally:
                if lease is None:
                    self._claims -= 1  # nothing claimed: give the reservation back
            if lease is not None:
                await self._run_one(lease)

    def _reserve_claim(self) -> bool:
        """Count a claim before making it: slots claiming at once never make more
        than ``max_tasks`` claims between them."""
        if self.opts.max_tasks is not None and self._claims >= self.opts.max_tasks:
            return False
        self._claims += 1
        return True

    async def _claim(self) -> Lease | None:
        claim = asyncio.create_task(self.swarm.tasks.claim(
            agent=self.opts.name, capabilities=self.opts.capabilities,
            wait=self.opts.claim_wait_s))
        stop = asyncio.create_task(self.draining.wait())
        try:
            await asyncio.wait({claim, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not claim.done():
            # Draining. A claim in its write step finishes within milliseconds (we
            # then release what it got); one still waiting for work is cancelled.
            await asyncio.wait({claim}, timeout=CLAIM_SETTLE_S)
        if not claim.done():
            claim.cancel()
            # Should the cancel still hit the write step, the claim has no lease
            # and the reapers expire it after its TTL plus a margin.
            await asyncio.wait({claim}, timeout=SLOT_STOP_SLACK_S)
            if claim.done() and not claim.cancelled():
                with contextlib.suppress(CflowError):
                    claim.result()
            return None
        try:
            lease = claim.result()
        except CflowError as exc:  # paused, NATS unreachable, ...
            if str(exc) != self._last_claim_error:
                self._last_claim_error = str(exc)
                self._emit("claim-refused", str(exc))
            await self._pause_after_error()
            return None
        self._last_claim_error = None
        if lease is not None and self.draining.is_set():
            with contextlib.suppress(CflowError):
                await lease.release("worker draining")
            return None
        return lease

    async def _pause_after_error(self) -> None:
        # Back off after a refused claim instead of spinning; drain ends it early.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self.draining.wait()

    def _context(self, lease: Lease) -> TaskContext:
        task = lease.task
        return TaskContext(
            task_id=lease.task_id, title=task.title, body=task.body, attempt=lease.attempt,
            epoch=lease.epoch, url=self.opts.url, swarm=self.swarm.name, agent=self.opts.name,
            capabilities=task.capabilities, labels=dict(task.labels),
            timeout_s=task.start_to_close_s)

    def _set_status(self, busy: bool, task_id: str | None) -> None:
        """Ask for "busy" with ``task_id``, or "idle" once nothing runs; never waits."""
        if busy:
            self._status = ("busy", task_id)
        elif not self.running:
            self._status = ("idle", None)
        else:
            return
        self._status_changed.set()

    async def _write_statuses(self) -> None:
        """Write the latest status asked for (``set_status`` skips one the agent already
        shows); those asked for meanwhile are skipped, and one that could not be
        written is tried again every few seconds until it is."""
        while True:
            await self._status_changed.wait()
            self._status_changed.clear()
            if self.agent is None:
                continue
            try:
                await self.agent.set_status(*self._status)
            except CflowError as exc:
                log.warning("status update failed: %s", exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STATUS_RETRY_S):
                        await self._status_changed.wait()  # or a newer one comes
                self._status_changed.set()

    async def _run_one(self, lease: Lease) -> None:
        self.stats.claimed += 1
        self._emit("claimed", f"{lease.task_id} attempt {lease.attempt} ({lease.task.title})")
        if check_deadline(lease):
            # The claim came back after this holder's own deadline (a slow link, a
            # stalled process): the server may have expired the lease already and
            # another agent be running the task. Start nothing, and give it back.
            self.stats.lost += 1
            self._emit("lost", f"{lease.task_id}: {lease.lost_reason}; not started")
            await lease.release_late()
            return
        running: list[_Running] = []

        def lost(_: Lease) -> None:
            for item in running:
                if not item.work.done():
                    self._stop(item, "lease lost" if not lease.cancelled else "task cancelled")

        def renewed(_: Lease) -> None:
            holding.move(lease.kill_by)

        period = None
        if self.opts.lease_ttl_s:
            period = max(0.2, min(lease.ttl_s, self.opts.lease_ttl_s) / 3)
        outcome: Outcome | None = None
        try:
            # The keep-alive guards the work from its first instant: nothing is
            # awaited between starting the executor and watching the deadline. The
            # commands it starts are killed by the watcher process at the lease's
            # kill-by time, moved with each renewal, should this process freeze.
            with guard.holding(lease.kill_by) as holding:
                async with lease.keep_alive(interval_s=period, on_lost=lost,
                                            on_renewed=renewed):
                    work = asyncio.create_task(self.executor.run(self._context(lease)),
                                               name=f"run-{lease.task_id}")
                    item = _Running(lease, work)
                    running.append(item)
                    self.running[lease.task_id] = item
                    if self.aborting.is_set():
                        self._stop(item, "worker stopped")
                    self._set_status(True, lease.task_id)
                    try:
                        outcome = await work
                    except asyncio.CancelledError:
                        if item.stop_reason is None:
                            raise  # we are being cancelled ourselves
                    except (CflowError, OSError) as exc:  # the executor could not run it at all
                        outcome = Outcome(ok=False, error=f"{self.executor.name} executor: {exc}")
                    # Renewals go on while the result is written: a write retried through
                    # an election must not let the lease lapse and the finished work be
                    # refused and run again (the result stays fenced by the epoch).
                    await self._record(item, outcome)
        finally:
            if running:
                self.running.pop(lease.task_id, None)
                self._set_status(False, None)

    async def _record(self, item: _Running, outcome: Outcome | None) -> None:
        lease = item.lease
        try:
            if outcome is None:
                if lease.lost.is_set():
                    self.stats.lost += 1
                    self._emit("lost", f"{lease.task_id}: {lease.lost_reason}; work stopped")
                    return
                await lease.release(item.stop_reason or "worker stopped")
                self.stats.released += 1
                self._emit("released", f"{lease.task_id}: {item.stop_reason}")
                return
            if outcome.cost_usd:
                self.stats.cost_usd += outcome.cost_usd
            if outcome.ok:
                ref = await self._until_stored(lease, lambda: self._keep_output(lease, outcome))
                await self._until_stored(lease, lambda: lease.complete(
                    outcome.result, cost_usd=outcome.cost_usd, output_ref=ref))
                self.stats.completed += 1
                self._emit("completed", lease.task_id)
            else:
                state = await self._until_stored(lease, lambda: lease.fail(
                    outcome.error or "failed", retry=outcome.retry, cost_usd=outcome.cost_usd))
                self.stats.failed += 1
                final = "final" if state.status == "failed" else "will retry"
                self._emit("failed", f"{lease.task_id} ({final}): {outcome.error}")
        except LeaseLost as exc:
            self.stats.lost += 1
            self._emit("lost", f"{lease.task_id}: result refused ({exc.reason})")
        except CflowError as exc:
            # NATS unreachable even after the log's retries: the lease will expire
            # and the task be retried elsewhere; this worker goes on.
            self.stats.lost += 1
            self._emit("record-error", f"{lease.task_id}: outcome not recorded ({exc})")

    async def _until_stored(self, lease: Lease, write: Callable[[], Awaitable[_T]]) -> _T:
        """Retry a result write through outages and elections until stored or refused.

        The write is idempotent (its Msg-Id names the holder's intent at this
        epoch), so a retry after a timeout that did store it changes nothing;
        fencing refuses it once the claim is gone (``LeaseLost``). Only an abort
        of the worker stops the retries.
        """
        delay = 0.2
        while True:
            try:
                return await write()
            except LeaseLost:
                raise
            except Unavailable as exc:
                if self.aborting.is_set():
                    raise
                self._emit("record-retry", f"{lease.task_id}: {exc}; retrying in {delay:.1f} s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.aborting.wait()
            delay = min(RECORD_RETRY_MAX_S, delay * 2)

    async def _keep_output(self, lease: Lease, outcome: Outcome) -> str | None:
        """Keep the full output when the result had to be capped; returns output_ref."""
        if not outcome.truncated:
            return None
        text = outcome.output.decode(errors="replace")
        if len(outcome.output) <= NOTE_OUTPUT_MAX:
            seq = await self.swarm.tasks.note(lease.task_id, text, epoch=lease.epoch,
                                              artifact="output")
            return f"note:{seq}"
        base = self.opts.output_dir or default_output_dir(self.swarm.name)
        base.mkdir(parents=True, exist_ok=True)
        path = base / f"{lease.task_id}-{lease.epoch}.out"
        path.write_bytes(outcome.output)
        return f"file:{path}"


def _count(n: int, noun: str) -> str:
    """``1 task``, ``2 tasks`` (the runtime does not import the CLI's ``plural``)."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def default_output_dir(swarm: str) -> Path:
    from cflow.server import default_data_dir

    return default_data_dir() / "outputs" / swarm


__all__ = [
    "DEFAULT_CLAIM_WAIT_S",
    "DEFAULT_DRAIN_GRACE_S",
    "NOTE_OUTPUT_MAX",
    "RESULT_CAP_BYTES",
    "Worker",
    "WorkerOptions",
    "WorkerStats",
]
