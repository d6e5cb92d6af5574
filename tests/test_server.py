"""Embedded server: config rendering, `cfctl up/down/status/init`, foreground run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cflow.errors import InvalidInput, NotFound
from cflow.server import (
    EmbeddedServer,
    RunningServer,
    ServerOptions,
    ServerStartError,
    binary,
    free_port,
    port_in_use,
    render_config,
    stop_recorded,
)
from cflow.status import replica_health

CFCTL = str(Path(sys.executable).parent / "cfctl")


def cfctl(*args: str, env: dict[str, str] | None = None, timeout: float = 60
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CFCTL, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def config_ok(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary(), "--config", str(path), "-t"], capture_output=True,
                          text=True, timeout=30)


# ------------------------------------------------------------------ pure


def test_default_config_is_loopback_jetstream_and_fsync(tmp_path: Path) -> None:
    text = render_config(ServerOptions(port=4333, data_dir=tmp_path))
    assert 'host: "127.0.0.1"' in text
    assert "port: 4333" in text
    assert "sync_interval: always" in text
    assert f'store_dir: "{tmp_path / "jetstream"}"' in text
    assert "cluster" not in text
    relaxed = render_config(ServerOptions(data_dir=tmp_path, sync="default"))
    assert "sync_interval" not in relaxed
    with pytest.raises(InvalidInput):
        render_config(ServerOptions(data_dir=tmp_path, sync="sometimes"))


def test_cluster_routes_carry_route_credentials(tmp_path: Path) -> None:
    text = render_config(ServerOptions(
        data_dir=tmp_path, cluster_name="cf", cluster_port=6333,
        routes=("nats://seed:6222", "nats://u:p@other:6222"),
        route_user="ru", route_password="rp/x",
    ))
    assert 'name: "cf"' in text
    assert '"nats://ru:rp%2Fx@seed:6222"' in text
    assert '"nats://u:p@other:6222"' in text  # explicit userinfo kept
    assert 'user: "ru"' in text


def test_leaf_node_has_no_local_jetstream(tmp_path: Path) -> None:
    text = render_config(ServerOptions(data_dir=tmp_path, leaf_remotes=("nats://hub:7422",),
                                       jetstream=False, leaf_hub_domain="cflow"))
    assert "jetstream {" not in text
    assert '{ url: "nats://hub:7422" }' in text
    assert '"$JS.API.>": "$JS.cflow.API.>"' in text
    assert '"$KV.>": "$JS.cflow.API.$KV.>"' in text
    hub = render_config(ServerOptions(data_dir=tmp_path, leaf_port=7422, js_domain="cflow"))
    assert 'domain: "cflow"' in hub


def test_rendered_configs_pass_the_server_config_test(tmp_path: Path) -> None:
    from cflow import creds

    auth = tmp_path / "auth"
    creds.create(auth, "admin", "alpha", admin=True)
    creds.create(auth, "w1", "alpha", capabilities=["py"])
    reg = creds.load(auth)
    variants = {
        "single": ServerOptions(data_dir=tmp_path / "single"),
        "cluster": ServerOptions(data_dir=tmp_path / "cluster", host="0.0.0.0",
                                 cluster_name="cf", cluster_port=free_port(),
                                 routes=("nats://127.0.0.1:6999",),
                                 route_user=reg.route_user, route_password=reg.route_password,
                                 auth_include=str(auth / creds.AUTH_CONF), http_port=8999),
        "hub": ServerOptions(data_dir=tmp_path / "hub", leaf_port=free_port(),
                             js_domain="cflow", auth_include=str(auth / creds.AUTH_CONF)),
        "leaf": ServerOptions(data_dir=tmp_path / "leaf", jetstream=False,
                              leaf_hub_domain="cflow",
                              leaf_remotes=("nats://alpha.w1:pw@127.0.0.1:7422",)),
    }
    for name, opts in variants.items():
        path = EmbeddedServer(opts).write_config()
        result = config_ok(path)
        assert result.returncode == 0, (name, result.stderr, path.read_text())


def test_replica_health() -> None:
    assert replica_health(None, 1)["health"] == "ok"
    ok = {"leader": "n1", "replicas": [{"name": "n2", "current": True},
                                       {"name": "n3", "current": True}]}
    assert replica_health(ok, 3) == {
        "leader": "n1",
        "replicas": [{"name": "n2", "current": True, "offline": False, "lag": 0},
                     {"name": "n3", "current": True, "offline": False, "lag": 0}],
        "health": "ok",
    }
    lagging = {"leader": "n1", "replicas": [{"name": "n2", "current": True},
                                            {"name": "n3", "current": False, "offline": True}]}
    assert replica_health(lagging, 3)["health"] == "degraded"
    assert replica_health({"replicas": []}, 3)["health"] == "no-leader"


# ------------------------------------------------------------ processes


@pytest.mark.integration
def test_up_detach_status_down(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg"), "CFLOW_SWARM": "s1"}
    try:
        http = free_port()
        up = cfctl("up", "--detach", "--port", str(port), "--data-dir", str(data),
                   "--http-port", str(http), env=env)
        assert up.returncode == 0, up.stderr
        assert f"nats://127.0.0.1:{port}" in up.stdout
        pid = int((data / f"nats-{port}.pid").read_text())
        st = cfctl("--url", f"nats://127.0.0.1:{port}", "status", "--json", env=env)
        assert st.returncode == 0, st.stderr
        body = json.loads(st.stdout)
        assert body["jetstream"]["enabled"] is True
        assert body["server"]["jetstream"] is True
        names = {s["name"] for s in body["streams"] if s["exists"]}
        assert {"CF_s1_EVENTS", "CF_s1_MSGS", "KV_cf_s1_leases"} <= names
        assert all(s["health"] == "ok" for s in body["streams"])
        human = cfctl("--url", f"nats://127.0.0.1:{port}", "status", env=env)
        assert "CF_s1_EVENTS" in human.stdout
        mon = cfctl("--url", f"nats://127.0.0.1:{port}", "status", "--json", "--monitor",
                    f"http://127.0.0.1:{http}", env=env)
        monitor = json.loads(mon.stdout)["monitor"]
        assert monitor["name"] == body["server"]["name"]
        assert monitor["routes"] == []
        # init is idempotent and reports what it made
        init = cfctl("--url", f"nats://127.0.0.1:{port}", "--json", "init", env=env)
        assert json.loads(init.stdout)["streams"][0] == "CF_s1_EVENTS"
        # the same port again: one-line error, non-zero exit, no second pid file
        again = cfctl("up", "--detach", "--port", str(port), "--data-dir",
                      str(tmp_path / "other"), env=env)
        assert again.returncode != 0
        assert len(again.stderr.strip().splitlines()) == 1
        assert "already in use" in again.stderr
        # the same data dir on another port: refused before a second server shares its store
        other_port = free_port()
        shared = cfctl("up", "--detach", "--port", str(other_port), "--data-dir", str(data),
                       env=env)
        assert shared.returncode != 0
        assert shared.stderr.strip().splitlines() == [
            f"error: data dir {data} is in use by the node on port {port} (pid {pid}); one "
            f"node per data dir: stop it with `cfctl down --data-dir {data}`, or pick "
            "another --data-dir"], shared.stderr
        assert not port_in_use("127.0.0.1", other_port)
        assert sorted(p.name for p in data.glob("nats-*.pid")) == [f"nats-{port}.pid"]
        still = cfctl("--url", f"nats://127.0.0.1:{port}", "task", "add", "after the refusal",
                      env=env)
        assert still.returncode == 0, still.stderr
        down = cfctl("down", "--port", str(port), "--data-dir", str(data), env=env)
        assert down.returncode == 0, down.stderr
        assert str(pid) in down.stdout
        assert not port_in_use("127.0.0.1", port)
        assert not (data / f"nats-{port}.pid").exists()
        nothing = cfctl("down", "--data-dir", str(data), env=env)
        assert nothing.returncode != 0
        assert len(nothing.stderr.strip().splitlines()) == 1
    finally:
        with contextlib.suppress(NotFound):
            stop_recorded(data)


@pytest.mark.integration
def test_unreachable_server_is_one_line_suggesting_up(tmp_path: Path) -> None:
    port = free_port()
    for args in (["status"], ["init"], ["status", "--json"]):
        res = cfctl("--url", f"nats://127.0.0.1:{port}", *args, timeout=20)
        assert res.returncode != 0
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert "cfctl up" in lines[0]


@pytest.mark.integration
def test_start_refuses_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        server = EmbeddedServer(ServerOptions(port=port, data_dir=tmp_path))
        with pytest.raises(ServerStartError, match="already in use"):
            server.start()


@pytest.mark.integration
def test_foreground_up_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    metrics_port = free_port()
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [CFCTL, "up", "--port", str(port), "--data-dir", str(data), "--sync", "default",
         "--metrics-port", str(metrics_port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CFLOW_SWARM": "fg"},
    )
    with proc:
        try:
            assert proc.stdout is not None
            seen = []
            for line in proc.stdout:  # blocks until the next line: readiness is printed
                seen.append(line)
                if "Ctrl-C" in line:
                    break
            assert any("ready at" in ln for ln in seen), seen
            assert port_in_use("127.0.0.1", port)
            # The foreground server runs a projector (and its query service) too.
            url = f"nats://127.0.0.1:{port}"
            answered = None
            for _ in range(40):  # the projector subscribes moments after the server is ready
                answered = subprocess.run(
                    [CFCTL, "--url", url, "--swarm", "fg", "--json", "query",
                     "select count(*) as n from tasks"],
                    capture_output=True, text=True, timeout=60)
                if answered.returncode == 0:
                    break
            assert answered is not None and answered.returncode == 0, answered
            assert '"n": 0' in answered.stdout or '"n":0' in answered.stdout, answered.stdout
            # ... and serves Prometheus metrics on the loopback port it was given.
            import time
            import urllib.error
            import urllib.request

            text = ""
            for _ in range(100):  # another process binds the port; nothing to await here
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                                timeout=30) as resp:
                        text = resp.read().decode()
                    break
                except urllib.error.URLError:
                    time.sleep(0.1)
            assert "# TYPE cflow_claims_total counter" in text, text[:500]
            assert 'cflow_claims_total{swarm="fg"} 0' in text, text[:2000]
            # A task, projected before the stop: the projector holds rows when it stops.
            added = subprocess.run([CFCTL, "--url", url, "--swarm", "fg", "--json", "task",
                                    "add", "projected before the stop"],
                                   capture_output=True, text=True, timeout=60)
            assert added.returncode == 0, added.stderr
            seq = json.loads(added.stdout)["seq"]
            projected = subprocess.run(
                [CFCTL, "--url", url, "--swarm", "fg", "--json", "query", "--wait-for",
                 str(seq), "select count(*) as n from tasks"],
                capture_output=True, text=True, timeout=60)
            assert '"n": 1' in projected.stdout or '"n":1' in projected.stdout, projected
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 130, err  # stopped by a signal, said in one line
            assert err.strip().splitlines()[-1] == (
                "interrupted: stopped the server and the projector"), err
            # The projector closed its file (DuckDB folds the WAL into it on close).
            assert (data / "fg.duckdb").exists()
            assert not (data / "fg.duckdb.wal").exists()
            assert not port_in_use("127.0.0.1", port)
            assert not (data / f"nats-{port}.pid").exists()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
            with contextlib.suppress(NotFound):
                stop_recorded(data)


@pytest.mark.integration
async def test_foreground_runs_registered_services(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook others use to run a projector / reaper under a foreground `cfctl up`."""
    from cflow import server as server_mod
    from cflow.cli import server_cmds

    server = EmbeddedServer(ServerOptions(port=free_port(), data_dir=tmp_path, sync="default"))
    started = asyncio.Event()
    got: list[RunningServer] = []

    async def service(running: RunningServer) -> None:
        got.append(running)
        started.set()
        await asyncio.sleep(3600)  # runs until cancelled

    module = type(sys)("cflow_test_service")
    module.service = service  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cflow_test_service", module)
    monkeypatch.setattr(server_mod, "FOREGROUND_SERVICES", [("t", "cflow_test_service:service")])
    server.start()
    try:
        running = RunningServer(url=server.url, swarm="x", replicas=1, data_dir=tmp_path)
        fg = asyncio.create_task(server_cmds._foreground(server, running))
        await asyncio.wait_for(started.wait(), 10)
        assert got == [running]
        await asyncio.to_thread(server.stop)  # server exits -> services are cancelled
        await asyncio.wait_for(fg, 10)
    finally:
        server.stop()


