"""Python 3.12's ``asyncio.wait_for`` on 3.11: a cancellation is never swallowed.

On 3.11, ``wait_for`` runs its awaitable as a separate task and, when the caller
is cancelled in the same loop iteration as that awaitable completes, returns the
result instead of raising ``CancelledError`` (CPython gh-86296; 3.12 rewrote
``wait_for`` on ``asyncio.timeout``, gh-96764). nats-py awaits every request
reply with ``wait_for``, so a task cancelled while its reply was arriving (a
consumer being created for a follower on a fresh swarm, a KV read in a loop)
lost the cancel and carried on, typically into a wait that never ends: the
worker drain hangs and the followers that would not stop.

:func:`install` replaces ``asyncio.wait_for`` with 3.12's implementation on
3.11 (nothing on 3.12+). It is process-wide on purpose: nats-py and our own code
look ``asyncio.wait_for`` up at call time, and both need the fix.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_for(fut: Awaitable[T], timeout: float | None) -> T:  # noqa: ASYNC109
    """3.12's ``asyncio.wait_for``: the awaitable runs in the caller's task under
    ``asyncio.timeout``, so a cancellation of the caller always propagates."""
    if timeout is not None and timeout <= 0:
        task = asyncio.ensure_future(fut)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.wait({task})  # like 3.12's _cancel_and_wait
        try:
            return task.result()
        except asyncio.CancelledError as exc:
            raise TimeoutError from exc
    async with asyncio.timeout(timeout):
        return await fut


def install() -> None:
    """Use :func:`wait_for` as ``asyncio.wait_for`` on Python < 3.12 (idempotent)."""
    if sys.version_info < (3, 12):
        patched: Any = wait_for
        asyncio.wait_for = patched
        asyncio.tasks.wait_for = patched
