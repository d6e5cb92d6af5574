"""Three nats-server processes on loopback: join, R3 streams, and losing the leader."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import faults
from cflow import creds
from cflow import events as ev
from cflow.errors import CflowError, ConcurrencyConflict, NotFound, Unavailable
from cflow.server import (
    EmbeddedServer,
    ServerOptions,
    ensure_swarm_when_placeable,
    free_port,
    free_ports,
    stop_recorded,
    wait_jetstream,
)
from cflow.streams import EventLog, StoredEvent, connect, ensure_swarm, names
from cflow.streams.client import api_request

CFCTL = str(Path(sys.executable).parent / "cfctl")


class Cluster(faults.Cluster):
    """Three servers on loopback with distinct client, route and monitoring ports."""

    name = "chaos"
    monitored = True

    def jsz(self, server: EmbeddedServer) -> dict[str, Any]:
        """The server's JetStream monitoring page (``/jsz``): meta leader, peers."""
        url = f"http://127.0.0.1:{server.opts.http_port}/jsz"
        with urllib.request.urlopen(url, timeout=2) as resp:
            body: dict[str, Any] = json.loads(resp.read())
        return body

    def meta_leader(self) -> str | None:
        """Name of the JetStream meta leader as a running server sees it (None: no leader)."""
        for s in self.servers:
            if s.proc is not None and s.proc.poll() is None:
                with contextlib.suppress(OSError, ValueError):
                    leader = (self.jsz(s).get("meta_cluster") or {}).get("leader")
                    return str(leader) if leader else None
        return None


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        c.start()
        yield c
    finally:
        c.stop()


async def stream_info(nc: Any, stream: str) -> dict[str, Any]:
    return await api_request(nc, f"$JS.API.STREAM.INFO.{stream}")


async def wait_until(check: Any, within_s: float, what: str) -> Any:
    """Poll a cluster fact that has no event to await (replica catch-up, election)."""
    deadline = time.monotonic() + within_s
    while True:
        with contextlib.suppress(CflowError):
            value = await check()
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(0.2)


def all_current(info: dict[str, Any], size: int = 3) -> bool:
    cl = info.get("cluster") or {}
    reps = cl.get("replicas") or []
    return bool(cl.get("leader")) and len(reps) == size - 1 and all(
        r.get("current") and not r.get("offline") and not r.get("lag") for r in reps)


@pytest.mark.integration
async def test_r3_streams_and_replicas_never_shrink(cluster: Cluster) -> None:
    nc = await connect(cluster.urls)
    try:
        await ensure_swarm_when_placeable(nc, "r3", 3)
        info = await stream_info(nc, names.events_stream("r3"))
        assert info["config"]["num_replicas"] == 3
        # A client that connects with the default (1) must not shrink it, and finds
        # nothing to write: one look (infos sent together), where it used to create, fail, read
        # and update each of the 8 resources (24 requests per connect).
        seen: list[str] = []

        async def note(msg: Any) -> None:
            seen.append(msg.subject)

        sub = await nc.subscribe("$JS.API.STREAM.>", cb=note)
        await ensure_swarm(nc, "r3", 1)
        await nc.flush()
        await sub.unsubscribe()
        assert seen and all(s.startswith("$JS.API.STREAM.INFO.") for s in seen), seen
        info = await stream_info(nc, names.events_stream("r3"))
        assert info["config"]["num_replicas"] == 3
        await wait_until(lambda: _current(nc, "r3"), 20, "R3 replicas current")
    finally:
        await nc.close()


async def _current(nc: Any, swarm: str) -> bool:
    return all_current(await stream_info(nc, names.events_stream(swarm)))


