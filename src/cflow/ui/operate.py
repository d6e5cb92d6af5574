"""Operator actions the facade has no single call for.

Requeue: the task state machine has no way back from ``failed``, ``cancelled``
or ``blocked`` (a finished task stays finished, so its history stays true), so
the console requeues such a task as a **new** task with the same title, body,
priority, capabilities, labels, parent, dependencies and retry policy, labelled
``requeued_from=<old id>`` and ``requeued_by=<who clicked>``. The new task's
``TaskCreated`` names who clicked as its actor (``ui:<operator>`` or
``nats:<user>``). A task that is still live (pending,
ready, claimed, expired) is refused: it will run or be reclaimed as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cflow.errors import InvalidState

if TYPE_CHECKING:
    from cflow.swarm import Swarm
    from cflow.tasks import TaskState

REQUEUABLE = frozenset({"failed", "cancelled", "blocked"})


async def requeue(swarm: Swarm, task_id: str, *, by: str = "") -> TaskState:
    """Create a fresh copy of a failed, cancelled or blocked task.

    Raises:
        NotFound: no such task.
        InvalidState: the task is still live, or a gate (gates are decided, not requeued).
    """
    old = await swarm.tasks.get(task_id)
    if old.kind != "task":
        raise InvalidState(f"{task_id} is a {old.kind}; only tasks are requeued",
                           task_id=task_id)
    if old.status not in REQUEUABLE:
        raise InvalidState(f"task {task_id} is {old.status}; only failed, cancelled or "
                           "blocked tasks are requeued", task_id=task_id, status=old.status)
    labels = {**old.labels, "requeued_from": task_id}
    if by:
        labels["requeued_by"] = by
    return await swarm.tasks.create(
        old.title, body=old.body, priority=old.priority, capabilities=old.capabilities,
        depends_on=old.depends_on, parent_id=old.parent_id, lease_ttl_s=old.lease_ttl_s,
        max_attempts=old.max_attempts, backoff_initial_s=old.retry.initial_s,
        backoff_multiplier=old.retry.multiplier, backoff_max_s=old.retry.max_s,
        start_to_close_s=old.start_to_close_s, labels=labels, actor=by or None,
        # One requeue per (task, operator request): a retried click makes no second copy.
        idempotency_key=f"requeue-{task_id}-{old.seq}")


__all__ = ["REQUEUABLE", "requeue"]
