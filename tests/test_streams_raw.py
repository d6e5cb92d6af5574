"""The replay reader that speaks NATS itself (cflow.streams.raw), against a real
nats-server: every sequence once and in order through a dropped connection and a
lost delivery, the same messages as nats-py's ordered consumer, a rebuild killed
-9 while it reads this way leaves nothing that a new rebuild trips over."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from cflow import events as ev
from cflow.errors import NotFound
from cflow.projections import schema
from cflow.projections.projector import Projector, rebuild
from cflow.projections.store import ProjectionStore, table_rows
from cflow.streams import EventLog, names
from cflow.streams.raw import ReplayReader, raw_capable, replay_batches, replay_source

pytestmark = pytest.mark.integration


async def fill(log: EventLog, n: int) -> int:
    base = await log.stream_last_seq()
    for i in range(0, n, 500):
        await log.append_many([(log.event(ev.TaskCreated(title=f"t{j}"), f"t{j}"), None)
                               for j in range(i, min(n, i + 500))])
    return base


async def nats_py_read(log: EventLog, until: int) -> list[tuple[int, str, bytes]]:
    out: list[tuple[int, str, bytes]] = []
    async for batch in replay_source(log, until_seq=until, reader="nats-py"):
        out.extend((seq, subject, data) for seq, subject, data, _ in batch)
    return out


async def test_every_sequence_once_through_a_dropped_connection_and_a_lost_delivery(
        log: EventLog) -> None:
    base = await fill(log, 3000)
    last = base + 3000
    assert raw_capable(log.nc)
    reader = ReplayReader(log.nc, log.stream, names.events_filter(log.swarm),
                          start_seq=base + 1, max_batch=200)
    got: list[tuple[int, str, bytes, int]] = []
    dropped = lost = False
    try:
        while reader.last < last:
            batch = await reader.next_batch()
            got.extend(batch)
            wire = reader.wire
            assert wire is not None
            if not dropped and len(got) >= 400:
                dropped = True
                assert wire.transport is not None
                wire.transport.abort()  # the connection drops: reconnect, resume after it
            elif dropped and not lost and len(got) >= 1000:
                lost = True
                wire.expected_cseq += 1  # as if a delivery were lost on the way
    finally:
        await reader.close()
    assert reader.resets == 2
    assert [item[0] for item in got] == list(range(base + 1, last + 1))
    assert [item[:3] for item in got] == await nats_py_read(log, last)
    assert all(item[3] > 0 for item in got)  # the server's storage time, ms


async def test_a_replay_of_a_missing_stream_is_not_found(log: EventLog) -> None:
    batches = replay_batches(log.nc, "CF_NO_SUCH_STREAM", "cf.none.>", until_seq=10)
    with pytest.raises(NotFound, match="stream"):
        async for _ in batches:
            pass


def rows_of(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    store = ProjectionStore(path)
    try:
        return {t: table_rows(store.con, t) for t in schema.TABLES}
    finally:
        store.close()


CHILD = """
import asyncio, sys
from cflow.streams import EventLog, connect
from cflow.projections.projector import rebuild

async def main():
    nc = await connect(sys.argv[1])
    log = EventLog(nc, sys.argv[2], actor="rebuilder")
    await rebuild(log, sys.argv[3], batch_max=100,
                  progress=lambda seq, target: print(seq, flush=True))

asyncio.run(main())
"""


async def test_a_rebuild_killed_while_it_reads_raw_leaves_nothing_in_the_way(
        log: EventLog, nats_url: str, tmp_path: Path) -> None:
    """kill -9 a rebuild in the middle of its replay (raw reader); the next rebuild
    swaps in a file equal to the incrementally projected one."""
    last = await fill(log, 6000) + 6000
    live = Projector(log, tmp_path / "live.duckdb", batch_max=700)
    await live.run(until_seq=last)
    await live.close()
    target = tmp_path / "rebuilt.duckdb"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, nats_url, log.swarm, str(target),
        stdout=asyncio.subprocess.PIPE)
    assert child.stdout is not None
    try:
        while True:  # until it applied some batches, not all
            line = await asyncio.wait_for(child.stdout.readline(), 60)
            assert line, "the rebuild ended before it was killed"
            if 0 < int(line) < last:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
    assert not target.exists()  # nothing half-built was swapped in
    result = await rebuild(log, target)
    assert result["last_seq"] == last and result["events"] == last
    assert rows_of(target) == rows_of(tmp_path / "live.duckdb")
