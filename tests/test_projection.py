"""The projector against a real nats-server and real DuckDB files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cflow import events as ev
from cflow.errors import InvalidState, Unavailable
from cflow.projections import schema
from cflow.projections.projector import Projector, rebuild
from cflow.projections.query import QueryClient, QueryService
from cflow.projections.store import ProjectionStore, connect, table_rows
from cflow.streams import EventLog, ensure_swarm

pytestmark = pytest.mark.integration


@pytest.fixture
async def projector(log: EventLog, tmp_path: Path) -> AsyncIterator[Projector]:
    p = Projector(log, tmp_path / "live.duckdb", batch_max=500)
    task = asyncio.create_task(p.run())
    try:
        yield p
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await p.close()


async def fetch(p: Projector, sql: str) -> list[tuple[Any, ...]]:
    store = await p.open()
    return await p.db(store.fetch, sql)


async def test_follows_live_events(log: EventLog, projector: Projector) -> None:
    created = await log.append(ev.TaskCreated(title="first", capabilities=("py",)), "t1",
                               expected=0)
    claim = await log.append(ev.TaskClaimed(owner="w1", attempt=1, lease_ttl_s=30), "t1",
                             expected=created.seq)
    done = await log.append(ev.TaskCompleted(epoch=claim.seq, result="ok"), "t1",
                            expected=claim.seq)
    assert await projector.wait_for(done.seq, 10.0)
    assert await fetch(projector, "SELECT status, owner, epoch, result FROM tasks") == [
        ("completed", "w1", claim.seq, "ok")]
    assert await fetch(projector, "SELECT last_seq FROM checkpoint") == [(done.seq,)]
    # Statements run on their own thread by default (store.DEFAULT_THREADS).
    assert await fetch(projector, "SELECT current_setting('threads')") == [(1,)]


async def test_bad_messages_are_quarantined_and_the_projector_goes_on(
        log: EventLog, projector: Projector) -> None:
    good = log.event(ev.TaskCreated(title="ok"), "t-ok")
    unknown = ev.encode(good).replace(b'"type":"TaskCreated"', b'"type":"TaskExploded"')
    huge = log.event(ev.TaskNoted(task_id="t-ok", text="x" * 300_000), "n-big")
    subject = f"cf.{log.swarm}.evt.task.junk"
    for payload in (b"\x00\xffgarbage", ev.encode(good)[:40], unknown):
        await log.js.publish(subject, payload)
    await log.append_event(huge)
    last = await log.append(ev.TaskCreated(title="after"), "t-after", expected=0)
    assert await projector.wait_for(last.seq, 10.0)
    rows = await fetch(projector, "SELECT seq, subject, error, octet_length(raw) FROM quarantine "
                                  "ORDER BY seq")
    assert len(rows) == 4
    garbage, truncated, unknown_row, oversized = rows
    assert garbage[1] == subject and "malformed" in garbage[2]
    assert truncated[3] == 40
    assert "unknown event type 'TaskExploded'" in unknown_row[2]
    assert "exceeds the 262144-byte projection limit" in oversized[2]
    assert await fetch(projector, "SELECT task_id FROM tasks") == [("t-after",)]
    assert projector.quarantined == 4


async def _projected(log: EventLog, path: Path, n: int, prefix: str = "t") -> None:
    """``n`` new tasks ``<prefix>0...``, projected into ``path`` and the file closed."""
    for i in range(n):
        await log.append(ev.TaskCreated(title=f"{prefix}{i}"), f"{prefix}{i}", expected=0)
    first = Projector(log, path)
    await first.run(until_seq=await log.stream_last_seq())
    await first.close()


@pytest.mark.parametrize("new_events", [2, 7])
async def test_a_file_projected_from_another_stream_is_moved_aside_and_projected_anew(
        nc: Any, log: EventLog, tmp_path: Path, new_events: int) -> None:
    """Same swarm name, other sequences (the server's data wiped, another server, a
    re-created stream; shorter or longer than the file's checkpoint): following from
    the checkpoint would skip the new stream's events up to it without a word."""
    path = tmp_path / "p.duckdb"
    await _projected(log, path, 5, "old")
    same = Projector(log, path)  # the same stream: the file is kept as it is
    assert (await same.open()).last_seq == 5
    await same.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.duckdb"]

    await nc.jetstream().delete_stream(log.stream)
    await ensure_swarm(nc, log.swarm)
    for i in range(new_events):
        await log.append(ev.TaskCreated(title=f"new{i}"), f"new{i}", expected=0)
    again = Projector(log, path)
    try:
        await asyncio.wait_for(again.run(until_seq=new_events), 30)
        assert await fetch(again, "SELECT task_id FROM tasks ORDER BY ALL") == [
            (f"new{i}",) for i in range(new_events)]
        assert await fetch(again, "SELECT last_seq FROM checkpoint") == [(new_events,)]
    finally:
        await again.close()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("p.other-")]
    assert len(aside) == 1 and aside[0].suffix == ".duckdb"
    con = connect(aside[0])  # kept for a look, as it was
    try:
        old = con.execute("SELECT count(*) FROM tasks WHERE task_id LIKE 'old%'").fetchone()
        assert old == (5,)
    finally:
        con.close()


