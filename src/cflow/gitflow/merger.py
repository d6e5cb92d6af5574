"""``cfctl merge-queue``: one merger at a time merges finished task branches into the target.

Theory of operation
-------------------
*One merger per target, swarm-wide.* A merger holds an exclusive path
reservation on ``.cflow/merge-queue/<target>`` (cflow's lease machinery: a KV
key with a server-side TTL, renewed by compare-and-set). A second merger, on
any machine, waits for it and takes over within one TTL when the first dies.
A merger that loses its reservation stops before its next push.

*One request at a time*, in the order of :func:`cflow.gitflow.queue.queue_order`
(the task's priority, then arrival), once the requesting claim has completed:

1. fetch the target and the branch; when the requested head (or the intent's
   commit: a rebase) is already in the target (a merger died after pushing, before
   recording), record ``Merged`` without merging again;
2. merge the head into the target in a fresh worktree (``--no-ff``, the merge
   commit names the task), or in rebase mode replay the branch's commits on it
   (squashed into one when the branch holds merge commits); a conflict rejects it
   with the conflicted hunks;
3. run the check command there; a red check rejects it with its output's tail;
4. check the lease on the holder's clock, record the intent (``MergeStarted``,
   fenced on the request's last sequence), check the clock again, push the target
   *expecting the commit it merged onto* (never a blind force; if the target moved
   meanwhile, start over from 1) and record ``Merged``. A merger paused past its
   lease stops at a clock check; one paused between the intent and the push is
   fenced out by its successor, which pushes the same merge (the intent's tree, its
   check passed) onto the same target commit, so a stale push is refused by git.

A rejection first records ``MergeRejected`` naming the task's next attempt by
an id derived from the request (its idempotency key), then creates that task (a
new task that continues the branch, label ``cflow.branch``, with the rejection
as a note and ``cflow.rebase=1``, so its worktree merges the new target in and
leaves the conflicts to resolve). The retry exists only once the verdict is
secured; a merger that dies in between leaves it to the next holder, which
creates every missing retry at takeover. After ``max_rejections`` rejections of
one chain (label ``cflow.origin``) no retry is made: the chain has failed, its
merge gate (if any) is rejected with the last output. Every verdict is appended
with the request's last sequence as the expected one, so a request is decided
once, whichever merger gets there first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cflow import events as ev
from cflow.errors import (
    CflowError,
    ConcurrencyConflict,
    InvalidState,
    NotFound,
    ReservationConflict,
    Unavailable,
)
from cflow.gitflow.git import IDENTITY, GitError, PushRefused, git, git_status, push_fenced
from cflow.gitflow.queue import MergeRequest, apply_merge, fold_merges, queue_order
from cflow.gitflow.worktrees import WorkArea
from cflow.keepalive import Holding, check_deadline
from cflow.leases import task_id_for_key
from cflow.streams import StoredEvent, names

if TYPE_CHECKING:
    from cflow.reservations import Reservation
    from cflow.swarm import Swarm

log = logging.getLogger("cflow.merger")

DEFAULT_LEASE_TTL_S = 10.0
DEFAULT_MAX_REJECTIONS = 3  # rejections of one chain before it fails instead of retrying
OUTPUT_CAP = 8 * 1024
IDLE_WAKE_S = 2.0  # a safety net: new requests wake the merger at once
MergeMode = Literal["merge", "rebase"]
GIT_FAILURES = 3  # git errors on one request (the remote reachable) before it is rejected


def merger_path(target: str) -> str:
    return f".cflow/merge-queue/{target}"


async def read_queue(swarm: Swarm) -> dict[str, MergeRequest]:
    """Every merge request of the swarm, folded from the event stream."""
    items = await swarm.log.read(names.events_filter(swarm.name, "merge"))
    return fold_merges((i.seq, i.event, i.time_ms) for i in items if isinstance(i, StoredEvent))


def merge_gate_key(task_id: str) -> str:
    return f"merge-gate-{task_id}"


async def create_merge_gate(swarm: Swarm, task_id: str) -> str:
    """A gate the merger approves once ``task_id``'s work is merged (idempotent); returns its id.

    Tasks that must wait for the merge, not merely the completion, depend on it
    (``cfctl task add ... --after "$(cfctl merge-gate TASK)"``). A task whose merge
    was rejected opens the gate when its retry merges.

    Raises:
        NotFound: no such task.
    """
    task = await swarm.tasks.get(task_id)
    gate = await swarm.tasks.create(f"merged: {task.title}", kind="gate",
                                    idempotency_key=merge_gate_key(task_id),
                                    labels={"cflow.merge_gate": task_id})
    return gate.task_id


async def settled(swarm: Swarm, queue: dict[str, MergeRequest]) -> bool:
    """No open task, no request left to decide, every rejection's retry finished."""
    if any(not t.terminal for t in await swarm.tasks.list()):
        return False
    for request in queue.values():
        follow_up = request.task_id if request.status == "queued" else request.retry_task
        if follow_up is None or request.status == "merged":
            continue
        try:  # authoritative: the board may not have seen a retry created just now
            task = await swarm.tasks.get(follow_up)
        except NotFound:
            if request.status == "rejected":
                return False  # the verdict is recorded, its retry not created yet
            continue
        if not task.terminal:
            return False
        if request.status == "queued" and task.status == "completed" \
                and task.epoch == request.epoch:
            return False  # completed, not merged yet
    return True