@pytest.mark.chaos
@pytest.mark.integration
async def test_kill_the_events_leader_under_load(cluster: Cluster) -> None:
    """kill -9 the server leading the events stream while tasks are claimed and completed.

    Invariants: every acknowledged append is in the stream afterwards with the
    same id; no task completed twice; all tasks complete; work resumes within
    seconds; the restarted node catches up.
    """
    from cflow.swarm import Swarm

    swarm = "chaos"
    admin = await connect(cluster.urls)
    stop = asyncio.Event()
    acked: dict[int, str] = {}  # stream seq -> event id, for every acknowledged append
    completed: list[tuple[str, int]] = []
    progress = asyncio.Event()
    kill_at: list[float] = []
    resumed_at: list[float] = []
    tasks_n = 24
    killed: EmbeddedServer | None = None

    def note_progress(started: float) -> None:
        """A write that *began* after the kill and was acknowledged: work resumed."""
        if kill_at and not resumed_at and started >= kill_at[0]:
            resumed_at.append(time.monotonic())
        progress.set()

    async def prober() -> None:
        """Appends with expected sequence: each ack is a promise the cluster must keep."""
        async with Swarm.connect(cluster.urls, swarm=swarm, agent="prober", ensure=False) as s:
            expected = 0
            n = 0
            while not stop.is_set():
                data = ev.AgentStatusChanged(status="busy", reason=f"probe {n}")
                started = time.monotonic()
                try:
                    done = await s.log.append(data, "probe", expected=expected)
                except (Unavailable, ConcurrencyConflict):
                    expected = await _retry_last(s.log)
                    continue
                acked[done.seq] = done.event.id
                expected = done.seq
                n += 1
                note_progress(started)
                await asyncio.sleep(0.02)

    async def worker(i: int) -> None:
        urls = ",".join(reversed(cluster.urls.split(","))) if i % 2 else cluster.urls
        async with Swarm.connect(urls, swarm=swarm, agent=f"w{i}", ensure=False) as s:
            while not stop.is_set():
                try:
                    lease = await s.tasks.claim(wait=1.0)
                    if lease is None:
                        continue
                    started = time.monotonic()
                    await lease.complete("ok")
                    completed.append((lease.task_id, lease.epoch))
                    note_progress(started)
                except CflowError:
                    await asyncio.sleep(0.1)  # failover in progress: try again

    async def maintainer() -> None:
        async with Swarm.connect(cluster.urls, swarm=swarm, agent="reaper", ensure=False) as s:
            await s.tasks.maintain()

    background: list[asyncio.Task[None]] = []
    try:
        await ensure_swarm_when_placeable(admin, swarm, 3, within_s=60.0)  # a loaded CI box
        await wait_until(lambda: _current(admin, swarm), 20, "R3 replicas current")
        async with Swarm.connect(cluster.urls, swarm=swarm, agent="producer", ensure=False) as s:
            ids = [(await s.tasks.create(f"job {k}", lease_ttl_s=3.0)).task_id
                   for k in range(tasks_n)]
        background = [asyncio.create_task(prober()), asyncio.create_task(maintainer()),
                      *(asyncio.create_task(worker(i)) for i in range(3))]
        async with asyncio.timeout(20):
            while len(completed) < tasks_n // 3:
                progress.clear()
                await progress.wait()
        info = await wait_until(lambda: stream_info(admin, names.events_stream(swarm)), 10,
                                "events stream info")
        killed = cluster.by_name(info["cluster"]["leader"])
        async with Swarm.connect(cluster.urls, swarm=swarm, agent="observer",
                                 ensure=False) as observer:
            board = await observer.tasks.ensure_board()
            acked_before = len(acked)
            kill_at.append(time.monotonic())
            killed.kill()  # SIGKILL

            def all_done() -> bool:
                states = [board.get(t) for t in ids]
                return all(st is not None and st.status == "completed" for st in states)

            # A complete whose ack was lost in the failover is still a completion:
            # the observer's board (folded from the log) decides, not the workers.
            try:
                async with asyncio.timeout(40):
                    while not all_done() or len(acked) < acked_before + 20:
                        progress.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(progress.wait(), 0.5)
            except TimeoutError:
                stuck = [(st.task_id, st.status, st.owner, st.epoch) for t in ids
                         if (st := board.get(t)) is not None and st.status != "completed"]
                raise AssertionError(f"after the kill: not completed {stuck}, "
                                     f"{len(acked) - acked_before} probe appends") from None
        resume_s = resumed_at[0] - kill_at[0]
        print(f"\nkill -9 of events leader {killed.opts.server_name}: "
              f"work resumed after {resume_s:.2f} s")
        assert resume_s < 15.0  # NATS raft election timeout is 4-9 s after a leader loss
        stop.set()
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        background = []

        # Restart the killed node: it catches up with the others.
        assert killed is not None
        killed.start()
        caught_up = time.monotonic()
        await wait_until(lambda: _current(admin, swarm), 30, "restarted node caught up")
        print(f"restarted node current again after {time.monotonic() - caught_up:.2f} s")

        # Invariants, from the event log itself.
        log = EventLog(admin, swarm, actor="checker")
        stored = await read_all(log)
        lost = [seq for seq, eid in acked.items()
                if seq not in stored or stored[seq].event.id != eid]
        assert lost == [], f"acknowledged events lost: {lost[:10]}"
        done = Counter(item.event.entity_id for item in stored.values()
                       if isinstance(item.event.data, ev.TaskCompleted))
        assert set(done) == set(ids)
        assert max(done.values()) == 1, "a task was completed twice"
    finally:
        stop.set()
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await admin.close()


async def read_all(log: EventLog) -> dict[int, StoredEvent]:
    """Every stored event by direct get, sequence by sequence (no consumer involved)."""
    last = await log.stream_last_seq()
    out: dict[int, StoredEvent] = {}
    for start in range(1, last + 1, 64):
        items = await asyncio.gather(*(log.get(seq) for seq in range(start, min(start + 64,
                                                                             last + 1))))
        out.update({i.seq: i for i in items if isinstance(i, StoredEvent)})
    return out


async def _retry_last(log: EventLog) -> int:
    """After a failed append, where the probe entity really is (our write may have landed)."""
    while True:
        try:
            return await log.last_seq("agent", "probe")
        except Unavailable:
            await asyncio.sleep(0.2)


# ------------------------------------------------------------------ cfctl join


