"""``cfctl worker --repo``: any executor, run in a fresh git worktree on the task's branch.

:class:`GitExecutor` wraps the executor the worker was given (``--exec``,
``--docker``, ``--claude``). For each attempt it

1. takes the task branch ``cflow/<task-id>`` from the shared remote (from its
   head when an earlier attempt pushed one, else from the base branch; see
   :mod:`cflow.gitflow.branch`) in a worktree of its own;
2. runs the inner executor there, with the branch, the previous attempts' notes,
   the branch head they left and the last generic checkpoint in its environment
   (``CFLOW_BRANCH``, ``CFLOW_PREVIOUS``, ``CFLOW_BRANCH_HEAD``,
   ``CFLOW_CHECKPOINT``, ``CFLOW_CONFLICTS``), and the task's declared paths
   (label ``paths``) held exclusively for the attempt (the claim reserved them:
   a task whose paths another task's holder has is not claimed; see
   :func:`attempt_paths`);
3. commits and pushes work in progress every ``wip_every_s`` while it runs and
   once at the end, each push fenced on the commit this attempt pushed last;
4. when the attempt succeeded with changes, asks for a merge
   (``MergeRequested``), records a note with the branch head, and removes the
   worktree whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING

from cflow import events as ev
from cflow.errors import (
    CflowError,
    ConflictError,
    LeaseLost,
    ReservationConflict,
    ReservationLost,
)
from cflow.gitflow.branch import BranchAttempt, start_attempt
from cflow.gitflow.git import GitError, PushRefused
from cflow.gitflow.worktrees import WorkArea
from cflow.leases import PATHS_MIN_TTL_S
from cflow.reservations import declared_paths
from cflow.streams import names
from cflow.worker.executor import Executor, Outcome, TaskContext

if TYPE_CHECKING:
    from cflow.reservations import Reservation
    from cflow.swarm import Swarm

log = logging.getLogger("cflow.gitflow")

DEFAULT_WIP_EVERY_S = 10.0
CONTEXT_CAP = 8 * 1024  # characters of previous notes handed to the next attempt
FINAL_PUSH_S = 10.0  # how long a cancelled attempt may spend saving its work
DEFAULT_RESERVE_WAIT_S = 60.0  # an attempt waits this long for its declared paths


class GitExecutor:
    """Runs ``inner`` in a worktree of ``remote`` per attempt (see the module doc)."""

    def __init__(self, inner: Executor, swarm: Swarm, remote: str, *, base: str = "main",
                 area: WorkArea | None = None, wip_every_s: float = DEFAULT_WIP_EVERY_S,
                 reserve_wait_s: float = DEFAULT_RESERVE_WAIT_S) -> None:
        self.inner = inner
        self.name = inner.name
        self.swarm = swarm
        self.base = base
        self.area = area or WorkArea(remote)
        self.wip_every_s = wip_every_s
        self.reserve_wait_s = reserve_wait_s
        self._opened = False
        self._open_lock = asyncio.Lock()

    async def check(self) -> None:
        """Raises GitError (no git, remote unreachable, no base branch) and the inner's errors."""
        await self.inner.check()
        async with self._open_lock:  # concurrent slots open the clone once
            if self._opened:
                return
            await self.area.open()
            base_ref = f"refs/heads/{self.base}"
            if (await self.area.heads(base_ref))[base_ref] is None:
                raise GitError(f"{self.area.remote} has no branch {self.base!r}",
                               base=self.base)
            self._opened = True

    async def aclose(self) -> None:
        closer = getattr(self.inner, "aclose", None)
        if closer is not None:
            await closer()
        self.area.close()

    async def run(self, ctx: TaskContext) -> Outcome:
        if not self._opened:
            await self.check()
        async with attempt_paths(self.swarm, ctx, self.reserve_wait_s) as refused:
            if refused is not None:
                return refused
            return await self._attempt(ctx)

    async def _attempt(self, ctx: TaskContext) -> Outcome:
        branch = await start_attempt(
            self.area, task_id=ctx.task_id, epoch=ctx.epoch, attempt=ctx.attempt,
            base=self.base, labels=ctx.labels, rebase=ctx.labels.get("cflow.rebase") == "1")
        try:
            return await self._run_in(branch, ctx)
        finally:
            await asyncio.shield(branch.close())

    async def _run_in(self, branch: BranchAttempt, ctx: TaskContext) -> Outcome:
        extra = await self._context_env(branch, ctx)
        inner_ctx = replace(ctx, workdir=str(branch.path), extra_env={**ctx.extra_env, **extra})
        work = asyncio.create_task(self.inner.run(inner_ctx), name=f"git-run-{ctx.task_id}")
        fenced: str | None = None
        try:
            while True:
                done, _ = await asyncio.wait({work}, timeout=self.wip_every_s)
                if done:
                    break
                try:
                    head = await branch.checkpoint(f"cflow: work in progress on {ctx.task_id}")
                    if head is not None:
                        await self._note(ctx, f"attempt {ctx.attempt} by {ctx.agent}: work in "
                                         f"progress pushed, {branch.branch} at {head[:12]}")
                except PushRefused as exc:
                    fenced = str(exc)
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError, CflowError, OSError):
                        await work
                    break
                except GitError as exc:
                    log.warning("wip checkpoint of %s failed: %s", ctx.task_id, exc)
        except asyncio.CancelledError:
            # Lease lost, task cancelled, worker stopping: stop the work, keep what it did
            # (fenced: a successor that already took the branch refuses it).
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, CflowError, OSError):
                await work
            with contextlib.suppress(CflowError, TimeoutError):
                async with asyncio.timeout(FINAL_PUSH_S):
                    await asyncio.shield(branch.checkpoint(
                        f"cflow: work in progress on {ctx.task_id} (stopped)"))
            raise
        if fenced is not None:
            return Outcome(ok=False, error=f"fenced off the task branch: {fenced}")
        outcome = work.result()
        try:
            await branch.checkpoint(f"cflow: {ctx.title}" if outcome.ok
                                    else f"cflow: {ctx.task_id} attempt {ctx.attempt} failed")
        except PushRefused as exc:
            return Outcome(ok=False, error=f"fenced off the task branch: {exc}")
        except GitError as exc:
            return Outcome(ok=False, output=outcome.output, error=f"commit or push failed: {exc}")
        requested = False
        if outcome.ok and await branch.has_work():
            task = await self.swarm.tasks.get(ctx.task_id)
            if task.status != "claimed" or task.epoch != ctx.epoch or task.owner != ctx.agent:
                # Fenced off (the final checkpoint may not have touched the remote): a
                # request now could strand the successor's; the fold ignores one that
                # still slips in between this read and the append (older epoch).
                return Outcome(ok=False, output=outcome.output,
                               error=f"fenced off: the claim at epoch {ctx.epoch} is no "
                               "longer held; no merge requested")
            priority = task.priority
            await self.swarm.log.append(
                ev.MergeRequested(task_id=ctx.task_id, epoch=ctx.epoch, branch=branch.branch,
                                  head=branch.pushed, target=self.base, priority=priority,
                                  title=ctx.title, origin=ctx.labels.get("cflow.origin")),
                ctx.task_id, msg_id=f"merge-request-{ctx.task_id}-{ctx.epoch}",
                actor=ctx.agent, dedupe_by_msg_id=True)
            requested = True
        verdict = "done" if outcome.ok else f"failed ({outcome.error})"
        text = (f"attempt {ctx.attempt} by {ctx.agent}: {verdict}; {branch.branch} at "
                f"{branch.pushed[:12]}" + ("; merge requested" if requested else ""))
        await self._note(ctx, text)
        return outcome

    async def _note(self, ctx: TaskContext, text: str) -> None:
        """A note for the next attempts (``CFLOW_PREVIOUS``); holder-fenced, best effort."""
        try:
            await self.swarm.tasks.note(ctx.task_id, text, epoch=ctx.epoch, artifact="git",
                                        actor=ctx.agent)
        except (LeaseLost, ConflictError):
            pass
        except CflowError as exc:
            log.warning("note on %s not stored: %s", ctx.task_id, exc)

    async def _context_env(self, branch: BranchAttempt, ctx: TaskContext) -> dict[str, str]:
        env = {"CFLOW_WORKTREE": str(branch.path), "CFLOW_BRANCH": branch.branch,
               "CFLOW_BASE": self.base, "CFLOW_BASE_HEAD": branch.base_head}
        if branch.previous_head is not None:
            env["CFLOW_BRANCH_HEAD"] = branch.previous_head
        if branch.conflicts:
            env["CFLOW_CONFLICTS"] = " ".join(branch.conflicts)
        previous, checkpoint = await previous_attempts(self.swarm, ctx)
        if previous:
            env["CFLOW_PREVIOUS"] = previous
        if checkpoint is not None:
            env["CFLOW_CHECKPOINT"] = checkpoint
        return env