def test_a_taken_route_port_is_a_start_error_and_a_cluster_start_picks_new_ports(
        tmp_path: Path) -> None:
    """nats-server says "ready" before it binds its route port, then exits if that fails."""
    from cflow.server import start_cluster

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        def clashing(i: int) -> EmbeddedServer:
            return EmbeddedServer(ServerOptions(
                port=free_port(), data_dir=tmp_path / f"n{i}", sync="default",
                server_name=f"n{i}", cluster_name="c", cluster_port=port,
                routes=("nats://127.0.0.1:1",)))

        server = clashing(0)
        with pytest.raises(ServerStartError, match="router port") as caught:
            server.start()
        assert caught.value.port == port
        assert server.proc is not None and server.proc.poll() is not None

        builds: list[list[EmbeddedServer]] = []

        def build() -> list[EmbeddedServer]:
            # the first build clashes; the retry gets a free route port
            servers = [clashing(len(builds))]
            if builds:
                servers[0].opts.cluster_port = free_port()
            builds.append(servers)
            return servers

        started = start_cluster(build)
        try:
            assert len(builds) == 2 and started is builds[1]
            assert started[0].proc is not None and started[0].proc.poll() is None
            assert builds[0][0].proc is not None and builds[0][0].proc.poll() is not None
        finally:
            for s in started:
                s.stop()
