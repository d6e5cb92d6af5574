"""Stopping background asyncio tasks for sure.

A cancellation that lands inside a nats-py request could be absorbed: Python
3.11's ``asyncio.wait_for`` dropped a cancel arriving with the reply (fixed for
the whole process by :mod:`cflow.streams.cancel_safe`). nats-py still swallows one
in a rare path (a forced flush of a full write buffer), and the task then carries
on (for example into a wait that never ends), so one ``cancel()`` followed by an
unbounded ``await`` could still hang a shutdown: hence the rounds below.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("cflow.background")


async def stop_tasks(tasks: Iterable[asyncio.Task[Any] | None], rounds: int = 10) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again those that swallowed it.

    Gives up (with a warning) after ``rounds`` half-second waits. Exceptions of the
    stopped tasks are retrieved and dropped: their own guards logged them.
    """
    every = [t for t in tasks if t is not None]
    pending = {t for t in every if not t.done()}
    for _ in range(rounds):
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    for task in pending:
        log.warning("task %s did not stop", task.get_name())
    for task in every:
        if task.done() and not task.cancelled():
            task.exception()