async def previous_attempts(swarm: Swarm, ctx: TaskContext) -> tuple[str, str | None]:
    """Notes of earlier attempts (this task's, and its origin's) and the last checkpoint."""
    lines: list[str] = []
    checkpoint: str | None = None
    for task_id in dict.fromkeys(filter(None, (ctx.labels.get("cflow.origin"), ctx.task_id))):
        for item in await swarm.log.entity_events("note", task_id):
            data = item.event.data
            if not isinstance(data, ev.TaskNoted) or data.epoch == ctx.epoch:
                continue
            if data.artifact == "checkpoint":
                checkpoint = data.text
            elif data.artifact in (None, "git", "merge"):
                lines.append(f"[{item.event.actor}] {data.text}")
    text = "\n".join(lines)
    return text[-CONTEXT_CAP:], checkpoint


@contextlib.asynccontextmanager
async def attempt_paths(swarm: Swarm, ctx: TaskContext,
                        wait_s: float = DEFAULT_RESERVE_WAIT_S) -> AsyncIterator[Outcome | None]:
    """The task's declared paths (label ``paths``), held exclusively while the block runs.

    The claim reserved them for this claimer (:meth:`cflow.leases.TaskService.claim`); the
    attempt adopts that reservation and renews it. Without one (a claim by id, or it
    lapsed) the attempt reserves them itself, waiting for another holder (woken by
    reservation events) up to ``wait_s``; then it yields the failed outcome to return
    (the task is retried after its backoff). Released when the block ends.
    """
    paths = declared_paths(ctx.labels)
    if not paths:
        yield None
        return
    svc = swarm.reservations
    claimed = max((r for r in await svc.list(owner=ctx.agent) if r.task_id == ctx.task_id),
                  key=lambda r: r.reserved_ms, default=None)
    held: Reservation | Outcome | None = None
    if claimed is not None:
        with contextlib.suppress(ReservationLost):  # renewed now: the holder's clock starts
            held = await svc.renew(claimed.id, claimed.revision)
    if held is None:
        held = await _reserve(swarm, ctx, paths, wait_s)
    if isinstance(held, Outcome):
        yield held
        return
    try:
        async with svc.keep_alive(held):
            yield None
    finally:
        with contextlib.suppress(CflowError):
            await svc.release(held.owner, task_id=ctx.task_id, reason="attempt ended")


