"""The replay reader that speaks NATS itself (cflow.streams.raw), against a real
nats-server: every sequence once and in order through a dropped connection and a
lost delivery, the same messages as nats-py's ordered consumer, a rebuild killed
-9 while it reads this way leaves nothing that a new rebuild trips over."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cflow import events as ev
from cflow.errors import NotFound
from cflow.projections.projector import Projector, rebuild
from cflow.server import EmbeddedServer, ServerOptions, free_port
from cflow.streams import EventLog, connect, ensure_swarm, names
from cflow.streams.raw import (
    ReplayReader,
    _Wire,
    raw_capable,
    replay_batches,
    replay_source,
)
from test_projection_replay import rows_of

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


@contextlib.asynccontextmanager
async def reader_on_its_own_server(
        tmp_path: Path, swarm: str, events: int, heartbeat_s: float,
) -> AsyncIterator[tuple[EmbeddedServer, EventLog, ReplayReader, int]]:
    """A server of the test's own (to stop or freeze), ``events`` events on a swarm of
    it, and a raw reader that has read them all: (server, log, reader, last seq)."""
    server = EmbeddedServer(ServerOptions(port=free_port(), data_dir=tmp_path / "data",
                                          sync="default"))
    server.start()
    try:
        nc = await connect(server.url)
        try:
            await ensure_swarm(nc, swarm)
            log = EventLog(nc, swarm, actor="t")
            last = await fill(log, events) + events
            reader = ReplayReader(nc, log.stream, names.events_filter(swarm),
                                  max_batch=1000, heartbeat_s=heartbeat_s)
            try:
                while reader.last < last:
                    await reader.next_batch()
                yield server, log, reader, last
            finally:
                await reader.close()
        finally:
            await nc.close()
    finally:
        server.stop()


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
                while wire.error is None:  # connection_lost runs on the next loop turn
                    await asyncio.sleep(0)
            elif dropped and not lost and len(got) >= 1000:
                lost = True
                wire.gap = True  # as the parser marks a lost delivery (test_the_parser_...)
    finally:
        await reader.close()
    assert reader.resets == 2
    assert [item[0] for item in got] == list(range(base + 1, last + 1))
    assert [item[:3] for item in got] == await nats_py_read(log, last)
    assert all(item[3] > 0 for item in got)  # the server's storage time, ms


class Written:
    """What the parser writes back (PONG, flow-control answers); no server needed."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return False


def delivery(cseq: int, sseq: int, pending: int, body: bytes = b"{}") -> bytes:
    reply = f"$JS.ACK.S.C.1.{sseq}.{cseq}.1767225600123456789.{pending}"
    head = b"NATS/1.0\r\nNats-Msg-Id: x\r\n\r\n"
    return (f"HMSG cf.s.evt.task.t1 2 {reply} {len(head)} {len(head) + len(body)}\r\n"
            .encode() + head + body + b"\r\n")


async def test_the_parser_finds_lost_deliveries_and_holds_flow_control() -> None:
    wire = _Wire(asyncio.get_running_loop())
    wire.transport = Written()  # type: ignore[assignment]
    wire.sid, wire.hold = b"2", 1
    frames = delivery(1, 10, 2) + b"PING\r\n" + delivery(2, 11, 1)
    wire.data_received(frames[:37])  # frames arrive cut anywhere
    wire.data_received(frames[37:])
    assert [d[:2] for d in wire.out] == [(10, "cf.s.evt.task.t1"), (11, "cf.s.evt.task.t1")]
    assert wire.out[0][2:] == (b"{}", 1767225600123)
    assert wire.transport.data == b"PONG\r\n"  # type: ignore[attr-defined]
    fc = b"NATS/1.0 100 FlowControl Request\r\n\r\n"
    wire.data_received(f"HMSG x 2 $JS.FC.S.C.1 {len(fc)} {len(fc)}\r\n".encode() + fc
                       + b"\r\n")
    assert wire.deferred == [b"$JS.FC.S.C.1"]  # two unread > hold: answered later
    del wire.out[:]
    wire.drained()
    assert wire.transport.data.endswith(b"PUB $JS.FC.S.C.1 0\r\n\r\n")  # type: ignore[attr-defined]
    hb = b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 2\r\n\r\n"
    wire.data_received(f"HMSG x 2 {len(hb)} {len(hb)}\r\n".encode() + hb + b"\r\n")
    assert not wire.gap  # the heartbeat agrees: consumer sequence 2 was the last
    wire.data_received(delivery(4, 13, 0))  # 3 never came
    assert wire.gap and not wire.out
    wire.gap, wire.expected_cseq = False, 3
    lying = b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 5\r\n\r\n"
    wire.data_received(f"HMSG x 2 {len(lying)} {len(lying)}\r\n".encode() + lying + b"\r\n")
    assert wire.gap  # the server delivered 3..5 that never arrived
    wire.data_received(delivery(1, 99, 0).replace(b" 2 $JS", b" 7 $JS"))
    assert not wire.out  # another (abandoned) consumer's delivery is dropped


async def test_a_replay_of_a_missing_stream_is_not_found(log: EventLog) -> None:
    batches = replay_batches(log.nc, "CF_NO_SUCH_STREAM", "cf.none.>", until_seq=10)
    with pytest.raises(NotFound, match="stream"):
        async for _ in batches:
            pass


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


