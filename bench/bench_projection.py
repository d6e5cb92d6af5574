"""Projection benchmarks: ingest rate vs ``executemany``, rebuild time, lag at 1k events/s.

``uv run python -m bench.bench_projection [--quick] [--url URL]`` (starts its own
nats-server without ``--url``), or through the runner: ``python -m bench --only
projection``. Figures (all from the same run):

* ``ingest_events_per_s``: the projector's apply path (pure fold + DuckDB
  appenders + checkpoint, one transaction per 5,000-event batch) on decoded
  events, best of 3. ``fold_events_per_s`` is the fold alone.
* ``executemany_events_per_s``: the negative control, only the ``events``
  table's rows of the same events through ``executemany`` in one transaction.
  ``events_appender_rows_per_s`` is the same rows through the appender.
* ``ingest_e2e_events_per_s`` = ``rebuild_events / rebuild_s``: a rebuild from
  NATS (batched ordered consumer, bulk decode, replay-mode fold and appends) into
  a fresh file, including the atomic swap. 1M events (``--quick``: 100k).
  Beside it, same stream and run: ``rebuild_nats_py_s`` (the same rebuild
  reading through nats-py's ordered consumer, run just before), the CPU each
  used per event (``*_cpu_us_per_event``, this process and its children) and the
  1-minute load average (``load_avg_1m``), ``rebuild_split_s`` and
  ``rebuild_split_cpu_us_per_event`` (this process reads, a child process
  decodes, folds and writes: ``split=True``; the child's CPU counted), and the
  reading side alone, nothing decoded: ``raw_read_events_per_s`` (nats-py) and
  ``raw_read_native_events_per_s`` (``cflow.streams.raw``).
* ``lag_p50_ms``, ``lag_p99_ms``, ``lag_max_ms``: a live projector while events
  are appended at a steady 1,000 events/s (10 every 10 ms) from this same
  process; lag = commit of the batch holding an event minus the moment its
  append was sent.
* ``lag_1k_*``, ``lag_10k_*``, ``query_*``: ``bench/projection_live.py`` (the
  producer in its own process; query round trips with read-your-writes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import projection_live
from bench.servers import bench_server
from cflow import events as ev
from cflow.hlc import HybridClock
from cflow.projections import fold, schema
from cflow.projections.projector import Projector, rebuild
from cflow.projections.store import ProjectionStore
from cflow.streams import EventLog, connect, ensure_swarm
from cflow.streams.client import StoredEvent
from cflow.streams.raw import replay_source

BATCH = 5000
BASE_MS = 1_767_225_600_000


def workload(n: int, seed: int = 7) -> list[tuple[ev.EventData, str]]:
    """Task lifecycles from 20 agents (create, claim, complete/fail/release), notes, memory.

    Epochs assume the events are stored at sequences 1..n of a fresh stream.
    """
    rng = random.Random(seed)
    out: list[tuple[ev.EventData, str]] = []
    pending: list[str] = []
    claims: dict[str, int] = {}
    made = 0
    for a in range(20):
        out.append((ev.AgentRegistered(name=f"agent {a}", capabilities=("py", "go")), f"a{a}"))
    while len(out) < n:
        roll = rng.random()
        if roll < 0.28 or (not pending and not claims):
            made += 1
            out.append((ev.TaskCreated(title=f"task {made}", body="do the thing " * 4,
                                       priority=rng.randrange(5),
                                       capabilities=(rng.choice(("py", "go")),),
                                       labels={"team": rng.choice("abc")}), f"task-{made}"))
            pending.append(f"task-{made}")
        elif roll < 0.56 and pending:
            tid = pending.pop(rng.randrange(len(pending)))
            claims[tid] = len(out) + 1
            out.append((ev.TaskClaimed(owner=f"a{rng.randrange(20)}", attempt=1,
                                       lease_ttl_s=30), tid))
        elif roll < 0.95 and claims:
            tid = rng.choice(list(claims))
            epoch = claims.pop(tid)
            r = rng.random()
            if r < 0.8:
                out.append((ev.TaskCompleted(epoch=epoch, result="ok", cost_usd=0.01), tid))
            elif r < 0.9:
                out.append((ev.TaskFailed(epoch=epoch, error="exit 1", final=True), tid))
            else:
                out.append((ev.TaskReleased(epoch=epoch), tid))
                pending.append(tid)
        elif roll < 0.98:
            out.append((ev.TaskNoted(task_id=f"task-{max(made, 1)}", text="progress"),
                        f"note-{len(out)}"))
        else:
            out.append((ev.MemoryStored(namespace="kb", key=f"k{rng.randrange(100)}",
                                        value="v" * 40), "mem"))
    return out[:n]


def decoded(items: list[tuple[ev.EventData, str]]) -> list[StoredEvent]:
    clock = HybridClock("bench")
    out = []
    for i, (data, entity) in enumerate(items):
        event = ev.make_event(data, swarm="bench", entity_id=entity,
                              hlc=str(clock.now(BASE_MS + i)), actor="bench")
        out.append(StoredEvent(i + 1, f"cf.bench.evt.{event.entity_kind}.{entity}", event))
    return out


def _fresh(path: Path) -> Path:
    for p in (path, path.with_name(path.name + ".wal")):
        p.unlink(missing_ok=True)
    return path


def ingest(events: list[StoredEvent], tmp: Path, runs: int) -> float:
    best = 0.0
    for r in range(runs):
        store = ProjectionStore(_fresh(tmp / f"ingest{r}.duckdb"))
        try:
            started = time.perf_counter()
            for i in range(0, len(events), BATCH):
                store.apply(events[i:i + BATCH], datetime(2026, 1, 1))
            best = max(best, len(events) / (time.perf_counter() - started))
        finally:
            store.close()
    return best


def fold_only(events: list[StoredEvent]) -> float:
    started = time.perf_counter()
    for i in range(0, len(events), BATCH):
        fold.fold_batch(events[i:i + BATCH], fold.Snapshot(), seen_at=datetime(2026, 1, 1))
    return len(events) / (time.perf_counter() - started)


def events_table(events: list[StoredEvent], tmp: Path, n_many: int) -> tuple[float, float]:
    """(appender rows/s, executemany rows/s) for the events table's rows alone."""
    rows = fold.fold_batch(events, fold.Snapshot(), seen_at=datetime(2026, 1, 1)
                           ).appends["events"]
    store = ProjectionStore(_fresh(tmp / "control.duckdb"))
    try:
        con = store.con
        con.execute("BEGIN")
        started = time.perf_counter()
        appender = con.appender("events")
        appender.append_rows(rows)
        appender.flush()
        con.execute("COMMIT")
        appended = len(rows) / (time.perf_counter() - started)
        con.execute("DELETE FROM events")
        marks = ", ".join("?" * len(schema.COLUMNS["events"]))
        con.execute("BEGIN")
        started = time.perf_counter()
        con.executemany(f"INSERT INTO events VALUES ({marks})", [list(r) for r in rows[:n_many]])
        con.execute("COMMIT")
        many = n_many / (time.perf_counter() - started)
    finally:
        store.close()
    return appended, many