async def _reserve(swarm: Swarm, ctx: TaskContext, paths: list[str], wait_s: float
                   ) -> Reservation | Outcome:
    # As long-lived as the claim: a holder killed -9 frees its paths when its lease ends.
    ttl_s = max(PATHS_MIN_TTL_S, (await swarm.tasks.get(ctx.task_id)).lease_ttl_s)
    changed = asyncio.Event()
    watcher: asyncio.Task[None] | None = None
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                return await swarm.reservations.reserve(
                    paths, owner=ctx.agent, exclusive=True, task_id=ctx.task_id, ttl_s=ttl_s)
            except ReservationConflict as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    return Outcome(ok=False, error=f"paths reserved: {exc}")
                if watcher is None:
                    watcher = asyncio.create_task(_reservation_news(swarm, changed))
                # Expiry leaves no event: look again at least every second.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(1.0, left)):
                        await changed.wait()
                changed.clear()
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def _reservation_news(swarm: Swarm, changed: asyncio.Event) -> None:
    start = await swarm.log.stream_last_seq() + 1
    async for _ in swarm.log.follow(names.events_filter(swarm.name, "reservation"),
                                    start_seq=start):
        changed.set()


class WithPrevious:
    """Any executor (no ``--repo``): ``CFLOW_PREVIOUS`` and ``CFLOW_CHECKPOINT`` added, the
    task's declared paths held while it runs (:func:`attempt_paths`)."""

    def __init__(self, inner: Executor, swarm: Swarm) -> None:
        self.inner = inner
        self.name = inner.name
        self.swarm = swarm

    async def check(self) -> None:
        await self.inner.check()

    async def aclose(self) -> None:
        closer = getattr(self.inner, "aclose", None)
        if closer is not None:
            await closer()

    async def run(self, ctx: TaskContext) -> Outcome:
        extra: dict[str, str] = {}
        previous, checkpoint = await previous_attempts(self.swarm, ctx)
        if previous:
            extra["CFLOW_PREVIOUS"] = previous
        if checkpoint is not None:
            extra["CFLOW_CHECKPOINT"] = checkpoint
        async with attempt_paths(self.swarm, ctx) as refused:
            if refused is not None:
                return refused
            return await self.inner.run(replace(ctx, extra_env={**ctx.extra_env, **extra}))


__all__ = ["DEFAULT_WIP_EVERY_S", "GitExecutor", "WithPrevious", "attempt_paths",
           "previous_attempts"]