def _damage(path: Path, how: str) -> None:
    size = path.stat().st_size
    with path.open("r+b") as f:
        if how == "overwritten":
            f.write(random.Random(7).randbytes(size))
        elif how == "truncated":
            f.truncate(size // 3)
        else:  # a header block zeroed: DuckDB's checksum refuses it
            f.seek(8192)
            f.write(bytes(8192))


@pytest.mark.parametrize("how", ["overwritten", "truncated", "zeroed"])
async def test_a_damaged_file_is_moved_aside_and_projected_anew(
        log: EventLog, tmp_path: Path, how: str) -> None:
    """A projection is rebuilt from its stream, so a file DuckDB cannot read (a crash
    of the machine, a disk fault) must not stop the projector: it is kept aside as
    it was, and the stream projected from the start."""
    path = tmp_path / "p.duckdb"
    await _projected(log, path, 5)
    _damage(path, how)
    damaged = path.read_bytes()
    await log.append(ev.TaskCreated(title="t5"), "t5", expected=0)
    again = Projector(log, path)
    try:
        await asyncio.wait_for(again.run(until_seq=6), 30)
        assert await fetch(again, "SELECT task_id FROM tasks ORDER BY ALL") == [
            (f"t{i}",) for i in range(6)]
        assert await fetch(again, "SELECT last_seq FROM checkpoint") == [(6,)]
    finally:
        await again.close()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("p.damaged-")]
    assert len(aside) == 1 and aside[0].read_bytes() == damaged


