"""What a person does to the merge queue: remove a request, skip it, put it back.

Each operation is one event on the request's entity (``MergeRemoved``,
``MergeDeferred``), recorded with the acting agent and appended with the request's
last sequence as the expected one. A merger writes its intent (``MergeStarted``)
and its verdicts the same way, so the two are ordered by the stream:

* an operation stored first fences the merger: its intent or verdict fails the
  compare-and-set, it reads the request again and leaves it (removed) or takes the
  next one first (skipped); a merger that was checking the request never pushes it;
* an intent stored first (the merger is pushing, or died while pushing and its
  successor will push the same merge) makes the operation refuse, with one line
  naming the merger: the push may already have landed, so "removed" could not be
  true. Once the verdict is recorded the request is decided and nothing applies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from cflow import events as ev
from cflow.errors import ConcurrencyConflict, ConflictError, InvalidState, NotFound
from cflow.gitflow.queue import MergeRequest, MergeStatus, apply_merge, fold_merges

if TYPE_CHECKING:
    from cflow.swarm import Swarm

ROUNDS = 5  # a request that moves under the operation this often: give up, say so


async def read_request(swarm: Swarm, task_id: str) -> MergeRequest:
    """The merge request of ``task_id``, folded from its events.

    Raises:
        NotFound: the task never asked for a merge.
    """
    items = await swarm.log.entity_events("merge", task_id)
    queue = fold_merges((i.seq, i.event, i.time_ms) for i in items)
    if task_id not in queue:
        raise NotFound("merge request", task_id)
    return queue[task_id]


async def remove_request(swarm: Swarm, task_id: str, reason: str = "") -> MergeRequest:
    """Take a queued request out of the queue for good (it is never merged).

    Raises:
        NotFound: no such request.
        InvalidState: it is decided already, or a merger recorded its intent to push it.
        ConflictError: it kept changing under the operation.
    """
    return await _operate(
        swarm, task_id, "remove", ("queued",),
        lambda r: ev.MergeRemoved(task_id=task_id, head=r.head, by=swarm.agent, reason=reason))


async def skip_request(swarm: Swarm, task_id: str, reason: str = "") -> MergeRequest:
    """Send a queued request behind the others of its priority (a merger checking it drops
    it and takes the next one first).

    Raises:
        NotFound, InvalidState, ConflictError: as :func:`remove_request`.
    """
    return await _operate(
        swarm, task_id, "skip", ("queued",),
        lambda r: ev.MergeDeferred(task_id=task_id, head=r.head, by=swarm.agent, reason=reason))


async def requeue_request(swarm: Swarm, task_id: str, reason: str = "") -> MergeRequest:
    """Put a removed request back at the end of the queue.

    Raises:
        NotFound, InvalidState, ConflictError: as :func:`remove_request`.
    """
    return await _operate(
        swarm, task_id, "requeue", ("removed",),
        lambda r: ev.MergeDeferred(task_id=task_id, head=r.head, by=swarm.agent, reason=reason))


async def _operate(swarm: Swarm, task_id: str, verb: str, allowed: tuple[MergeStatus, ...],
                   build: Callable[[MergeRequest], ev.EventData]) -> MergeRequest:
    for _ in range(ROUNDS):
        request = await read_request(swarm, task_id)
        if request.status not in allowed:
            raise InvalidState(f"cannot {verb} the merge request of {task_id}: it is "
                               f"{request.status}" + (f" ({request.commit[:12]})"
                                                      if request.commit else ""),
                               task_id=task_id, status=request.status)
        if request.pushing:
            raise InvalidState(
                f"cannot {verb} the merge request of {task_id}: merger "
                f"{request.intent_merger} recorded its intent to push it onto "
                f"{(request.intent_previous or '')[:12]}; wait for its verdict",
                task_id=task_id, merger=request.intent_merger)
        try:
            appended = await swarm.log.append(build(request), task_id,
                                              expected=request.last_seq, actor=swarm.agent)
        except ConcurrencyConflict:
            continue  # a merger (or another person) moved it: decide again
        out = {task_id: request}
        apply_merge(out, appended.seq, appended.event, swarm.log.server_now_ms())
        return out[task_id]
    raise ConflictError(f"the merge request of {task_id} kept changing; try again",
                        task_id=task_id)


__all__ = ["read_request", "remove_request", "requeue_request", "skip_request"]
