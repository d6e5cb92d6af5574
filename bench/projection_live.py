"""Live projection figures: lag at a steady 1k and 10k events/s, query round trips.

``uv run python -m bench.projection_live [--quick] [--url URL]`` (starts its own
nats-server without ``--url``); ``bench/bench_projection.py`` runs it too, so
``python -m bench --only projection`` has these figures beside the others.

* Lag (``lag_1k_*``, ``lag_10k_*``; the same with nats-py's reader just before,
  as baseline: ``lag_1k_nats_py_*``): a producer **process** appends at a steady
  rate (``append_many`` every 10 ms) and records, per stream sequence, the
  moment it sent the append; this process runs the projector and records when
  the batch holding each sequence committed. Both clocks are ``time.monotonic``
  (CLOCK_MONOTONIC, shared by the processes of one machine). The producer runs
  apart so its appends do not share this process's interpreter lock with the
  projector, as in a real swarm.
  Beside the lag, what each batch took on the DuckDB thread
  (``Projector.last_batch``): ``*_apply_p50/p99_ms`` (wall),
  ``*_apply_cpu_p50/p99_ms`` (that thread's CPU; the gap to the wall is waiting
  for a core, DuckDB's workers or the GIL), ``*_batch_events_p50``, and this
  process's CPU per event (``*_cpu_us_per_event``, reader and decoding included).
* Query: ``QueryClient.query`` (what ``cfctl query`` sends) against a live
  projector's ``QueryService``: a point lookup by task id, (a) alone and (b) with
  read-your-writes (append an event, then query with ``wait_for_seq`` = its
  sequence; the figure is the query's round trip after the append returned).
  The baseline in the same run is a bare NATS request/reply to an echo
  responder on the same connection (``query_rr_baseline_p50_ms``). On 2,000
  tasks (``query_*``) and again on a large projection (``query_large_*``:
  50,000 tasks with ``--quick``, 200,000 otherwise; not in the smoke test).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from bench.servers import bench_server
from cflow import events as ev
from cflow.projections.projector import BatchTiming, Projector
from cflow.projections.query import QueryClient, QueryService
from cflow.streams import EventLog, connect, ensure_swarm

TICK_S = 0.01


def _produce(url: str, swarm: str, rate: int, seconds: float, out: Any) -> None:
    """Child process: append ``rate`` events/s for ``seconds``; send back (seq, sent_at)."""
    from bench.bench_projection import workload

    async def main() -> list[tuple[int, float]]:
        nc = await connect(url, name="cflow:bench-lag-producer")
        try:
            log = EventLog(nc, swarm, actor="bench")
            per_tick = max(1, int(rate * TICK_S))
            ticks = int(seconds / TICK_S)
            items = workload(per_tick * ticks + 20, seed=3)
            sent: list[tuple[int, float]] = []
            out.send("ready")
            start = time.monotonic()
            for k in range(ticks):
                await asyncio.sleep(max(0.0, start + k * TICK_S - time.monotonic()))
                batch = items[k * per_tick:(k + 1) * per_tick]
                at = time.monotonic()
                seqs = await log.append_many([(log.event(d, e), None) for d, e in batch])
                sent.extend((seq, at) for seq in seqs)
            return sent
        finally:
            await nc.close()

    out.send(asyncio.run(main()))


async def lag(nc: Any, url: str, tmp: Path, rate: int, seconds: float,
              reader: str = "raw") -> dict[str, float]:
    """Lag figures (ms) of a live projector while another process appends at ``rate``/s."""
    swarm = f"benchlag{rate}x{int(time.time() * 1000) % 100000}{reader[0]}"
    await ensure_swarm(nc, swarm)
    log = EventLog(nc, swarm, actor="bench")
    projector = Projector(log, tmp / f"{swarm}.duckdb", reader=reader)
    committed: list[tuple[int, float]] = []  # (last seq of a batch, commit time)
    timings: list[BatchTiming] = []

    def batch_done(last: int) -> None:
        committed.append((last, time.monotonic()))
        if projector.last_batch is not None:
            timings.append(projector.last_batch)

    projector.on_batch(batch_done)
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    runner = asyncio.create_task(projector.run())
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_produce, args=(url, swarm, rate, seconds, child), daemon=True)
    proc.start()
    try:
        assert await asyncio.to_thread(parent.recv) == "ready"
        sent: list[tuple[int, float]] = await asyncio.to_thread(parent.recv)
        last = max(seq for seq, _ in sent)
        if not await projector.wait_for(last, 60.0):
            raise RuntimeError(f"the projector ({reader}) applied {projector.applied_seq} of "
                               f"{last} events within 60 s of the last append")
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await projector.close()
        await asyncio.to_thread(proc.join, 10)
        if proc.is_alive():
            proc.kill()
    lags = []
    i = 0
    for seq, at in sorted(sent):
        while committed[i][0] < seq:
            i += 1
        lags.append((committed[i][1] - at) * 1000)
    first = min(s for s, _ in sent)
    batches = [b for b in committed if b[0] >= first]
    applies = timings[len(committed) - len(batches):]
    seconds = [t.seconds * 1000 for t in applies]
    cpu = [t.cpu_s * 1000 for t in applies]
    process_cpu = (cpu_after.ru_utime + cpu_after.ru_stime
                   - cpu_before.ru_utime - cpu_before.ru_stime)
    return {"p50": statistics.median(lags), "p99": pct(lags, 0.99), "max": max(lags),
            "events": float(len(lags)), "batches": float(len(batches)),
            "batch_events_p50": statistics.median(t.events for t in applies),
            "apply_p50": statistics.median(seconds), "apply_p99": pct(seconds, 0.99),
            "apply_cpu_p50": statistics.median(cpu), "apply_cpu_p99": pct(cpu, 0.99),
            "cpu_us_per_event": process_cpu / len(lags) * 1e6}


async def queries(nc: Any, tmp: Path, n: int, tasks: int = 2000) -> dict[str, float]:
    """p50/p99 (ms) of point lookups through the query service, with and without
    read-your-writes, on a projection of ``tasks`` tasks, beside a bare
    request/reply on the same connection."""
    swarm = f"benchq{int(time.time() * 1000) % 100000}"
    await ensure_swarm(nc, swarm)
    log = EventLog(nc, swarm, actor="bench")
    for i in range(0, tasks, 500):
        await log.append_many([(log.event(ev.TaskCreated(title=f"t{j}"), f"t{j}"), 0)
                               for j in range(i, min(tasks, i + 500))])
    projector = Projector(log, tmp / f"query-{tasks}.duckdb")
    service = QueryService(nc, swarm, projector, server_id="bench")
    runner = asyncio.create_task(projector.run())
    echo_subject = f"bench.echo.{swarm}"

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    echo_sub = await nc.subscribe(echo_subject, cb=echo)
    client = QueryClient(nc, swarm)
    sql = "SELECT task_id, status, priority FROM tasks WHERE task_id = ?"
    try:
        await service.start()
        await projector.wait_for(await log.stream_last_seq(), 30.0)
        bare, alone, ryw, ryw_total = [], [], [], []
        for k in range(n):
            t0 = time.perf_counter()
            await nc.request(echo_subject, b'{"sql": "SELECT 1"}', timeout=5)
            bare.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            looked_up = f"t{k * 7919 % tasks}"
            result = await client.query(sql, params=[looked_up], limit=1)
            alone.append((time.perf_counter() - t0) * 1000)
            assert result.rows[:1] == [[looked_up, "ready", 0]], result.rows
            tid = f"w{k}"
            t0 = time.perf_counter()
            written = await log.append(ev.TaskCreated(title=tid), tid, expected=0)
            t1 = time.perf_counter()
            result = await client.query(sql, params=[tid], limit=1, wait_for_seq=written.seq)
            t2 = time.perf_counter()
            assert result.rows == [[tid, "ready", 0]], result.rows  # read-your-writes
            ryw.append((t2 - t1) * 1000)
            ryw_total.append((t2 - t0) * 1000)
    finally:
        await echo_sub.unsubscribe()
        await service.stop()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await projector.close()
    return {"rr_p50": statistics.median(bare), "p50": statistics.median(alone),
            "p99": pct(alone, 0.99), "ryw_p50": statistics.median(ryw),
            "ryw_p99": pct(ryw, 0.99), "ryw_with_append_p50": statistics.median(ryw_total)}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run(url: str | None = None, quick: bool = False,
              tmp: Path | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    async with bench_server(url, tmp, "cflow-bench-live-") as (url, tmp):
        nc = await connect(url, name="cflow:bench-projection-live")
        try:
            seconds = 1.0 if os.environ.get("CFLOW_BENCH_SMOKE") == "1" else (
                3.0 if quick else 10.0)
            for rate, name in ((1000, "1k"), (10_000, "10k")):
                # nats-py's reader first (the baseline), then the default, back to back.
                for reader, suffix in (("nats-py", "_nats_py"), ("raw", "")):
                    figures = await lag(nc, url, tmp, rate, seconds, reader=reader)
                    for key, value in figures.items():
                        unit = "" if key in ("events", "batches", "batch_events_p50",
                                             "cpu_us_per_event") else "_ms"
                        out[f"lag_{name}{suffix}_{key}{unit}"] = value
            for key, value in (await queries(nc, tmp, 200 if quick else 1000)).items():
                out[f"query_{key}_ms"] = value
            if os.environ.get("CFLOW_BENCH_SMOKE") != "1":
                # The same on a large projection: without an index a lookup scans the table.
                large = 50_000 if quick else 200_000
                out["query_large_tasks"] = large
                for key, value in (await queries(nc, tmp, 200 if quick else 1000,
                                                 tasks=large)).items():
                    out[f"query_large_{key}_ms"] = value
        finally:
            await nc.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.projection_live")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--url", default=None)
    args = parser.parse_args()
    figures = asyncio.run(run(args.url, args.quick))
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:>12,.2f}")


if __name__ == "__main__":
    main()