@contextlib.contextmanager
def held_by_another_process(path: Path) -> Iterator[None]:
    """``path`` open in DuckDB by another process for the duration."""
    code = ("import sys, time, duckdb; c = duckdb.connect(sys.argv[1]); "
            "print('open', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"open"
        yield
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


async def test_a_file_another_process_holds_is_not_taken_for_damaged(
        log: EventLog, tmp_path: Path) -> None:
    path = tmp_path / "busy.duckdb"
    with held_by_another_process(path), pytest.raises(
            Unavailable, match="in use by another process"):
        await Projector(log, path).open()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy.duckdb"]


async def test_rebuild_replaces_a_damaged_file(log: EventLog, tmp_path: Path) -> None:
    path = tmp_path / "p.duckdb"
    await _projected(log, path, 3)
    _damage(path, "overwritten")
    assert (await rebuild(log, path))["events"] == 3
    con = connect(path)
    try:
        assert con.execute("SELECT count(*) FROM tasks").fetchone() == (3,)
    finally:
        con.close()


# A projector whose files may grow only to a limit (RLIMIT_FSIZE: a write past it
# fails with EFBIG, as on a full disk) until told otherwise on stdin.
DISK_FULL_PROJECTOR = """
import asyncio, json, resource, signal, sys, threading
from pathlib import Path
from cflow.streams import EventLog, connect
from cflow.projections import projector as projector_mod
from cflow.projections.query import QueryService

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
projector_mod.STORE_RETRY_LAST_S = 0.5

async def main(url, swarm, path, fails_at):
    nc = await connect(url, name="disk-full")
    p = projector_mod.Projector(EventLog(nc, swarm, actor="df"), Path(path), batch_max=20)
    store = await p.open()
    if fails_at == "checkpoint":  # every commit checkpoints: the database file grows
        await p.db(store.con.execute, "SET checkpoint_threshold = '1KB'")
    service = QueryService(nc, swarm, p, server_id="disk-full")
    await service.start()
    runner = asyncio.create_task(p.run())
    loop = asyncio.get_running_loop()
    lines = asyncio.Queue()
    threading.Thread(target=lambda: [loop.call_soon_threadsafe(lines.put_nowait, line)
                                     for line in sys.stdin], daemon=True).start()
    while (words := (await lines.get()).split()) != ["quit"]:
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        if words[0] == "limit":
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(words[1]), hard))
        elif words[0] == "unlimit":
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        print(json.dumps({"applied": p.applied_seq, "failures": p.store_failures,
                          "quarantined": p.quarantined, "running": not runner.done()}),
              flush=True)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    await service.stop()
    await p.close()
    await nc.close()

asyncio.run(main(*sys.argv[1:5]))
"""


@pytest.mark.parametrize("fails_at", ["commit", "checkpoint"])
async def test_a_full_disk_pauses_the_projector_and_loses_nothing(
        log: EventLog, tmp_path: Path, fails_at: str) -> None:
    """Writes that fail (a full disk) are not the events' fault: no event is
    quarantined for them, the projector does not stop, and once the disk has room
    it goes on from its checkpoint; the file then equals a fresh rebuild. A failed
    commit leaves DuckDB serving the file (the batch is tried again); a failed
    checkpoint invalidates the database (the file is opened again)."""
    base = await log.stream_last_seq()
    items = history(base, 600, seed=5)
    await log.append_many([(log.event(d, e), None) for d, e in items[:100]])
    (tmp_path / "db").mkdir()
    path = tmp_path / "db" / "p.duckdb"
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        child = subprocess.Popen([sys.executable, "-c", DISK_FULL_PROJECTOR,
                                  log.nc.connected_url.geturl(), log.swarm, str(path),
                                  fails_at],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                 text=True)
    assert child.stdin is not None and child.stdout is not None

    def ask(command: str) -> dict[str, Any]:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(command + "\n")
        child.stdin.flush()
        return json.loads(child.stdout.readline())

    async def until(command: str, done: Any, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while not done(status := await asyncio.to_thread(ask, command)):
            assert time.monotonic() < deadline, f"{what}: {status}"
            await asyncio.sleep(0.05)  # another process's progress: polled
        return status

    try:
        await until("status", lambda s: s["applied"] == base + 100, "first 100 applied")
        sizes = [f.stat().st_size for f in path.parent.iterdir()]
        await asyncio.to_thread(ask, f"limit {max(sizes) + 4096}")
        await log.append_many([(log.event(d, e), None) for d, e in items[100:]])
        # A failed commit is tried again in place, so it fails again until the disk
        # has room; a reopened file may have room for the rest in its log.
        failing = 2 if fails_at == "commit" else 1
        full = await until("status", lambda s: s["failures"] >= failing, "writes failing")
        assert full["running"] and full["quarantined"] == 0
        assert full["applied"] < base + 600 or fails_at == "checkpoint"
        done = await until("unlimit", lambda s: s["applied"] == base + 600, "caught up")
        assert done["running"] and done["quarantined"] == 0
        answer = await QueryClient(log.nc, log.swarm).query("SELECT count(*) FROM events")
        assert answer.rows == [[base + 600]]  # its query service answers (a reopened file too)
        child.stdin.write("quit\n")
        child.stdin.flush()
        assert await asyncio.to_thread(child.wait, 20) == 0
    except BaseException:
        print("projector's stderr:", stderr.read_text()[-3000:])
        raise
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdin.close()
        child.stdout.close()
    said = stderr.read_text()  # in the log, each time
    assert "cannot be written" in said
    assert ("opening it again" in said) == (fails_at == "checkpoint"), said[-2000:]
    assert sorted(f.name for f in path.parent.iterdir()) == ["p.duckdb"]  # none set aside
    fresh = tmp_path / "fresh.duckdb"
    await rebuild(log, fresh)
    a, b = ProjectionStore(path), ProjectionStore(fresh)
    try:
        assert a.read_checkpoint() == b.read_checkpoint() == base + 600
        assert a.fetch("SELECT count(*) FROM events") == [(base + 600,)]
        for table in schema.TABLES:
            assert table_rows(a.con, table) == table_rows(b.con, table), table
        assert a.fetch("SELECT count(*) FROM quarantine") == [(0,)]
    finally:
        a.close()
        b.close()


async def test_rebuild_equals_incremental_and_swaps_atomically(
        log: EventLog, tmp_path: Path) -> None:
    for i in range(50):
        await log.append(ev.TaskCreated(title=f"t{i}", labels={"i": str(i)}), f"t{i}", expected=0)
    path = tmp_path / "p.duckdb"
    p = Projector(log, path, batch_max=7)
    await p.run(until_seq=50)
    await p.close()
    before = os.stat(path).st_ino
    seen: list[tuple[int, int]] = []
    result = await rebuild(log, path, progress=lambda s, t: seen.append((s, t)), batch_max=13)
    assert result["last_seq"] == 50 and result["events"] == 50
    assert seen[0] == (0, 50) and seen[-1] == (50, 50)
    assert os.stat(path).st_ino != before
    assert not list(tmp_path.glob("*.rebuild-*"))
    con = connect(path)
    try:
        assert con.execute("SELECT count(*) FROM tasks").fetchone() == (50,)
    finally:
        con.close()


async def test_rebuild_refuses_a_file_in_use(log: EventLog, tmp_path: Path) -> None:
    path = tmp_path / "busy.duckdb"
    with held_by_another_process(path), pytest.raises(InvalidState, match="open elsewhere"):
        await rebuild(log, path)


async def test_background_rebuild_swaps_under_a_running_projector(
        log: EventLog, tmp_path: Path) -> None:
    """Rebuild-and-swap while the projector applies new events and answers queries."""
    base = await log.stream_last_seq()
    items = history(base, 5000, seed=9)
    for i in range(0, 3000, 500):
        await log.append_many([(log.event(d, e), None) for d, e in items[i:i + 500]])
    path = tmp_path / "live.duckdb"
    p = Projector(log, path, batch_max=500)
    service = QueryService(log.nc, log.swarm, p, server_id="live")
    await service.start()
    runner = asyncio.create_task(p.run())
    try:
        assert await p.wait_for(base + 3000, 30)
        before = os.stat(path).st_ino
        seen: list[tuple[str, int, int]] = []
        job = p.rebuild_in_background(lambda phase, seq, target: seen.append(
            (phase, seq, target)))
        assert p.rebuild_in_background() is job  # a second request joins the running one
        client = QueryClient(log.nc, log.swarm)
        for i in range(3000, 5000, 250):  # the stream moves on during the rebuild
            await log.append_many([(log.event(d, e), None) for d, e in items[i:i + 250]])
            result = await client.query("SELECT count(*) FROM events")
            assert result.rows[0][0] >= 3000
        result_of_job = await asyncio.wait_for(job.task, 60)
        assert os.stat(path).st_ino != before
        assert not list(tmp_path.glob("*.rebuild-*"))
        phases = [phase for phase, _, _ in seen]
        assert phases[0] == "replay" and phases[-1] == "swapped" and "failed" not in phases
        seqs = [seq for _, seq, _ in seen]
        assert seqs == sorted(seqs)
        assert seen[0][2] >= base + 3000 and result_of_job["target"] == seen[0][2]
        last = base + 5000
        result = await client.query("SELECT count(*), max(seq) FROM events",
                                    wait_for_seq=last, timeout_s=20)
        assert result.rows == [[5000, last]]  # nothing lost or doubled across the swap
        store = await p.open()
        live_rows = await p.db(lambda: {t: table_rows(store.con, t) for t in schema.TABLES})
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await service.stop()
        await p.close()
    fresh = tmp_path / "fresh.duckdb"
    await rebuild(log, fresh)
    b = ProjectionStore(fresh)
    try:
        for table in schema.TABLES:
            assert live_rows[table] == table_rows(b.con, table), table
    finally:
        b.close()


# ----------------------------------------------------------------------- chaos


def history(base_seq: int, n_events: int, seed: int) -> list[ev.EventData | tuple[Any, ...]]:
    """(data, entity_id) pairs of task lifecycles; epochs assume seqs base_seq+1, ..."""
    rng = random.Random(seed)
    out: list[tuple[ev.EventData, str]] = []
    open_claims: dict[str, int] = {}
    pending: list[str] = []
    n = 0

    def seq_of_next() -> int:
        return base_seq + len(out) + 1

    while len(out) < n_events:
        roll = rng.random()
        if roll < 0.3 or (not pending and not open_claims):
            n += 1
            tid = f"c{n}"
            out.append((ev.TaskCreated(title=f"task {n}", capabilities=(rng.choice("ab"),),
                                       labels={"k": rng.choice("xyz")}), tid))
            pending.append(tid)
        elif roll < 0.6 and pending:
            tid = pending.pop(rng.randrange(len(pending)))
            open_claims[tid] = seq_of_next()
            out.append((ev.TaskClaimed(owner=f"w{rng.randrange(5)}", attempt=1,
                                       lease_ttl_s=30), tid))
        elif open_claims:
            tid = rng.choice(sorted(open_claims))
            epoch = open_claims.pop(tid)
            r = rng.random()
            if r < 0.7:
                out.append((ev.TaskCompleted(epoch=epoch, result="ok", cost_usd=0.01), tid))
            elif r < 0.85:
                out.append((ev.TaskFailed(epoch=epoch, error=rng.choice(["e1", "e2"]),
                                          final=True), tid))
            else:
                out.append((ev.TaskReleased(epoch=epoch), tid))
                pending.append(tid)
        else:
            out.append((ev.MemoryStored(namespace="ns", key=f"k{rng.randrange(50)}",
                                        value="v"), "mem"))
    return out  # type: ignore[return-value]


def checkpoint_of(db: Path) -> int:
    if not db.exists():
        return 0
    con = connect(db)  # replays the WAL a kill -9 left behind
    try:
        found = con.execute("SELECT count(*) FROM information_schema.tables "
                            "WHERE table_name = 'checkpoint'").fetchone()  # a view
        if found != (1,):
            return 0  # killed before its schema was committed
        row = con.execute("SELECT last_seq FROM checkpoint").fetchone()
        return int(row[0]) if row else 0
    finally:
        con.close()


@pytest.mark.chaos
async def test_kill_9_never_skips_or_repeats(
        log: EventLog, nats_url: str, tmp_path: Path) -> None:
    await kill_9_run(log, nats_url, tmp_path, total=20_000, chunk=500, pause_s=0.35,
                     batch=400, budget_s=60)


@pytest.mark.chaos
async def test_kill_9_under_the_batched_path(
        log: EventLog, nats_url: str, tmp_path: Path) -> None:
    """The same invariant with the default (5,000) batches filled from a backlog.

    30,000 events here (the suite's time budget); ``python -m bench.projection_chaos``
    runs this test with 200,000 (``CFLOW_CHAOS_EVENTS``).
    """
    total = int(os.environ.get("CFLOW_CHAOS_EVENTS", "30000"))
    # Appends spread over the ten kills (~8 s): the raw reader catches up with a burst
    # within a kill's interval, so a faster producer left every later kill at the end.
    await kill_9_run(log, nats_url, tmp_path, total=total, chunk=2500, pause_s=0.5,
                     batch=5000, budget_s=60 + total / 1000, min_completed=total // 20,
                     kill_after_s=(0.2, 0.8))


async def kill_9_run(log: EventLog, nats_url: str, tmp_path: Path, *, total: int, chunk: int,
                     pause_s: float, batch: int, budget_s: float,
                     min_completed: int = 1000,
                     kill_after_s: tuple[float, float] = (0.3, 1.5)) -> None:
    """Ten kill -9s of a projector process while ``total`` events are appended; then the
    final database equals a fresh rebuild, with every event applied exactly once."""
    kills = 10
    db = tmp_path / "chaos.duckdb"
    env = {**os.environ, "CFLOW_URL": nats_url, "CFLOW_SWARM": log.swarm}
    cmd = [sys.executable, "-m", "cflow.projections", "--db", str(db), "--batch", str(batch),
           "--no-reap"]  # a reaper would add its own events to the count
    base = await log.stream_last_seq()
    items = history(base, total, seed=5)
    rng = random.Random(11)
    started = time.monotonic()

    async def produce() -> None:
        for i in range(0, total, chunk):
            await log.append_many([(log.event(d, e), None) for d, e in items[i:i + chunk]])
            await asyncio.sleep(pause_s)

    producer = asyncio.create_task(produce())
    procs: list[subprocess.Popen[bytes]] = []
    checkpoints: list[int] = []
    try:
        for _ in range(kills):
            proc = subprocess.Popen([*cmd, "--no-query"], env=env, stderr=subprocess.PIPE)
            procs.append(proc)
            assert proc.stderr is not None
            line = await asyncio.to_thread(proc.stderr.readline)
            assert line.startswith(b"projector ready"), line
            await asyncio.sleep(rng.uniform(*kill_after_s))
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
            checkpoints.append(await asyncio.to_thread(checkpoint_of, db))
        await producer
        print("checkpoints after each kill -9:", checkpoints)
        # The kills landed while the projector was applying, not only at start-up.
        assert checkpoints == sorted(checkpoints)
        assert len(set(checkpoints) - {0}) >= 3, checkpoints
        last = await log.stream_last_seq()
        assert last == base + total
        final = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
        procs.append(final)
        client = QueryClient(log.nc, log.swarm)
        for _ in range(100):  # the service answers once the final projector is up
            try:
                result = await client.query("SELECT last_seq FROM checkpoint", limit=1,
                                            wait_for_seq=last,
                                            timeout_s=min(120, max(20, total / 2000)))
                break
            except Unavailable:  # until the final projector subscribed
                await asyncio.sleep(0.1)
        assert result.rows == [[last]]
        final.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(final.wait, 20) == 0
        assert time.monotonic() - started < budget_s  # the chaos phase stays bounded
    finally:
        producer.cancel()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
    fresh = tmp_path / "fresh.duckdb"
    await rebuild(log, fresh)
    a, b = ProjectionStore(db), ProjectionStore(fresh)
    try:
        assert a.fetch("SELECT count(*), min(seq), max(seq) FROM events") == [
            (total, base + 1, base + total)]
        assert a.read_checkpoint() == b.read_checkpoint() == base + total
        for table in schema.TABLES:
            assert table_rows(a.con, table) == table_rows(b.con, table), table
        assert a.fetch("SELECT count(*) FROM quarantine") == [(0,)]
        completed = a.fetch("SELECT count(*) FROM tasks WHERE status = 'completed'")
        assert completed[0][0] > min_completed
    finally:
        a.close()
        b.close()


@pytest.mark.e2e
async def test_cfctl_projector_rebuild_and_export(log: EventLog, cli_env: dict[str, str],
                                                  tmp_path: Path) -> None:
    env = {**cli_env, "CFLOW_SWARM": log.swarm}
    cfctl = [sys.executable, "-c", "from cflow.cli import main; main()"]
    db = tmp_path / "cli.duckdb"
    last = 0
    for i in range(5):
        last = (await log.append(ev.TaskCreated(title=f"t{i}"), f"t{i}", expected=0)).seq
    proc = await asyncio.create_subprocess_exec(*cfctl, "projector", "--db", str(db),
                                                "--threads", "2", env=env,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert line.startswith(b"projector: swarm " + log.swarm.encode()), line
        result = await QueryClient(log.nc, log.swarm).query(
            "SELECT count(*) FROM tasks", wait_for_seq=last)
        assert result.rows == [[5]]
        before = os.stat(db).st_ino
        done = await asyncio.to_thread(
            subprocess.run, [*cfctl, "--json", "projections", "rebuild", "--db", str(db)],
            env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert '"background": true' in done.stdout and '"events": 5' in done.stdout
        assert os.stat(db).st_ino != before  # the running projector swapped the file
        result = await QueryClient(log.nc, log.swarm).query("SELECT count(*) FROM tasks")
        assert result.rows == [[5]]
        result = await QueryClient(log.nc, log.swarm).query(
            "SELECT current_setting('threads')")
        assert result.rows == [[2]]  # --threads, kept across the swap
    except BaseException:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), 20)
        print("projector's stderr:", rest.decode(errors="replace"))
        raise
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 130  # stopped by a signal
    done = await asyncio.to_thread(
        subprocess.run, [*cfctl, "--json", "projections", "rebuild", "--db", str(db)],
        env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert '"events": 5' in done.stdout and '"last_seq": 5' in done.stdout
    out = tmp_path / "parquet"
    done = await asyncio.to_thread(
        subprocess.run, [*cfctl, "export", "--parquet", str(out), "--db", str(db)],
        env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} >= {"events.parquet", "tasks.parquet"}
    # A damaged file: export says so in one line; a rebuild replaces it.
    _damage(db, "overwritten")
    done = await asyncio.to_thread(
        subprocess.run, [*cfctl, "export", "--parquet", str(tmp_path / "p2"), "--db", str(db)],
        env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "cannot be read" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = await asyncio.to_thread(
        subprocess.run, [*cfctl, "--json", "projections", "rebuild", "--db", str(db)],
        env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and '"events": 5' in done.stdout, done.stderr