async def fill(log: EventLog, items: list[tuple[ev.EventData, str]]) -> None:
    chunk = 5000
    for i in range(0, len(items), chunk):
        await log.append_many([(log.event(d, e), None) for d, e in items[i:i + chunk]])


async def raw_read(log: EventLog, n: int, reader: str = "nats-py") -> float:
    """Events/s of the rebuild's reading side alone (batched, undecoded): nats-py's
    ordered consumer or our own protocol reader (``reader="raw"``)."""
    started = time.perf_counter()
    async for _ in replay_source(log, until_seq=n, reader=reader):
        pass
    return n / (time.perf_counter() - started)


def cpu_s() -> float:
    """CPU seconds of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


async def rebuild_ab(log: EventLog, tmp: Path, n: int) -> dict[str, float]:
    """The rebuild with nats-py's reader (the baseline), then with our own, back to back."""
    out: dict[str, float] = {"load_avg_1m": os.getloadavg()[0]}
    for reader, name in (("nats-py", "rebuild_nats_py"), ("raw", "rebuild")):
        spent = cpu_s()
        result = await rebuild(log, tmp / f"rebuilt-{reader}.duckdb", reader=reader)
        out[f"{name}_s"] = float(result["seconds"])
        out[f"{name}_cpu_us_per_event"] = (cpu_s() - spent) / max(n, 1) * 1e6
        if reader == "raw":
            out["rebuild_events"] = float(result["events"])
            out["ingest_e2e_events_per_s"] = result["events"] / max(result["seconds"], 1e-9)
    return out