async def test_a_live_projector_reading_raw_survives_a_dropped_connection(
        log: EventLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The projector's follower (raw reader) loses its connection while events keep
    coming: every event is applied once (events.seq is 1..last, no gap)."""
    real_next = ReplayReader.next_batch
    dropped: list[int] = []

    async def dropping(self: ReplayReader) -> list[tuple[int, str, bytes, int]]:
        batch = await real_next(self)
        if not dropped and self.last >= 300 and self.wire is not None:
            dropped.append(self.last)
            assert self.wire.transport is not None
            self.wire.transport.abort()  # a real socket drop, under the follower
        return batch

    monkeypatch.setattr(ReplayReader, "next_batch", dropping)
    projector = Projector(log, tmp_path / "live.duckdb", batch_max=50)
    runner = asyncio.create_task(projector.run())
    try:
        await asyncio.wait_for(projector.caught_up.wait(), 30)  # an empty stream: at once
        last = 0
        for i in range(0, 1000, 100):
            last = (await log.append_many([(log.event(ev.TaskCreated(title=f"t{j}"), f"t{j}"),
                                            None) for j in range(i, i + 100)]))[-1]
        assert await projector.wait_for(last, 30)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await projector.close()
    assert dropped
    rows = rows_of(tmp_path / "live.duckdb")
    assert [r[0] for r in rows["events"]] == list(range(1, last + 1))
    assert len(rows["tasks"]) == 1000


async def test_an_agent_user_follows_raw_within_its_permissions(tmp_path: Path) -> None:
    """With user/password auth and an agent's permissions (cflow.creds), the raw
    reader's inboxes, consumer and flow control are all allowed."""
    from cflow import creds
    from cflow.server import EmbeddedServer, ServerOptions, free_port
    from cflow.streams import connect, ensure_swarm

    auth = tmp_path / "auth"
    creds.create(auth, "admin", "alpha", admin=True)
    creds.create(auth, "w1", "alpha")
    server = EmbeddedServer(ServerOptions(port=free_port(), data_dir=tmp_path / "data",
                                          sync="default",
                                          auth_include=str(auth / creds.AUTH_CONF)))
    server.start()
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    try:
        registry = creds.load(auth)
        admin_user, agent_user = registry.find("alpha.admin"), registry.find("alpha.w1")
        assert admin_user is not None and agent_user is not None
        admin = await connect(creds.client_url(admin_user, server.url))
        try:
            await ensure_swarm(admin, "alpha")
        finally:
            await admin.close()
        nc = await connect(creds.client_url(agent_user, server.url), error_cb=on_error)
        try:
            log = EventLog(nc, "alpha", actor="w1")
            assert raw_capable(nc)
            last = await fill(log, 1000) + 1000
            projector = Projector(log, tmp_path / "p.duckdb", batch_max=100)
            await asyncio.wait_for(projector.run(until_seq=last), 30)
            await projector.close()
            assert projector.applied_events == last
            got = [seq async for batch in replay_source(log, until_seq=last)
                   for seq, _, _, _ in batch]
            assert got == list(range(1, last + 1))
        finally:
            await nc.close()
    finally:
        server.stop()
    assert errors == []


@pytest.mark.chaos
async def test_a_silent_server_is_noticed_by_missed_heartbeats(tmp_path: Path) -> None:
    """The server stops answering (SIGSTOP) while the reader waits for new events:
    two missed heartbeats, a new connection once it answers again, and the next
    event read is the one after the last, nothing skipped or repeated."""
    async with reader_on_its_own_server(tmp_path, "quiet", 200, 0.5) as (
            server, log, reader, last):
        waiting = asyncio.create_task(reader.next_batch())
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(3.0)  # the outage: six heartbeat intervals
        finally:
            server.proc.send_signal(signal.SIGCONT)
        await fill(log, 50)
        batch = await asyncio.wait_for(waiting, 30)
        while reader.last < last + 50:
            batch += await reader.next_batch()
    assert reader.resets >= 1
    assert [item[0] for item in batch] == list(range(last + 1, last + 51))


async def test_a_reader_whose_server_is_away_says_so_once_in_words(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A server away for a while: the reader retries without a line per retry (the
    projector printed one every 0.6 s, with asyncio's address tuple in it), then says
    when it reads again, and the next event read is the one after the last."""
    async with reader_on_its_own_server(tmp_path, "away", 20, 0.3) as (
            server, log, reader, last):
        waiting = asyncio.create_task(reader.next_batch())
        with caplog.at_level("WARNING", logger="cflow.streams.raw"):
            server.stop()
            await asyncio.sleep(4.0)  # the outage: heartbeats missed, then retries
            server.start()
            await fill(log, 5)
            batch = await asyncio.wait_for(waiting, 30)
            while reader.last < last + 5:
                batch += await reader.next_batch()
    said = [r.getMessage() for r in caplog.records if r.name == "cflow.streams.raw"]
    away = [m for m in said if m.endswith("trying again")]
    assert 1 <= len(away) <= 2, said  # once per reason (a refused connection, a timeout)
    assert not any("('127.0.0.1'" in m for m in said), said
    assert said[-1] == f"reading {log.stream} again", said
    assert [item[0] for item in batch] == list(range(last + 1, last + 6))
