"""Self-tests of the fault-injection kit (tests/faults.py): each fault does what it says."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats.errors
import pytest

from cflow import events as ev
from cflow.errors import Unavailable
from cflow.server import ensure_swarm_when_placeable
from cflow.streams import EventLog, connect, ensure_swarm, names
from cflow.swarm import Swarm
from cflow.worker.executor import TaskContext
from cflow.worker.subprocess_exec import SubprocessExecutor
from faults import (
    Cluster,
    ExecutionLog,
    Proxy,
    RestartableServer,
    WorkerProcess,
    completions,
    fleet,
    parse_executions,
    require_faketime,
    skewed_env,
    step_down,
    stream_leader,
    task_events,
)

pytestmark = pytest.mark.integration

INFO = "$JS.API.INFO"


async def rtt(nc: object, timeout: float = 2.0) -> float:
    started = time.monotonic()
    await nc.request(INFO, b"", timeout=timeout)  # type: ignore[attr-defined]
    return time.monotonic() - started


# ------------------------------------------------------------------ proxy


async def test_proxy_blackhole_is_silent_and_heal_delivers(nats_url: str) -> None:
    with Proxy(nats_url) as proxy:
        nc = await connect(proxy.url)
        try:
            await rtt(nc)
            assert proxy.connections == 1
            proxy.blackhole()
            await asyncio.sleep(0.1)  # a write already under way when the hole opened
            forwarded = proxy.forwarded
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request(INFO, b"", timeout=0.5)
            # Silent: nothing forwarded, nothing closed, the client still thinks it is up.
            assert proxy.forwarded == forwarded
            assert proxy.connections == 1 and nc.is_connected
            # A new connection is accepted but hears nothing (no INFO): it times out.
            with pytest.raises(Unavailable):
                await connect(proxy.url, connect_timeout=0.5)
            proxy.heal()
            assert await rtt(nc) < 1.0
            assert proxy.forwarded > forwarded  # the held bytes went through too
        finally:
            await nc.close()


async def test_proxy_delay_adds_latency_each_way(nats_url: str) -> None:
    with Proxy(nats_url) as proxy:
        nc = await connect(proxy.url)
        try:
            base = await rtt(nc)
            proxy.delay(150)
            slow = await rtt(nc)
            assert slow >= 0.3 > base
            proxy.heal()
            assert await rtt(nc) < 0.15
        finally:
            await nc.close()


async def test_proxy_cut_closes_connections_and_clients_come_back(nats_url: str) -> None:
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    with Proxy(nats_url) as proxy:
        nc = await connect(proxy.url, reconnected_cb=on_reconnect)
        try:
            await rtt(nc)
            proxy.cut()
            await asyncio.wait_for(reconnected.wait(), 10)
            await rtt(nc)
            assert proxy.accepted == 2 and proxy.connections == 1
        finally:
            await nc.close()


async def refused_at_once(port: int) -> bool:
    """A new TCP connection is closed by the other side before any byte (no INFO)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        try:
            data = await asyncio.wait_for(reader.read(1), 2.0)
        except ConnectionResetError:
            data = b""
        return data == b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_proxy_down_is_an_outage_until_heal(nats_url: str) -> None:
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    with Proxy(nats_url) as proxy:
        nc = await connect(proxy.url, reconnected_cb=on_reconnect)
        try:
            await rtt(nc)
            proxy.down()
            assert proxy.connections == 0
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", proxy.port)
            with pytest.raises((nats.errors.TimeoutError, nats.errors.ConnectionClosedError)):
                await nc.request(INFO, b"", timeout=0.5)
            assert not reconnected.is_set()
            proxy.heal()
            await asyncio.wait_for(reconnected.wait(), 10)
            await rtt(nc)
        finally:
            await nc.close()


async def test_proxy_without_upstream_refuses(tmp_path: Path) -> None:
    from cflow.server import free_port

    with Proxy(f"nats://127.0.0.1:{free_port()}") as proxy:
        assert await refused_at_once(proxy.port)
        assert proxy.connections == 0


# ------------------------------------------------------------------ clock skew


CLOCKS = "import time; t=time.monotonic(); time.sleep(0.2); print(time.time(), time.monotonic()-t)"


