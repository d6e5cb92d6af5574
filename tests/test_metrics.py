"""Prometheus metrics: the fold, the text format, the loopback endpoint."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path

import pytest

from cflow.errors import InvalidInput
from cflow.metrics import (
    Histogram,
    MetricsCollector,
    MetricsFold,
    parse_text,
    run_metrics_server,
    value_of,
)
from cflow.streams import StoredEvent
from cflow.swarm import Swarm


def test_histogram_is_cumulative_with_inf_sum_and_count() -> None:
    h = Histogram((1.0, 5.0))
    for v in (0.5, 2, 7, -1):
        h.observe(v)
    assert h.lines("x") == ['x_bucket{le="1"} 2', 'x_bucket{le="5"} 3', 'x_bucket{le="+Inf"} 4',
                            "x_sum 9.5", "x_count 4"]


def test_empty_fold_renders_parseable_text() -> None:
    text = MetricsFold().render(swarm="s1", stream_last_seq=7, projected_seq=None, now_ms=0)
    samples = parse_text(text)
    assert value_of(samples, "cflow_projection_lag") == 7
    assert value_of(samples, "cflow_tasks", status="ready", swarm="s1") == 0
    assert value_of(samples, "cflow_pickup_seconds_bucket", le="+Inf") == 0
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert {"cflow_claims_total", "cflow_cycle_seconds", "cflow_agents"} <= names


def test_parse_text_refuses_garbage() -> None:
    with pytest.raises(InvalidInput, match="line 2"):
        parse_text("# HELP x y\nnot a sample line at all\n")
    samples = parse_text('a{b="q\\"uote"} 1.5\n')
    assert samples[0].labels == {"b": 'q"uote'} and samples[0].value == 1.5


async def http_get(port: int, path: str = "/metrics") -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return head, body


@pytest.mark.integration
async def test_endpoint_counters_match_the_event_history_and_the_projection(
        nats_url: str, swarm_name: str, tmp_path: Path) -> None:
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="m1") as s:
        maint = asyncio.create_task(s.tasks.maintain())
        try:
            await s.agents.register("m1", ["py"])
            ids = [(await s.tasks.create(f"ok {i}", capabilities=["py"])).task_id
                   for i in range(5)]
            ids.append((await s.tasks.create("flaky", max_attempts=2, backoff_initial_s=0,
                                             priority=9)).task_id)
            ids.append((await s.tasks.create("abandoned", lease_ttl_s=1, priority=10)).task_id)
            abandoned = await s.tasks.claim()  # held, never heartbeated: reclaimed
            assert abandoned is not None and abandoned.task.title == "abandoned"

            async def finished() -> bool:
                states = [await s.tasks.get(t) for t in ids]
                return all(state.terminal for state in states)

            while not await finished():
                lease = await s.tasks.claim(capabilities=["py"], wait=10)
                assert lease is not None
                if lease.task.title == "flaky":
                    await lease.fail(f"boom {lease.attempt}")
                elif lease.task.title == "abandoned":
                    await lease.complete("second try", cost_usd=0.25)
                else:
                    await lease.complete("done", cost_usd=0.5)
        finally:
            maint.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maint

        ports: asyncio.Queue[int] = asyncio.Queue()
        server = asyncio.create_task(run_metrics_server(s, 0, ready=ports.put_nowait))
        try:
            port = await asyncio.wait_for(ports.get(), 10)
            head, body = await http_get(port)
            assert head.startswith("HTTP/1.1 200")
            assert "text/plain; version=0.0.4" in head
            missing, _ = await http_get(port, "/nope")
            assert missing.startswith("HTTP/1.1 404")
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server
        samples = parse_text(body)

        history = [i.event for i in await s.log.read() if isinstance(i, StoredEvent)]
        types = Counter(e.type for e in history)
        assert value_of(samples, "cflow_claims_total") == types["TaskClaimed"] == 9
        assert value_of(samples, "cflow_completions_total") == types["TaskCompleted"] == 6
        assert value_of(samples, "cflow_failures_total") == types["TaskFailed"] == 2
        assert value_of(samples, "cflow_failures_total", final="true") == 1
        assert value_of(samples, "cflow_reclaims_total") == types["TaskLeaseExpired"] == 1
        assert value_of(samples, "cflow_tasks_created_total") == types["TaskCreated"] == 7
        assert value_of(samples, "cflow_events_total") == len(history)
        assert value_of(samples, "cflow_cost_usd_total") == pytest.approx(2.75)
        assert value_of(samples, "cflow_tasks", status="completed") == 6
        assert value_of(samples, "cflow_tasks", status="failed") == 1
        assert value_of(samples, "cflow_tasks_by_capability", status="completed",
                        capability="py") == 5
        assert value_of(samples, "cflow_pickup_seconds_count") == 9
        assert value_of(samples, "cflow_cycle_seconds_count") == 6
        agent_status = "online"
        for e in history:
            if e.entity_kind == "agent":
                agent_status = getattr(e.data, "status", agent_status)
        assert value_of(samples, "cflow_agents") == 1
        assert value_of(samples, "cflow_agents", status=agent_status) == 1
        assert value_of(samples, "cflow_projection_lag") == 0

        # The DuckDB projection folds the same stream to the same numbers.
        from cflow.projections.projector import Projector

        projector = Projector(s.log, tmp_path / "p.duckdb")
        try:
            await projector.run(until_seq=await s.log.stream_last_seq())
            store = await projector.open()
            rows = dict(await projector.db(
                store.fetch, "SELECT status, count(*) FROM tasks GROUP BY status"))
            reclaims = (await projector.db(store.fetch,
                                           "SELECT sum(reclaims) FROM tasks"))[0][0]
        finally:
            await projector.close()
        for status, n in rows.items():
            assert value_of(samples, "cflow_tasks", status=status) == n
        assert value_of(samples, "cflow_reclaims_total") == reclaims


@pytest.mark.integration
async def test_collector_follows_live_events(nats_url: str, swarm_name: str) -> None:
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="m2") as s:
        collector = MetricsCollector(s)
        try:
            await collector.start()
            assert value_of(parse_text(await collector.collect()), "cflow_tasks_created_total") == 0
            await s.tasks.create("one")
            await s.control.pause(reason="look")
            last = await s.log.stream_last_seq()
            assert await collector.wait_for_seq(last)
            samples = parse_text(await collector.collect())
            assert value_of(samples, "cflow_tasks_created_total") == 1
            assert value_of(samples, "cflow_swarm_paused", mode="paused") == 1
        finally:
            await collector.aclose()
