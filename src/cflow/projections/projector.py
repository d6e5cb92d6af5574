"""The projector: follows a swarm's event stream and applies it to DuckDB in batches.

The loop reads :meth:`EventLog.follow_batches` from ``checkpoint + 1`` (the log
decodes in bulk and applies the HLC receive rule per batch): each batch is what
arrived while the previous one was applied (up to ``batch_max``), handed to
:class:`ProjectionStore` on the one DuckDB thread. Batches grow with load and
shrink to one event when the stream is quiet, so lag stays low at low rates and
throughput high at high rates.

:func:`run_projector` is what ``cfctl projector`` and ``cfctl up`` run: the
projector plus its query service on NATS. :func:`rebuild` replays from
sequence 1 into a fresh file and swaps it in with ``os.replace``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread

from cflow.background import stop_tasks
from cflow.errors import CflowError, InvalidState
from cflow.projections import fold
from cflow.projections.store import ProjectionStore

if TYPE_CHECKING:
    from cflow.projections.fold import Item
    from cflow.streams.client import EventLog

T = TypeVar("T")
log = logging.getLogger(__name__)

DEFAULT_BATCH_MAX = 5000
DB_FILE = "projection.duckdb"


def default_db_path(swarm: str) -> Path:
    """``$XDG_DATA_HOME/cflow/projections/<swarm>/projection.duckdb``."""
    from cflow.server import default_data_dir

    return default_data_dir() / "projections" / swarm / DB_FILE


def wall_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Projector:
    """Applies one swarm's events to one DuckDB file; serves reads on its cursors."""

    def __init__(self, log_: EventLog, db_path: str | Path, *,
                 batch_max: int = DEFAULT_BATCH_MAX,
                 max_event_bytes: int = fold.DEFAULT_MAX_EVENT_BYTES,
                 replay: bool = False) -> None:
        self.log = log_
        self.replay = replay
        self.db_path = Path(db_path)
        self.batch_max = batch_max
        self.max_event_bytes = max_event_bytes
        self.limiter = anyio.CapacityLimiter(1)  # DuckDB: one dedicated thread
        self.store: ProjectionStore | None = None
        self.applied_seq = 0
        self.applied_events = 0
        self.quarantined = 0
        self.batches = 0
        self.caught_up = asyncio.Event()
        self._progress = asyncio.Condition()
        self._on_batch: list[Callable[[int], None]] = []

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the DuckDB thread."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    def on_batch(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(last_seq)`` after every committed batch."""
        self._on_batch.append(callback)

    async def open(self) -> ProjectionStore:
        if self.store is None:
            self.store = await self.db(
                lambda: ProjectionStore(self.db_path, max_event_bytes=self.max_event_bytes,
                                        replay=self.replay))
            self.applied_seq = self.store.last_seq
        return self.store

    async def close(self) -> None:
        if self.store is not None:
            store, self.store = self.store, None
            await self.db(store.close)

    async def wait_for(self, seq: int, timeout_s: float) -> bool:
        """Wait until the projection has applied ``seq``; False on timeout."""
        if self.applied_seq >= seq:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s), self._progress:
                await self._progress.wait_for(lambda: self.applied_seq >= seq)
        return self.applied_seq >= seq

    async def apply(self, batch: Sequence[Item]) -> fold.Changes:
        store = await self.open()
        changes = await self.db(store.apply, batch, wall_now())
        self.applied_seq = store.last_seq
        self.applied_events += changes.count
        self.quarantined += changes.quarantined
        self.batches += 1
        async with self._progress:
            self._progress.notify_all()
        for callback in self._on_batch:
            callback(self.applied_seq)
        return changes

    async def run(self, *, until_seq: int | None = None) -> None:
        """Follow the stream and apply it until cancelled (or ``until_seq`` is applied)."""
        await self.open()
        if until_seq is not None and self.applied_seq >= until_seq:
            return
        batches = self.log.follow_batches(start_seq=self.applied_seq + 1,
                                          caught_up=self.caught_up, max_batch=self.batch_max)
        try:
            async for batch in batches:
                await self.apply(batch)
                if until_seq is not None and self.applied_seq >= until_seq:
                    return
        finally:
            await batches.aclose()


