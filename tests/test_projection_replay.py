"""Replay mode (rebuilds) against a real nats-server and real DuckDB files: a value
DuckDB refuses is quarantined, the checkpoint never runs ahead of the rows, the
keyed rows are written in bounded flushes, the background swap wakes waiters."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from cflow import events as ev
from cflow.projections import schema
from cflow.projections.projector import Projector, rebuild
from cflow.projections.query import QueryClient, QueryService
from cflow.projections.store import ProjectionStore, connect, table_rows
from cflow.streams import EventLog

pytestmark = pytest.mark.integration


def rows_of(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    store = ProjectionStore(path)
    try:
        return {t: table_rows(store.con, t) for t in schema.TABLES}
    finally:
        store.close()


async def append_refused_values(log: EventLog) -> list[int]:
    for i in range(20):
        await log.append(ev.TaskCreated(title=f"t{i}"), f"t{i}", expected=0)
    # priority is an INTEGER column: DuckDB refuses 2**40 (the fold accepts it).
    bad = await log.append(ev.TaskCreated(title="too big", priority=2**40), "big", expected=0)
    for i in range(20, 30):
        await log.append(ev.TaskCreated(title=f"t{i}"), f"t{i}", expected=0)
    # version is a BIGINT column: DuckDB refuses 2**70.
    huge = await log.append(ev.MemoryStored(namespace="n", key="k", value="v", version=2**70),
                            "mem")
    return [bad.seq, huge.seq]


@pytest.mark.parametrize("split", [False, True], ids=["one-process", "child"])
async def test_a_rebuild_quarantines_a_value_duckdb_refuses(
        log: EventLog, tmp_path: Path, split: bool) -> None:
    bad = await append_refused_values(log)
    last = await log.stream_last_seq()
    live = Projector(log, tmp_path / "live.duckdb", batch_max=500)
    await live.run(until_seq=last)
    await live.close()
    assert live.quarantined == 2
    dead = tmp_path / "rebuilt.duckdb.rebuild-999999999"  # left by a killed rebuild
    dead.write_bytes(b"junk")
    result = await rebuild(log, tmp_path / "rebuilt.duckdb", split=split)
    assert not dead.exists()
    assert result["quarantined"] == 2 and result["last_seq"] == last
    rebuilt, expected = rows_of(tmp_path / "rebuilt.duckdb"), rows_of(tmp_path / "live.duckdb")
    assert [r[0] for r in rebuilt["quarantine"]] == bad
    for table in schema.TABLES:
        assert rebuilt[table] == expected[table], table


def test_the_replay_child_fails_in_one_line(tmp_path: Path) -> None:
    """A frame the child cannot read: one JSON error line, exit 1, no traceback."""
    garbage = b"\xc1not msgpack"
    done = subprocess.run(
        [sys.executable, "-m", "cflow.projections.replay", str(tmp_path / "r.duckdb"), "1000"],
        input=struct.pack("!I", len(garbage)) + garbage, capture_output=True, timeout=60)
    assert done.returncode == 1
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 1 and "error" in json.loads(lines[0]), lines
    assert b"Traceback" not in done.stderr


async def test_a_replay_killed_midway_has_no_checkpoint_ahead_of_its_rows(
        log: EventLog, tmp_path: Path) -> None:
    """kill -9 the replay child after it answered two batches: the file it leaves
    says checkpoint 0 and holds no keyed row (they are written with the checkpoint)."""
    for i in range(30):
        await log.append(ev.TaskCreated(title=f"t{i}"), f"t{i}", expected=0)
    frames: list[bytes] = []
    batches = log.follow_raw_batches(max_batch=10)
    try:
        async for batch in batches:
            frame = msgspec.msgpack.encode(batch)
            frames.append(struct.pack("!I", len(frame)) + frame)
            if batch[-1][0] >= 30:
                break
    finally:
        await batches.aclose()
    path = tmp_path / "r.duckdb"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cflow.projections.replay", str(path), "100000",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    try:
        for frame in frames[:2]:
            child.stdin.write(frame)
            await child.stdin.drain()
            answer = json.loads(await asyncio.wait_for(child.stdout.readline(), 30))
            assert answer["seq"] > 0  # the batch is committed
    finally:
        child.kill()
        await child.wait()
    con = connect(path)
    try:
        assert con.execute("SELECT last_seq FROM checkpoint").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM tasks").fetchone() == (0,)
    finally:
        con.close()


async def test_a_query_waiting_for_what_the_swap_brought_is_answered_at_the_swap(
        log: EventLog, tmp_path: Path) -> None:
    """The live file stops at N; the stream goes on to M; a background rebuild
    replays to M and swaps in: a query waiting for M is answered then, without a
    further batch (no projector loop runs here to bring one)."""
    for i in range(10):
        await log.append(ev.TaskCreated(title=f"t{i}"), f"t{i}", expected=0)
    p = Projector(log, tmp_path / "live.duckdb", batch_max=500)
    await p.run(until_seq=10)
    for i in range(10, 20):
        await log.append(ev.TaskCreated(title=f"t{i}"), f"t{i}", expected=0)
    service = QueryService(log.nc, log.swarm, p, server_id="live")
    await service.start()
    try:
        client = QueryClient(log.nc, log.swarm)
        query = asyncio.create_task(client.query("SELECT count(*) FROM tasks",
                                                 wait_for_seq=20, timeout_s=20))
        async with asyncio.timeout(10):
            while not p._progress._waiters:  # the query waits for seq 20
                await asyncio.sleep(0.01)
        for junk in ("live.duckdb.rebuild-bg", "live.duckdb.rebuild-bg-999999999",
                     "live.duckdb.rebuild-bg-999999999.wal"):  # left by killed projectors
            (tmp_path / junk).write_bytes(b"junk")
        job = p.rebuild_in_background()
        result = await asyncio.wait_for(job.task, 60)
        assert not list(tmp_path.glob("*.rebuild-*"))
        assert result["last_seq"] == 20 and p.applied_seq == 20
        answer = await asyncio.wait_for(query, 5)  # not the 20 s time limit
        assert answer.rows == [[20]]
    finally:
        await service.stop()
        await p.close()


def test_a_long_replay_writes_its_keyed_rows_in_bounded_flushes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past REPLAY_FLUSH_ROWS the unwritten rows go to the file with the checkpoint:
    memory stays bounded, every committed checkpoint matches the keyed rows of a
    live store at that sequence, and the finished file equals the live one."""
    from cflow.projections import store as store_mod
    from test_projection_fold import SEEN, build_history

    items = build_history().items
    monkeypatch.setattr(store_mod, "REPLAY_FLUSH_ROWS", 5)
    monkeypatch.setattr(store_mod, "CACHE_MAX_ROWS", 3)  # dropped after a flush: misses read
    live = ProjectionStore(tmp_path / "live.duckdb")
    replay = ProjectionStore(tmp_path / "replay.duckdb", replay=True)
    checkpoints = [0]
    try:
        for i in range(0, len(items), 4):  # the two in lockstep
            live.apply(items[i:i + 4], SEEN)
            replay.apply(items[i:i + 4], SEEN)
            assert sum(len(rows) for rows in replay._unwritten.values()) <= 5
            cp = replay.read_checkpoint()
            assert cp in (checkpoints[-1], live.last_seq)
            if cp != checkpoints[-1]:  # a flush: the keyed rows are those at cp
                for table in schema.UPSERTED:
                    assert table_rows(replay.con, table) == table_rows(live.con, table), table
            checkpoints.append(cp)
        assert len(set(checkpoints) - {0}) >= 2, checkpoints  # flushed more than once
        replay.finish()
        assert replay.read_checkpoint() == len(items)
    finally:
        live.close()
        replay.close()
    assert rows_of(tmp_path / "replay.duckdb") == rows_of(tmp_path / "live.duckdb")


async def test_raw_batches_read_slower_than_they_arrive_skip_nothing(
        log: EventLog, caplog: pytest.LogCaptureFixture) -> None:
    """A reader that leaves 4 * max_batch messages unread pauses the subscription and
    resumes after the last buffered one: every sequence once, in order."""
    base = await log.stream_last_seq()
    for i in range(0, 2000, 500):
        await log.append_many([(log.event(ev.TaskCreated(title=f"t{j}"), f"t{j}"), None)
                               for j in range(i, i + 500)])
    last = base + 2000
    caplog.set_level(logging.DEBUG, logger="cflow.streams.client")
    seqs: list[int] = []
    batches = log.follow_raw_batches(max_batch=10, start_seq=base + 1)
    try:
        async for batch in batches:
            seqs.extend(seq for seq, _, _, _ in batch)
            if seqs[-1] >= last:
                break
    finally:
        await batches.aclose()
    assert seqs == list(range(base + 1, last + 1))
    assert "paused until they are read" in caplog.text  # the pause really happened
