"""Bulk task loading for benchmarks: N ready tasks with their work offers, fast.

``swarm.tasks.create`` makes one task in several round trips (create, then
offer), which is right for a user and far too slow to fill a swarm with
100,000 tasks. This loader writes the same two messages a create writes for a
fresh ready task, a batch at a time with one ack wait per batch:

- the ``TaskCreated`` event on the task's subject with expected last subject
  sequence 0, through ``EventLog.append_many``;
- the task's offer: ``encode_offer(apply(None, event, seq))`` on
  ``offer_subject(swarm, state)`` with ``Nats-Msg-Id: offer_msg_id(task, seq)``,
  published with reply subjects and the acks gathered the way ``append_many``
  does (nats-py's ``publish_async`` never resolves a future whose ack is an error).

Setup only, never timed; it lives in bench/ because the library has no bulk
create.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import nats.errors

from cflow import events as ev
from cflow import offers
from cflow.tasks import TaskState, apply

if TYPE_CHECKING:
    from cflow.swarm import Swarm

BATCH = 1000  # messages per ack wait


async def publish_with_acks(nc: Any, messages: Sequence[tuple[str, bytes, dict[str, str]]],
                            timeout: float = 30.0) -> None:
    """Publish ``(subject, payload, headers)`` in order, then wait for every JetStream ack.

    Raises:
        RuntimeError: an ack is missing after ``timeout`` or reports an error.
    """
    prefix = f"{nc.new_inbox()}."
    loop = asyncio.get_running_loop()
    acks: list[asyncio.Future[bytes]] = [loop.create_future() for _ in messages]

    async def on_ack(msg: Any) -> None:
        index = msg.subject[len(prefix):]
        if index.isdigit() and int(index) < len(acks) and not acks[int(index)].done():
            acks[int(index)].set_result(msg.data)

    sub = await nc.subscribe(f"{prefix}*", cb=on_ack)
    try:
        for index, (subject, payload, headers) in enumerate(messages):
            await nc.publish(subject, payload, reply=f"{prefix}{index}", headers=dict(headers))
        await nc.flush()
        await asyncio.wait(acks, timeout=timeout)
    finally:
        with contextlib.suppress(nats.errors.Error, OSError):
            await sub.unsubscribe()
    missing = sum(1 for a in acks if not a.done())
    if missing:
        raise RuntimeError(f"{missing} of {len(acks)} publishes not acknowledged "
                           f"within {timeout:g} s")
    for ack in acks:
        body = json.loads(ack.result() or b"{}")
        if "error" in body:
            raise RuntimeError(f"publish refused: {body['error']}")


async def load_tasks(sw: Swarm, specs: Iterable[ev.TaskCreated],
                     batch: int = BATCH) -> list[TaskState]:
    """Create one ready task per ``TaskCreated`` (no dependencies) and offer each.

    Returns the tasks' states as a create would have returned them.
    """
    states: list[TaskState] = []
    pending: list[ev.TaskCreated] = []

    async def flush() -> None:
        events = [sw.log.event(data, ev.new_id()) for data in pending]
        seqs = await sw.log.append_many([(event, 0) for event in events])
        fresh = [apply(None, event, seq) for event, seq in zip(events, seqs, strict=True)]
        await publish_with_acks(sw.nc, [
            (offers.offer_subject(sw.name, state), offers.encode_offer(state),
             {"Nats-Msg-Id": offers.offer_msg_id(state.task_id, state.seq)})
            for state in fresh])
        states.extend(fresh)
        pending.clear()

    for data in specs:
        if data.depends_on:
            raise ValueError("load_tasks makes ready tasks only (no dependencies)")
        pending.append(data)
        if len(pending) >= batch:
            await flush()
    if pending:
        await flush()
    return states