async def lag(log: EventLog, tmp: Path, seconds: float, rate: int = 1000) -> list[float]:
    items = workload(int(seconds * rate) + 10, seed=3)
    sent: dict[int, float] = {}
    lags: list[float] = []
    projector = Projector(log, _fresh(tmp / "lag.duckdb"))
    done_upto = 0

    def committed(last: int) -> None:
        nonlocal done_upto
        now = time.perf_counter()
        for seq in range(done_upto + 1, last + 1):
            if seq in sent:
                lags.append((now - sent.pop(seq)) * 1000)
        done_upto = last

    projector.on_batch(committed)
    runner = asyncio.create_task(projector.run())
    try:
        per_tick, tick = rate // 100, 0.01
        start = time.perf_counter()
        base = await log.stream_last_seq()
        for k in range(int(seconds / tick)):
            await asyncio.sleep(max(0.0, start + k * tick - time.perf_counter()))
            batch = items[k * per_tick:(k + 1) * per_tick]
            at = time.perf_counter()
            seqs = await log.append_many([(log.event(d, e), None) for d, e in batch])
            for seq in seqs:
                sent[seq] = at
        last = base + int(seconds / tick) * per_tick
        await projector.wait_for(last, 30.0)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await projector.close()
    return lags


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(url: str | None = None, quick: bool = False,
              tmp: Path | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    smoke = os.environ.get("CFLOW_BENCH_SMOKE") == "1"  # the test suite: sizes, not figures
    async with bench_server(url, tmp, "cflow-bench-projection-") as (url, tmp):
        n_ingest = 5_000 if smoke else 20_000 if quick else 200_000
        events = decoded(workload(n_ingest))
        out["fold_events_per_s"] = fold_only(events)
        out["ingest_events_per_s"] = ingest(events, tmp, runs=1 if quick else 3)
        appended, many = events_table(events, tmp, n_many=500 if quick else 5000)
        out["events_appender_rows_per_s"] = appended
        out["executemany_events_per_s"] = many
        del events

        nc = await connect(url, name="cflow:bench-projection")
        try:
            swarm = f"benchproj{os.getpid()}"
            await ensure_swarm(nc, swarm)
            log = EventLog(nc, swarm, actor="bench")
            n_rebuild = 5_000 if smoke else 100_000 if quick else 1_000_000
            started = time.perf_counter()
            await fill(log, workload(n_rebuild))
            out["append_events_per_s"] = n_rebuild / (time.perf_counter() - started)
            out["raw_read_events_per_s"] = await raw_read(log, n_rebuild, "nats-py")
            out["raw_read_native_events_per_s"] = await raw_read(log, n_rebuild, "raw")
            spent = cpu_s()
            split = await rebuild(log, tmp / "rebuilt-split.duckdb", split=True)
            out["rebuild_split_s"] = float(split["seconds"])
            out["rebuild_split_cpu_us_per_event"] = (cpu_s() - spent) / max(n_rebuild, 1) * 1e6
            out.update(await rebuild_ab(log, tmp, n_rebuild))
            out["rebuild_1m_projected_s"] = 1_000_000 / out["ingest_e2e_events_per_s"]

            lag_swarm = f"benchlag{os.getpid()}"
            await ensure_swarm(nc, lag_swarm)
            lags = await lag(EventLog(nc, lag_swarm, actor="bench"), tmp,
                             seconds=2.0 if quick else 10.0)
            out["lag_p50_ms"] = statistics.median(lags) if lags else float("nan")
            out["lag_p99_ms"] = pct(lags, 0.99)
            out["lag_max_ms"] = max(lags) if lags else float("nan")
            out["lag_events"] = float(len(lags))
        finally:
            await nc.close()
        out.update(await projection_live.run(url, quick, tmp))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_projection")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--url", default=None)
    args = parser.parse_args()
    figures: dict[str, Any] = asyncio.run(run(args.url, args.quick))
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:>14,.1f}")


if __name__ == "__main__":
    main()
