"""The merge queue as a fold of the ``merge`` events (pure: no I/O).

Each merge request is one entity, named by the task whose attempt asked for it:
``MergeRequested`` (one per attempt that finished with changes; a later claim's
request replaces an earlier claim's while none is decided, a request of an older or
the same claim, or one after the verdict, changes nothing: a fenced holder's late
write can neither reopen a decided request nor overwrite its successor's), then at
most one ``Merged`` or ``MergeRejected`` for the head it asked for, unless a person
took it out first (``MergeRemoved``; ``MergeDeferred`` puts it back, or a queued one
behind the others of its priority), which is possible only before a merger recorded
its intent to push it (``MergeStarted``). The
merger writes its verdict with the entity's last sequence as the expected one,
so two mergers can never both decide the same request. The queue order is
priority (high first), then arrival (stream sequence).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from cflow import events as ev

MergeStatus = Literal["queued", "merged", "rejected", "removed"]


@dataclass(frozen=True)
class MergeRequest:
    task_id: str
    epoch: int
    branch: str
    head: str
    target: str
    priority: int
    title: str
    origin: str | None
    seq: int  # the request's stream sequence (arrival order; a skip or requeue arrives anew)
    last_seq: int  # the entity's last sequence (the verdict's expected value)
    requested_ms: int
    status: MergeStatus = "queued"
    decided_ms: int | None = None
    cause: str | None = None
    output: str = ""
    commit: str | None = None
    merger: str | None = None
    retry_task: str | None = None
    # the last MergeStarted intent: the target it was to be pushed onto, the merge's tree
    intent_previous: str | None = None
    intent_tree: str | None = None
    intent_merger: str | None = None
    intent_commit: str | None = None
    removed_by: str | None = None  # who took it out of the queue (its reason in ``output``)

    @property
    def pushing(self) -> bool:
        """Queued with an intent recorded: a merger may be pushing it right now."""
        return self.status == "queued" and self.intent_previous is not None

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def fold_merges(items: Iterable[tuple[int, ev.Event, int]]) -> dict[str, MergeRequest]:
    """(seq, event, server ms) of merge events in stream order -> request per task id."""
    out: dict[str, MergeRequest] = {}
    for seq, event, at in items:
        apply_merge(out, seq, event, at)
    return out


def apply_merge(out: dict[str, MergeRequest], seq: int, event: ev.Event, at: int) -> None:
    """Fold one merge event into ``out`` (in place); an old or repeated one changes nothing."""
    data = event.data
    key = event.entity_id
    old = out.get(key)
    if old is not None and seq <= old.last_seq:
        return
    match data:
        case ev.MergeRequested() if old is not None and (
                old.status != "queued" or data.epoch <= old.epoch):
            out[key] = replace(old, last_seq=seq)  # late: the verdict or the newer claim stands
        case ev.MergeRequested():
            out[key] = MergeRequest(
                task_id=data.task_id, epoch=data.epoch, branch=data.branch, head=data.head,
                target=data.target, priority=data.priority, title=data.title,
                origin=data.origin, seq=seq, last_seq=seq, requested_ms=at)
        case ev.MergeStarted() if old is not None:
            out[key] = replace(old, last_seq=seq, intent_previous=data.previous,
                               intent_tree=data.tree, intent_merger=data.merger,
                               intent_commit=data.commit)
        case ev.Merged() if old is not None:
            out[key] = replace(old, status="merged", last_seq=seq, decided_ms=at,
                               commit=data.commit, merger=data.merger)
        case ev.MergeRejected() if old is not None:
            out[key] = replace(old, status="rejected", last_seq=seq, decided_ms=at,
                               cause=data.cause, output=data.output, merger=data.merger,
                               retry_task=data.retry_task)
        case ev.MergeRemoved() if old is not None and old.status == "queued" \
                and not old.pushing:
            out[key] = replace(old, status="removed", last_seq=seq, decided_ms=at,
                               removed_by=data.by, output=data.reason)
        case ev.MergeDeferred() if old is not None and old.status in ("queued", "removed") \
                and not old.pushing:
            out[key] = replace(old, status="queued", seq=seq, last_seq=seq, decided_ms=None,
                               removed_by=None, output="")
        case _ if old is not None:
            out[key] = replace(old, last_seq=seq)


def queue_order(requests: Iterable[MergeRequest], target: str) -> list[MergeRequest]:
    """Queued requests for ``target``: priority (high first), then arrival."""
    queued = [r for r in requests if r.status == "queued" and r.target == target]
    return sorted(queued, key=lambda r: (-r.priority, r.seq))


__all__ = ["MergeRequest", "MergeStatus", "apply_merge", "fold_merges", "queue_order"]