async def run_projector(url: str, swarm: str, db_path: str | Path | None,
                        stop_event: asyncio.Event, *, serve_queries: bool = True,
                        batch_max: int = DEFAULT_BATCH_MAX,
                        ready: Callable[[Projector], None] | None = None,
                        reap: bool = True) -> None:
    """Run a projector and its query service until ``stop_event`` is set.

    This is what ``cfctl projector`` runs, and ``cfctl up`` next to the server.
    With ``reap`` (the default) it is also a lease reaper and readiness
    evaluator, like every long-lived cflow process.

    Raises:
        Unavailable: NATS is unreachable, or the database file is in use.
    """
    from cflow.projections.query import QueryService
    from cflow.streams import EventLog, connect, ensure_swarm

    path = Path(db_path) if db_path else default_db_path(swarm)
    ident = f"projector-{socket.gethostname()}-{os.getpid()}"
    nc = await connect(url, name=f"cflow:{ident}")
    try:
        await ensure_swarm(nc, swarm)
        projector = Projector(EventLog(nc, swarm, actor=ident, node=ident), path,
                              batch_max=batch_max)
        await projector.open()
        service = QueryService(nc, swarm, projector, server_id=ident) if serve_queries else None
        try:
            if service is not None:
                await service.start()
            if ready is not None:
                ready(projector)
            runner = asyncio.create_task(projector.run())
            stopper = asyncio.create_task(stop_event.wait())
            reaper = asyncio.create_task(_maintain(nc, swarm, ident)) if reap else None
            done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (runner, stopper, reaper):
                if task is not None:
                    task.cancel()
            if reaper is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reaper
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            if runner in done and runner.exception() is not None:
                raise runner.exception()  # type: ignore[misc]
        finally:
            if service is not None:
                await service.stop()
            await projector.close()
    finally:
        await nc.close()


async def serve_for_up(running: Any) -> None:
    """The projector a foreground ``cfctl up`` runs next to its server (until cancelled).

    Its database lives in the server's data dir; a cluster member that has no
    streams yet (``cfctl init --replicas 3`` comes later) just waits for them.
    """
    db = Path(running.data_dir) / f"{running.swarm}.duckdb"
    stop = asyncio.Event()
    current: list[Projector] = []
    metrics = None
    if running.metrics_port is not None:
        from cflow.metrics import serve_swarm_metrics

        metrics = asyncio.create_task(serve_swarm_metrics(
            running.url, running.swarm, running.metrics_port,
            projected_seq=lambda: current[0].applied_seq if current else None))
    try:
        await _serve_until_done(running, db, stop, current)
    finally:
        if metrics is not None:
            await stop_tasks([metrics])


async def _serve_until_done(running: Any, db: Path, stop: asyncio.Event,
                            current: list[Projector]) -> None:
    while True:
        try:
            current.clear()
            await run_projector(running.url, running.swarm, db, stop, ready=current.append)
            return
        except CflowError as exc:
            log.warning("projector next to the server stopped: %s; retrying in 5 s", exc)
            await asyncio.sleep(5)  # nothing to await: the cause is outside this process


async def _maintain(nc: Any, swarm: str, ident: str) -> None:
    """The lease reaper + readiness evaluator, on the projector's connection."""
    from cflow.swarm import Swarm

    facade = Swarm(nc, swarm, agent=ident)
    try:
        await facade.tasks.maintain()
    finally:
        await facade.aclose()


def _wal(path: Path) -> Path:
    return path.with_name(path.name + ".wal")


def _check_free(path: Path, tmp: Path) -> None:
    """Refuse to rebuild a file another process holds; clear a stale temp file."""
    from cflow.projections import store as store_mod

    if path.exists():
        try:
            con = store_mod.connect(path)
        except CflowError as exc:
            raise InvalidState(f"cannot rebuild {path}: it is open elsewhere (stop the "
                               f"projector first): {exc}") from exc
        con.close()
    for leftover in (tmp, _wal(tmp)):
        leftover.unlink(missing_ok=True)


async def rebuild(log_: EventLog, db_path: str | Path, *,
                  progress: Callable[[int, int], None] | None = None,
                  batch_max: int = DEFAULT_BATCH_MAX) -> dict[str, Any]:
    """Replay the stream from sequence 1 into a fresh file, then swap it in atomically.

    The target is the stream's last sequence when the rebuild starts; the live
    projector (if any) must not hold the file.

    Raises:
        InvalidState: the database is open in another process.
        Unavailable: NATS is unreachable.
    """
    path = Path(db_path)
    tmp = path.with_name(f"{path.name}.rebuild-{os.getpid()}")
    await anyio.to_thread.run_sync(_check_free, path, tmp)
    target = await log_.stream_last_seq()
    started = time.perf_counter()
    projector = Projector(log_, tmp, batch_max=batch_max, replay=True)
    if progress is not None:
        progress(0, target)
        projector.on_batch(lambda seq: progress(seq, target))
    try:
        await projector.run(until_seq=target)
        store = await projector.open()
        await projector.db(store.finish)
        applied, quarantined = projector.applied_events, projector.quarantined
    finally:
        await projector.close()
    # Drop the old WAL first: the new file must never be replayed with it. A crash
    # between the two steps leaves the old file without its unflushed tail, which
    # is still consistent (its checkpoint went with the same commits).
    _wal(path).unlink(missing_ok=True)
    os.replace(tmp, path)
    _wal(tmp).unlink(missing_ok=True)
    return {"path": str(path), "last_seq": target, "events": applied,
            "quarantined": quarantined, "seconds": round(time.perf_counter() - started, 3)}


__all__ = ["DEFAULT_BATCH_MAX", "Projector", "default_db_path", "rebuild", "run_projector"]