class _RequestGitError(Exception):
    """git failed on this request's own work (the remote answered): counted per head."""

    def __init__(self, error: GitError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class Refusal:
    cause: str
    output: str


@dataclass
class MergerStats:
    merged: int = 0
    rejected: int = 0
    recovered: int = 0  # found already in the target (a merger died before recording)
    branches_deleted: int = 0  # merged branches deleted from the remote (--delete-merged)

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Merger:
    """Runs the merge queue of ``target`` on ``remote`` for one swarm."""

    def __init__(self, swarm: Swarm, remote: str, *, target: str = "main",
                 check: str | None = None, check_timeout_s: float = 600.0,
                 lease_ttl_s: float = DEFAULT_LEASE_TTL_S, area: WorkArea | None = None,
                 max_rejections: int = DEFAULT_MAX_REJECTIONS, delete_merged: bool = False,
                 mode: MergeMode = "merge",
                 on_event: Callable[[str, str], None] | None = None) -> None:
        self.swarm = swarm
        self.target = target
        self.check_cmd = check
        self.check_timeout_s = check_timeout_s
        self.lease_ttl_s = lease_ttl_s
        self.max_rejections = max(1, max_rejections)
        self.delete_merged = delete_merged
        self.mode = mode
        self.area = area or WorkArea(remote)
        self.stats = MergerStats()
        self.stopping = asyncio.Event()
        self.holding = asyncio.Event()  # set while this merger holds the queue
        self._on_event = on_event
        self._wake = asyncio.Event()
        self.queue: dict[str, MergeRequest] = {}  # folded from the merge events as they come
        self._queue_caught_up = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._git_failures: dict[tuple[str, str], int] = {}  # (task, head) -> git errors

    def _emit(self, kind: str, text: str) -> None:
        log.info("%s: %s", kind, text)
        if self._on_event is not None:
            self._on_event(kind, text)

    def stop(self) -> None:
        self.stopping.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    # ----------------------------------------------------------------- running

    async def run(self, *, until_idle: bool = False) -> MergerStats:
        """Hold the queue and merge until stopped (or, ``until_idle``, until nothing is queued
        and no task that may still request a merge is open).

        Raises:
            GitError: git missing or the remote unreachable.
        """
        await self.area.open()
        try:
            target_ref = f"refs/heads/{self.target}"
            if (await self.area.heads(target_ref))[target_ref] is None:
                raise GitError(f"{self.area.remote} has no branch {self.target!r}",
                               base=self.target)
            watcher = asyncio.create_task(self._watch(), name="merge-watch")
            self._watcher = watcher
            try:
                while not self.stopping.is_set():
                    reservation = await self._acquire()
                    if reservation is None:
                        break
                    async with self.swarm.reservations.keep_alive(
                            reservation, on_lost=lambda _: self._wake.set()) as held:
                        self.holding.set()
                        self._emit("holding", f"merge queue of {self.target!r}")
                        try:
                            done = await self._drain(held, until_idle=until_idle)
                        finally:
                            self.holding.clear()
                    if done:
                        with contextlib.suppress(CflowError):
                            await self.swarm.reservations.release(
                                reservation.owner, reservation_id=reservation.id,
                                reason="merger stopped")
                        break
                    self._emit("lost", f"the merge queue lease was lost ({held.lost_reason}); "
                               "waiting to take it again")
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                await self.area.remove(self.area.worktrees / "merge")
        finally:
            self.area.close()
        return self.stats

    async def _acquire(self) -> Reservation | None:
        waited = False
        while not self.stopping.is_set():
            try:
                return await self.swarm.reservations.reserve(
                    [merger_path(self.target)], exclusive=True, ttl_s=self.lease_ttl_s)
            except ReservationConflict as exc:
                if not waited:
                    self._emit("waiting", f"another merger holds the queue ({exc})")
                    waited = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(1.0, self.lease_ttl_s / 4)):
                    await self.stopping.wait()
        return None

    async def _watch(self) -> None:
        """Fold the merge events as they come; wake the merge loop on them and on task events."""
        async def tasks() -> None:
            board = await self.swarm.tasks.ensure_board()  # the feed follows from the start
            async with self.swarm.feed.subscribe("merger", start_seq=board.last_seq + 1
                                                 ) as events:
                async for _ in events:
                    self._wake.set()

        watching = asyncio.create_task(tasks(), name="merger-task-events")
        try:
            async for item in self.swarm.log.follow(
                    names.events_filter(self.swarm.name, "merge"),
                    caught_up=self._queue_caught_up):
                if isinstance(item, StoredEvent):
                    apply_merge(self.queue, item.seq, item.event, item.time_ms)
                self._wake.set()
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching

    async def _drain(self, held: Holding, *, until_idle: bool) -> bool:
        """Merge requests while holding the queue. True: stop for good; False: lease lost."""
        await self._caught_up()
        await self._open_gates()
        await self._finish_rejections()
        if self.delete_merged:
            await self._delete_merged_branches()
        while not self.stopping.is_set():
            if check_deadline(held):
                return False
            self._wake.clear()
            request = await self._next()
            if request is not None:
                try:
                    await self.process(request, held)
                except (_RequestGitError, GitError) as exc:
                    error = exc.error if isinstance(exc, _RequestGitError) else exc
                    # Counted per head only when the request's own work failed (a hook
                    # declined the push, a bad head); an unreachable remote is retried.
                    key = (request.task_id, request.head)
                    failures = 0
                    if isinstance(exc, _RequestGitError):
                        self._git_failures[key] = failures = self._git_failures.get(key, 0) + 1
                    if failures >= GIT_FAILURES:
                        request = self.queue[request.task_id]  # its own intents since
                        await self._reject(request, "git", f"{error}\n"
                                           f"{error.facts.get('output', '')}")
                        continue
                    self._emit("git-error", f"{request.task_id}: {error}; retrying in 1 s")
                    await self._pause(1.0)
                continue
            if until_idle and await self._idle():
                return True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(IDLE_WAKE_S):
                    await self._wake.wait()
        return True

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stopping.wait()

    async def _caught_up(self) -> None:
        """Until the queue is folded up to now; a watcher that died raises its error."""
        assert self._watcher is not None
        waiter = asyncio.create_task(self._queue_caught_up.wait())
        try:
            await asyncio.wait({waiter, self._watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not self._queue_caught_up.is_set():
            self._watcher.result()  # re-raise why following stopped
            raise Unavailable("the merge events could not be followed")

    async def _idle(self) -> bool:
        return await settled(self.swarm, self.queue)

    async def _next(self) -> MergeRequest | None:
        """The first queued request whose claim has completed (priority, then arrival)."""
        board = await self.swarm.tasks.ensure_board()
        ready: list[tuple[tuple[int, int], MergeRequest]] = []
        for request in queue_order(self.queue.values(), self.target):
            task = board.get(request.task_id)
            if task is None or task.status != "completed" or task.epoch != request.epoch:
                continue  # still running, or a superseded attempt's request
            ready.append(((-task.priority, request.seq), request))
        for _, request in sorted(ready, key=lambda item: item[0]):
            with contextlib.suppress(NotFound):  # the board may lag: ask the task's log
                task = await self.swarm.tasks.get(request.task_id)
                if task.status == "completed" and task.epoch == request.epoch:
                    return request
        return None

    # -------------------------------------------------------------- one request

    async def process(self, request: MergeRequest, held: Holding) -> None:
        """Merge one request or reject it (see the module doc).

        Before the push the merger checks its holder clock and records the intent
        (``MergeStarted``, fenced on the request's last sequence). A successor that
        finds an intent onto the target's current commit merges the same head onto it
        again and, the tree being the one whose check passed, pushes without deciding
        anew: whichever push lands first moves the target, the other is refused.
        """
        target_ref = f"refs/heads/{self.target}"
        branch_ref = f"refs/heads/{request.branch}"
        while not check_deadline(held):
            heads = await self.area.heads(target_ref, branch_ref)
            before = heads[target_ref]
            if before is None:
                raise GitError(f"the remote has no branch {self.target!r}", base=self.target)
            if not await _has_commit(self.area, request.head):
                await self._reject(request, "missing", f"commit {request.head} of "
                                   f"{request.branch} is not on the remote")
                return
            if await _is_ancestor(self.area, request.head, before) or (
                    request.intent_commit is not None
                    and await _is_ancestor(self.area, request.intent_commit, before)):
                self.stats.recovered += 1  # pushed by a merger that died before recording
                await self._record_merged(request, before, before, None)
                return
            path = await self.area.reuse("merge", before)  # one worktree, reset per request
            trusted = request.intent_tree if request.intent_previous == before else None
            try:
                verdict = await self._merge_and_check(request, path, trusted_tree=trusted)
            except GitError as exc:
                raise _RequestGitError(exc) from exc
            if isinstance(verdict, Refusal):
                await self._reject(request, verdict.cause, verdict.output)
                return
            merged, tree, check_s = verdict
            if merged == before:  # rebase mode: every change is in the target already
                self.stats.recovered += 1
                await self._record_merged(request, before, before, None)
                return
            if check_deadline(held):
                return  # fenced off before the push: the next holder redoes it
            intent = await self._append(request, ev.MergeStarted(
                task_id=request.task_id, head=request.head, target=self.target,
                previous=before, commit=merged, tree=tree, merger=self.swarm.agent))
            if intent is None:
                return  # another merger, or a person (removed, skipped), got there first
            request = intent
            if check_deadline(held):
                return  # the intent stands: the next holder pushes the same merge
            try:
                await push_fenced(self.area.repo, merged, target_ref, before)
            except GitError as exc:
                raise _RequestGitError(exc) from exc
            except PushRefused:
                self._emit("retry", f"{self.target} moved during the merge of "
                           f"{request.task_id}; merging again")
                continue
            await self._record_merged(request, before, merged, check_s)
            return

    async def _merge_and_check(self, request: MergeRequest, path: Path, *,
                               trusted_tree: str | None = None
                               ) -> tuple[str, str, float | None] | Refusal:
        """(merged commit, its tree, check seconds), or why the request is rejected.

        The check is skipped when the merge's tree is ``trusted_tree`` (an intent's, whose
        check passed)."""
        title = request.title or request.task_id
        if self.mode == "rebase":
            refusal = await self._rebase(request, path)
        else:
            refusal = await self._integrate(
                request, path, ("merge", "--abort"), "merge", "--no-ff", "--no-edit",
                "-m", f"Merge {request.branch}: {title}",
                "-m", f"Cflow-Task: {request.task_id}", request.head)
        if refusal is not None:
            return refusal
        merged = await git("rev-parse", "HEAD", cwd=path)
        tree = await git("rev-parse", "HEAD^{tree}", cwd=path)
        if not self.check_cmd or tree == trusted_tree:
            return merged, tree, None
        self._emit("check", f"{request.task_id}: {self.check_cmd}")
        started = time.monotonic()
        ok, output = await _run_check(self.check_cmd, str(path), self.check_timeout_s,
                                      self.area)
        if not ok:
            return Refusal("check", output[-OUTPUT_CAP:])
        return merged, tree, round(time.monotonic() - started, 3)

    async def _integrate(self, request: MergeRequest, path: Path, abort: tuple[str, ...],
                         *args: str) -> Refusal | None:
        """Run one integrating git command (merge, rebase, squash) in ``path``; a conflict
        is a refusal with the conflicted hunks (the command undone by ``abort``)."""
        code, out, err = await git_status(*args, cwd=path, env=IDENTITY)
        if code == 0:
            return None
        conflicted = await git("diff", "--name-only", "--diff-filter=U", cwd=path, check=False)
        if not conflicted.strip():
            raise GitError(f"{args[0]} of {request.branch} failed: "
                           f"{(out + err).strip()[-300:]}")
        hunks = await git("diff", cwd=path, check=False)
        await git_status(*abort, cwd=path)
        text = (f"{args[0]} conflict in {', '.join(conflicted.split())} "
                f"{'rebasing' if args[0] == 'rebase' else 'merging'} {request.branch} "
                f"{'onto' if args[0] == 'rebase' else 'into'} {self.target}\n{hunks}")
        return Refusal("conflict", text[:OUTPUT_CAP])

    async def _rebase(self, request: MergeRequest, path: Path) -> Refusal | None:
        """Rebase mode: the branch's commits replayed on the target (HEAD of ``path``), for a
        fast-forward. A branch with merge commits (a retry that merged the target in to
        resolve a conflict) becomes one squashed commit: replaying its commits one by one
        would lose the resolution, which only its merge commit holds."""
        onto = await git("rev-parse", "HEAD", cwd=path)
        await git_status("rebase", "--quit", cwd=path)  # a dead merger's, in this worktree
        if await git("rev-list", "--merges", f"{onto}..{request.head}", cwd=path):
            refusal = await self._integrate(request, path, ("reset", "--hard", "--quiet"),
                                            "merge", "--squash", request.head)
            staged, _, _ = await git_status("diff", "--cached", "--quiet", cwd=path)
            if refusal is None and staged != 0:  # nothing staged: all in the target already
                await git("commit", "--quiet", "--no-verify", "-m",
                          f"{request.title or request.task_id} ({request.branch}, squashed)",
                          "-m", f"Cflow-Task: {request.task_id}", cwd=path, env=IDENTITY)
            return refusal
        await git("checkout", "--quiet", "--detach", request.head, cwd=path)
        return await self._integrate(request, path, ("rebase", "--abort"),
                                     "rebase", "--quiet", onto)

    async def _record_merged(self, request: MergeRequest, before: str, after: str,
                             check_s: float | None) -> None:
        decided = await self._append(
            request, ev.Merged(task_id=request.task_id, head=request.head, target=self.target,
                               previous=before, commit=after, merger=self.swarm.agent,
                               check_s=check_s),
            msg_id=f"merged-{request.task_id}-{request.head}")
        if decided is None:
            return
        await self._open_gate(request)
        self.stats.merged += 1
        self._emit("merged", f"{request.task_id} ({request.branch}) -> {self.target} "
                   f"{after[:12]}")
        if self.delete_merged:
            await self._delete_branches([request])

    async def _delete_merged_branches(self) -> None:
        """At takeover: branches of merges recorded by a merger that died before deleting."""
        await self._delete_branches([r for r in self.queue.values()
                                     if r.status == "merged" and r.target == self.target])

    async def _delete_branches(self, merged: list[MergeRequest]) -> None:
        """Delete the remote branches still at the head that was merged (a fenced delete:
        a branch someone pushed to since is kept); best effort, the next takeover retries."""
        if not merged:
            return
        refs = {f"refs/heads/{r.branch}": r.head for r in merged}
        try:  # one listing of the task branches left, however long the queue's history
            listing = await git("ls-remote", "origin", "refs/heads/cflow/*",
                                cwd=self.area.repo)
            heads = {name: sha for sha, _, name in (line.partition("\t")
                                                     for line in listing.splitlines())}
            for ref, head in refs.items():
                if heads.get(ref) == head:
                    with contextlib.suppress(PushRefused):
                        await push_fenced(self.area.repo, "", ref, head)
                        self.stats.branches_deleted += 1
        except GitError as exc:
            self._emit("git-error", f"deleting merged branches: {exc}")

    async def _reject(self, request: MergeRequest, cause: str, output: str) -> None:
        """Record the verdict (fenced), then create the retry it names (or fail the chain)."""
        retry: str | None = None
        origin = request.origin or request.task_id
        earlier = sum(1 for r in self.queue.values() if r.status == "rejected"
                      and (r.origin or r.task_id) == origin and r.task_id != request.task_id)
        if earlier + 1 >= self.max_rejections:
            output = (f"{origin} failed: {earlier + 1} merges of its branch rejected "
                      f"(--max-rejections {self.max_rejections}); no retry\n{output}"
                      )[:OUTPUT_CAP]
        else:
            with contextlib.suppress(NotFound):
                await self.swarm.tasks.get(request.task_id)  # a retry copies the task
                retry = task_id_for_key(self.swarm.name, _retry_key(request))
        decided = await self._append(
            request, ev.MergeRejected(task_id=request.task_id, head=request.head,
                                      target=self.target, cause=cause,  # type: ignore[arg-type]
                                      output=output, merger=self.swarm.agent, retry_task=retry),
            msg_id=f"merge-rejected-{request.task_id}-{request.head}")
        if decided is None:
            return
        await self._finish_rejection(decided)
        self.stats.rejected += 1
        first = output.strip().splitlines()[0] if output.strip() else cause
        self._emit("rejected", f"{request.task_id}: {cause}: {first}; "
                   + (f"retry as {retry}" if retry else "the chain failed"))

    async def _finish_rejection(self, request: MergeRequest) -> None:
        """What a recorded rejection implies: its retry task, or the chain's gate rejected."""
        if request.retry_task is not None:
            await self._reopen(request)
        else:
            await self._reject_gate(request)

    async def _finish_rejections(self) -> None:
        """At takeover: retries (and failed chains' gates) a merger died before making."""
        for request in list(self.queue.values()):
            if request.status == "rejected" and request.target == self.target:
                await self._finish_rejection(request)

    async def _open_merge_gate(self, request: MergeRequest) -> str | None:
        """The id of the request's chain's merge gate while it waits for a decision."""
        gate_id = task_id_for_key(self.swarm.name, merge_gate_key(request.origin
                                                                  or request.task_id))
        gate = (await self.swarm.tasks.ensure_board()).get(gate_id)
        if gate is None or gate.kind != "gate" or gate.status != "ready":
            return None
        return gate_id

    async def _reject_gate(self, request: MergeRequest) -> None:
        gate_id = await self._open_merge_gate(request)
        if gate_id is None:
            return
        first = request.output.strip().splitlines()[0] if request.output.strip() else ""
        with contextlib.suppress(InvalidState, ConcurrencyConflict, NotFound):
            await self.swarm.control.reject(gate_id, f"merge of {request.branch} failed: "
                                            f"{request.cause}: {first}"[:500])

    async def _open_gate(self, request: MergeRequest) -> None:
        """Approve the merge gate of the request's task chain, if someone made one."""
        gate_id = await self._open_merge_gate(request)
        if gate_id is None:
            return
        try:
            await self.swarm.control.approve(gate_id, f"merged: {request.branch}")
        except (InvalidState, ConcurrencyConflict):
            return  # decided meanwhile (another merger, a human)
        self._emit("gate", f"{gate_id} opened: {request.branch} is merged")

    async def _open_gates(self) -> None:
        """At takeover: gates of merges recorded by a merger that died before opening them."""
        for request in list(self.queue.values()):
            if request.status == "merged":
                await self._open_gate(request)

    async def _append(self, request: MergeRequest, data: ev.EventData,
                      msg_id: str | None = None) -> MergeRequest | None:
        """Append an intent or a verdict expecting the request's last sequence: the request
        as it is now, or None when another merger or a person moved it first (re-read)."""
        try:
            appended = await self.swarm.log.append(data, request.task_id,
                                                   expected=request.last_seq, msg_id=msg_id)
        except ConcurrencyConflict:
            for item in await self.swarm.log.entity_events("merge", request.task_id):
                apply_merge(self.queue, item.seq, item.event, item.time_ms)
            return None
        apply_merge(self.queue, appended.seq, appended.event, self.swarm.log.server_now_ms())
        return self.queue[request.task_id]

    async def _reopen(self, request: MergeRequest) -> None:
        """Create the retry the rejection names (idempotent: its id is the key's), with the
        rejection as a note; nothing when it exists with its note already."""
        assert request.retry_task is not None
        try:
            existing = await self.swarm.tasks.get(request.retry_task)
        except NotFound:
            existing = None
        if existing is not None:
            if existing.terminal:
                return
            notes = await self.swarm.log.entity_events("note", request.retry_task)
            if any(isinstance(i.event.data, ev.TaskNoted) and i.event.data.artifact == "merge"
                   for i in notes):
                return
        else:
            try:
                task = await self.swarm.tasks.get(request.task_id)
            except NotFound:
                return
            origin = request.origin or request.task_id
            labels = {**task.labels, "cflow.branch": request.branch, "cflow.origin": origin,
                      "cflow.rebase": "1", "cflow.retry_of": request.task_id}
            await self.swarm.tasks.create(
                task.title, body=task.body, priority=task.priority,
                capabilities=task.capabilities, parent_id=task.parent_id,
                lease_ttl_s=task.lease_ttl_s, max_attempts=task.max_attempts,
                start_to_close_s=task.start_to_close_s, labels=labels,
                idempotency_key=_retry_key(request))
        # The body stays the task's (it may be a script); the rejection reaches the next
        # attempt as a note, in its CFLOW_PREVIOUS.
        await self.swarm.tasks.note(
            request.retry_task, f"merge of {request.branch} into {self.target} rejected "
            f"({request.cause}):\n{request.output}", artifact="merge")


def _retry_key(request: MergeRequest) -> str:
    return f"merge-retry-{request.task_id}-{request.head}"


async def _has_commit(area: WorkArea, sha: str) -> bool:
    code, _, _ = await git_status("cat-file", "-e", f"{sha}^{{commit}}", cwd=area.repo)
    return code == 0


async def _is_ancestor(area: WorkArea, sha: str, of: str) -> bool:
    code, _, _ = await git_status("merge-base", "--is-ancestor", sha, of, cwd=area.repo)
    return code == 0


async def _run_check(command: str, cwd: str, timeout_s: float, area: WorkArea
                     ) -> tuple[bool, str]:
    """Run the check in a process group of its own, recorded in the work area: a merger
    that adopts the area after this one died kills what is left of it."""
    proc = await asyncio.create_subprocess_shell(
        command, cwd=cwd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "CFLOW_MERGE_CHECK": "1"})
    area.record_group("check", proc.pid)
    try:
        async with asyncio.timeout(timeout_s):
            out, _ = await proc.communicate()
    except TimeoutError:
        await _kill_group(proc)
        return False, f"check timed out after {timeout_s:g} s: {command}"
    except BaseException:
        await asyncio.shield(_kill_group(proc))
        raise
    finally:
        area.forget_group("check")
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        return False, f"check failed (exit {proc.returncode}): {command}\n{text}"
    return True, text


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


__all__ = [
    "Merger",
    "MergerStats",
    "create_merge_gate",
    "merge_gate_key",
    "merger_path",
    "read_queue",
    "settled",
]