@pytest.mark.parametrize("offset", [600, -600])
def test_faketime_skews_the_wall_clock_and_keeps_time_flowing(offset: int) -> None:
    env = skewed_env(dict(os.environ), offset)
    before = time.time()
    # Through a shell, as a worker's executions are: children inherit the skew.
    out = subprocess.run(["sh", "-c", f"{sys.executable} -c '{CLOCKS}'"], env=env,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    child_wall, slept = map(float, out.split())
    assert abs(child_wall - (before + offset)) < 5, (child_wall, before)
    assert 0.19 <= slept < 1.0  # time.sleep works and monotonic runs at real speed


def test_faketime_timers_run_at_real_speed() -> None:
    env = skewed_env(dict(os.environ), -600)
    code = "import asyncio, time; t=time.monotonic(); asyncio.run(asyncio.sleep(0.3)); " \
           "print(time.monotonic()-t)"
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert 0.29 <= float(out) < 1.0
    assert time.monotonic() - started < 10


def test_skew_needs_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    import faults

    monkeypatch.setattr(faults, "FAKETIME_LIBS", ())
    monkeypatch.delenv("CFLOW_FAKETIME_LIB", raising=False)
    monkeypatch.setenv("CI", "false")
    monkeypatch.delenv("CFLOW_CI_DOCKER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install faketime"):
        require_faketime()


# ------------------------------------------------------------------ recorder


def ctx(task_id: str = "t1", body: str = "", attempt: int = 1) -> TaskContext:
    return TaskContext(task_id=task_id, title="x", body=body, attempt=attempt, epoch=7,
                       url="nats://x", swarm="s", agent="w1")


async def test_recorder_records_a_run_and_its_outcome(tmp_path: Path) -> None:
    log = ExecutionLog(tmp_path)
    exe = SubprocessExecutor(log.command(seconds=0.3))
    started = time.monotonic()
    out = await exe.run(ctx())
    assert out.ok and out.result == "ran t1 attempt 1\n"
    [run] = log.executions()
    assert (run.task_id, run.agent, run.epoch, run.attempt, run.how) == ("t1", "w1", 7, 1,
                                                                        "exit-0")
    assert run.end is not None and started < run.start < run.end < time.monotonic()
    assert 0.29 <= run.end - run.start < 1.0
    failing = log.body(seconds=0.05, fail_attempts=1)
    first = await exe.run(ctx("t2", failing, attempt=1))
    second = await exe.run(ctx("t2", failing, attempt=2))
    assert not first.ok and "on purpose" in (first.error or "") and second.ok
    assert [e.how for e in log.executions("t2")] == ["exit-1", "exit-0"]


async def test_recorder_sees_the_worker_stop_an_execution(tmp_path: Path) -> None:
    log = ExecutionLog(tmp_path)
    exe = SubprocessExecutor(log.command(seconds=30))
    run = asyncio.create_task(exe.run(ctx()))
    await log.wait(lambda runs: runs, 10, "execution started")
    stopped_at = time.monotonic()
    run.cancel()  # what the worker does when a lease is lost: SIGTERM to the group
    with pytest.raises(asyncio.CancelledError):
        await run
    [e] = await log.wait(lambda runs: [r for r in runs if r.end is not None], 5, "ended")
    assert e.how == "signal-15"
    assert e.end is not None and 0 <= e.end - stopped_at < 1.0


async def test_recorder_watcher_notes_a_sigkill(tmp_path: Path) -> None:
    log = ExecutionLog(tmp_path)
    proc = subprocess.Popen(["sh", "-c", log.command(seconds=30)], stdin=subprocess.PIPE,
                            env={**os.environ, "CFLOW_TASK_ID": "k", "CFLOW_AGENT": "w9"})
    try:
        assert proc.stdin is not None
        proc.stdin.close()
        [e] = await log.wait(lambda runs: runs, 10, "execution started")
        assert e.pid == proc.pid  # `exec`: the recorder is the process the worker spawned
        killed_at = time.monotonic()
        os.kill(e.pid, signal.SIGKILL)
        [e] = await log.wait(lambda runs: [r for r in runs if r.end is not None], 5, "dead")
        assert e.how == "dead" and e.end is not None and 0 <= e.end - killed_at < 0.5
    finally:
        proc.kill()
        proc.wait(10)


async def test_recorder_in_a_skewed_process_uses_the_machines_clock(tmp_path: Path) -> None:
    log = ExecutionLog(tmp_path)
    env = skewed_env({**os.environ, "CFLOW_TASK_ID": "s"}, 600)
    before = time.monotonic()
    proc = await asyncio.create_subprocess_shell(log.command(seconds=0.3), env=env,
                                                 stdin=subprocess.DEVNULL)
    assert await asyncio.wait_for(proc.wait(), 20) == 0
    [e] = log.executions()
    assert e.end is not None and before < e.start < e.end < time.monotonic()
    assert 0.29 <= e.end - e.start < 1.0 and e.how == "exit-0"


def test_parse_executions_and_overlaps() -> None:
    lines = [
        "start a 10 100.0 1.0 5 1 w1",
        "start a 11 103.0 1.0 9 2 w2",
        "end a 11 110.0 exit-0",
        "dead a 11 110.1",
        "dead a 10 108.5",  # w1's run was SIGKILLed: no end line
        "start b 12 104.0 1.0 6 1 w3",
        "garbage",
    ]
    runs = parse_executions(lines)
    assert [(r.task_id, r.pid, r.end, r.how) for r in runs] == [
        ("a", 10, 108.5, "dead"), ("a", 11, 110.0, "exit-0"), ("b", 12, None, None)]
    assert runs[0].overlap(runs[1]) == pytest.approx(5.5)
    assert runs[0].overlap(runs[2]) == pytest.approx(4.5)
    assert runs[2].until(now=120.0) == 120.0


# ------------------------------------------------------------------ worker + proxy


async def test_worker_process_runs_tasks_through_a_proxy(
        nats_url: str, swarm_name: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    log = ExecutionLog(tmp_path)
    with Proxy(nats_url) as proxy:
        worker = WorkerProcess("kw1", {**cli_env, "CFLOW_URL": proxy.url},
                               log.command(seconds=0.1), tmp_path)
        with fleet([worker], log):
            async with Swarm.connect(nats_url, swarm=swarm_name, agent="kit") as s:
                await worker.wait_ready()
                assert proxy.connections >= 1
                task = await s.tasks.create("via proxy", body=log.body(seconds=0.2))
                await log.wait(lambda runs: [r for r in runs if r.how == "exit-0"], 20, "ran")
                items = await task_events(s.log)
                async with asyncio.timeout(10):
                    while completions(items)[task.task_id] != 1:
                        await asyncio.sleep(0.1)
                        items = await task_events(s.log)
    [run] = log.executions(task.task_id)
    assert run.agent == "kw1" and run.epoch > 0


# ------------------------------------------------------------------ server restart


async def test_server_kill9_and_restart_keeps_the_store(tmp_path: Path) -> None:
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    with RestartableServer(tmp_path / "nats") as server:
        port = server.server.opts.port
        nc = await connect(server.url, reconnected_cb=on_reconnect)
        try:
            await ensure_swarm(nc, "kit")
            log = EventLog(nc, "kit", actor="kit")
            done = await log.append(ev.AgentStatusChanged(status="busy", reason="before"), "a1")
            pid = server.pid
            server.kill9()
            assert not server.running and server.kills == 1
            await asyncio.to_thread(server.restart)
            assert server.running and server.pid != pid and server.server.opts.port == port
            await asyncio.wait_for(reconnected.wait(), 15)
            stored = await log.get(done.seq)
            assert getattr(stored, "event", None) is not None
            assert stored.event.id == done.event.id  # type: ignore[union-attr]
            await log.append(ev.AgentStatusChanged(status="idle", reason="after"), "a1",
                             expected=done.seq)
        finally:
            await nc.close()


# ------------------------------------------------------------------ cluster


@pytest.mark.chaos
async def test_cluster_leader_step_down_and_leader_kill(tmp_path: Path) -> None:
    with Cluster(tmp_path) as cluster:
        nc = await connect(cluster.urls)
        try:
            await ensure_swarm_when_placeable(nc, "kit", 3)
            stream = names.events_stream("kit")
            old, new = await step_down(nc, stream)
            assert old != new and new in {s.opts.server_name for s in cluster.servers}
            killed = await cluster.kill_leader(nc, stream)
            assert killed.opts.server_name == new and killed.proc is not None
            assert killed.proc.poll() is not None
            after = await stream_leader(nc, stream, within_s=20, not_=new)
            assert after != new
        finally:
            await nc.close()