@pytest.mark.integration
def test_cfctl_join_forms_a_cluster(tmp_path: Path) -> None:
    env = {**os.environ, "CFLOW_SWARM": "joined", "XDG_DATA_HOME": str(tmp_path / "xdg")}
    auth_dir = tmp_path / "auth"
    dirs = [tmp_path / f"m{i}" for i in range(3)]
    found = free_ports(6)  # client and cluster ports, all distinct
    ports, cports = found[:3], found[3:]

    def cfctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CFCTL, *args], capture_output=True, text=True, env=env,
                              timeout=timeout)

    try:
        made = cfctl("--json", "creds", "create", "admin", "--admin", "--dir", str(auth_dir))
        assert made.returncode == 0, made.stderr
        conf = json.loads(made.stdout)["auth_conf"]
        # Clustering without auth is refused.
        open_seed = cfctl("up", "--detach", "--cluster", "cflow", "--port", str(ports[0]),
                          "--cluster-port", str(cports[0]), "--data-dir", str(dirs[0]))
        assert open_seed.returncode != 0
        assert "cfctl creds create" in open_seed.stderr
        seed = cfctl("up", "--detach", "--cluster", "cflow", "--port", str(ports[0]),
                     "--cluster-port", str(cports[0]), "--data-dir", str(dirs[0]),
                     "--auth", conf, "--sync", "default")
        assert seed.returncode == 0, seed.stderr
        for i in (1, 2):
            joined = cfctl("join", f"nats://127.0.0.1:{cports[0]}", "--port", str(ports[i]),
                           "--cluster-port", str(cports[i]), "--data-dir", str(dirs[i]),
                           "--auth", conf, "--detach", "--sync", "default")
            assert joined.returncode == 0, joined.stderr
        admin = creds.load(auth_dir).admin_for("joined")
        assert admin is not None
        url = creds.client_url(admin, ",".join(f"nats://127.0.0.1:{p}" for p in ports))
        init = cfctl("--url", url, "--json", "init", "--replicas", "3")
        assert init.returncode == 0, init.stderr

        async def healthy() -> dict[str, Any] | None:
            st = await asyncio.to_thread(cfctl, "--url", url, "status", "--json")
            body: dict[str, Any] = json.loads(st.stdout)
            ok = all(s["num_replicas"] == 3 and s["health"] == "ok" for s in body["streams"])
            return body if ok and len(body["servers"]) == 3 else None

        body = asyncio.run(wait_until(healthy, 30, "three servers, R3 streams healthy"))
        assert body["server"]["cluster"] == "cflow"
        assert all(s["leader"] in body["servers"] for s in body["streams"])
    finally:
        for d in dirs:
            with contextlib.suppress(NotFound):
                stop_recorded(d)


# ------------------------------------------------------------------ leaf node


@pytest.mark.integration
async def test_leaf_node_uses_the_hubs_jetstream_with_the_users_permissions(
    tmp_path: Path,
) -> None:
    """`cfctl up --leaf`: a laptop's local server forwards to the hub, one swarm only."""
    from cflow.swarm import Swarm

    auth = tmp_path / "auth"
    admin = creds.create(auth, "admin", "alpha", admin=True)
    creds.create(auth, "admin", "beta", admin=True)
    laptop = creds.create(auth, "laptop", "alpha")
    leaf_port = free_port()
    hub = EmbeddedServer(ServerOptions(
        port=free_port(), data_dir=tmp_path / "hub", sync="default", leaf_port=leaf_port,
        js_domain="cflow", auth_include=str(auth / creds.AUTH_CONF)))
    port = free_port()
    data = tmp_path / "laptop"
    hub.start()
    try:
        nc = await connect(creds.client_url(admin, hub.url))
        try:
            await ensure_swarm(nc, "alpha")
        finally:
            await nc.close()
        up = await asyncio.to_thread(subprocess.run, [
            CFCTL, "up", "--detach", "--port", str(port), "--data-dir", str(data),
            "--leaf", creds.client_url(laptop, f"nats://127.0.0.1:{leaf_port}")],
            capture_output=True, text=True, timeout=60)
        assert up.returncode == 0, up.stderr
        local = f"nats://127.0.0.1:{port}"  # no credentials on the laptop's loopback
        probe = await connect(local)
        try:
            await wait_jetstream(probe, 15)  # the leaf connection is up
        finally:
            await probe.close()
        async with Swarm.connect(local, swarm="alpha", agent="laptop") as s:
            task = await s.tasks.create("from the laptop")
            lease = await s.tasks.claim(task.task_id)
            assert lease is not None
            await lease.complete("done")
        hub_nc = await connect(creds.client_url(admin, hub.url))
        try:
            stored = await read_all(EventLog(hub_nc, "alpha"))
            assert any(isinstance(i.event.data, ev.TaskCompleted) for i in stored.values())
        finally:
            await hub_nc.close()
        # The leaf carries the laptop user's permissions: nothing of swarm beta.
        other = await connect(local)
        try:
            with pytest.raises(CflowError):
                await api_request(other, "$JS.API.STREAM.INFO.CF_beta_EVENTS", timeout=1.0)
        finally:
            await other.close()
    finally:
        with contextlib.suppress(NotFound):
            stop_recorded(data)
        hub.stop()
