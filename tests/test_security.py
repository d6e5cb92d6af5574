"""Auth: per-swarm accounts, agent permissions, refusal of open exposed servers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cflow import creds
from cflow.errors import Unavailable
from cflow.events import TaskCreated
from cflow.server import EmbeddedServer, ServerOptions, free_port, security_problem
from cflow.streams import EventLog, connect, ensure_swarm
from cflow.streams.client import api_request, build_append, publish

CFCTL = str(Path(sys.executable).parent / "cfctl")


# ------------------------------------------------------------------ pure


def test_open_server_is_refused_off_loopback_or_clustered(tmp_path: Path) -> None:
    assert security_problem(ServerOptions(data_dir=tmp_path)) is None
    for opts in (
        ServerOptions(data_dir=tmp_path, host="0.0.0.0"),
        ServerOptions(data_dir=tmp_path, cluster_name="c", cluster_port=6222),
        ServerOptions(data_dir=tmp_path, leaf_port=7422),
    ):
        problem = security_problem(opts)
        assert problem is not None
        assert "cfctl creds create" in problem
        assert "--auth" in problem
    with_auth = ServerOptions(data_dir=tmp_path, host="0.0.0.0", auth_include="auth.conf")
    assert security_problem(with_auth) is None


def test_agent_permissions_allow_only_its_swarm() -> None:
    perms = creds.agent_permissions("alpha")
    allow = perms["publish"]["allow"]
    assert "cf.alpha.>" in allow
    assert "$KV.cf_alpha_leases.>" in allow
    assert "$JS.API.STREAM.INFO.CF_alpha_EVENTS" in allow
    assert all("beta" not in s for s in allow)
    assert not any(s.startswith("$JS.API.STREAM.DELETE") for s in allow)
    assert "$JS.API.STREAM.DELETE.>" in perms["publish"]["deny"]
    assert perms["subscribe"]["allow"][0] == "cf.alpha.>"


def test_registry_round_trip_and_private_files(tmp_path: Path) -> None:
    user = creds.create(tmp_path, "w1", "alpha", capabilities=["py", "py"])
    again = creds.create(tmp_path, "w1", "alpha")
    assert again.password == user.password  # stable unless rotated
    rotated = creds.create(tmp_path, "w1", "alpha", rotate=True)
    assert rotated.password != user.password
    conf = tmp_path / creds.AUTH_CONF
    assert conf.stat().st_mode & 0o077 == 0
    assert (tmp_path / creds.REGISTRY).stat().st_mode & 0o077 == 0
    assert '"alpha": {' in conf.read_text()
    creds.revoke(tmp_path, "alpha.w1")
    assert creds.load(tmp_path).users == []
    assert creds.client_url(rotated, "nats://h:1,nats://g:2").count("alpha.w1:") == 2


# ------------------------------------------------------------ integration


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedServer, Path]]:
    base = tmp_path_factory.mktemp("auth")
    auth = base / "auth"
    creds.create(auth, "admin", "alpha", admin=True)
    creds.create(auth, "admin", "beta", admin=True)
    creds.create(auth, "w1", "alpha", capabilities=["python"])
    creds.create(auth, "w1", "beta")
    server = EmbeddedServer(ServerOptions(port=free_port(), data_dir=base / "data",
                                          sync="default",
                                          auth_include=str(auth / creds.AUTH_CONF)))
    server.start()
    try:
        yield server, auth
    finally:
        server.stop()


def _url(server: EmbeddedServer, auth: Path, name: str) -> str:
    user = creds.load(auth).find(name)
    assert user is not None
    return creds.client_url(user, server.url)


class Violations:
    def __init__(self) -> None:
        self.seen: list[str] = []
        self.changed = asyncio.Event()

    async def __call__(self, exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            self.seen.append(str(exc))
            self.changed.set()

    async def wait_for(self, needle: str) -> str:
        async with asyncio.timeout(5):
            while True:
                for text in self.seen:
                    if needle.lower() in text.lower():  # nats-py lower-cases the message
                        return text
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def agent_alpha(
    auth_server: tuple[EmbeddedServer, Path],
) -> AsyncIterator[tuple[object, Violations]]:
    server, auth = auth_server
    admin = await connect(_url(server, auth, "alpha.admin"))
    admin_b = await connect(_url(server, auth, "beta.admin"))
    try:
        await ensure_swarm(admin, "alpha")
        await ensure_swarm(admin_b, "beta")
        await EventLog(admin_b, "beta", actor="admin").append(
            TaskCreated(title="secret of beta"), "t-beta", expected=None)
    finally:
        await admin.close()
        await admin_b.close()
    violations = Violations()
    nc = await connect(_url(server, auth, "alpha.w1"), error_cb=violations)
    try:
        yield nc, violations
    finally:
        await nc.close()


@pytest.mark.integration
async def test_agent_works_in_its_own_swarm(agent_alpha: tuple[object, Violations]) -> None:
    nc, violations = agent_alpha
    await ensure_swarm(nc, "alpha")  # type: ignore[arg-type]  # create/update allowed
    log = EventLog(nc, "alpha", actor="w1")  # type: ignore[arg-type]
    first = await log.append(TaskCreated(title="ok"), "t1", expected=0)
    await log.kv_put(log.bucket("leases"), "t1", b"{}", ttl_s=30)
    events = await log.read()
    assert [e.seq for e in events if hasattr(e, "event")][-1] >= first.seq
    assert violations.seen == []


@pytest.mark.integration
async def test_agent_cannot_delete_or_purge_a_stream(
    agent_alpha: tuple[object, Violations], auth_server: tuple[EmbeddedServer, Path],
) -> None:
    nc, violations = agent_alpha
    for verb in ("DELETE", "PURGE"):
        with pytest.raises(Unavailable):
            await api_request(nc, f"$JS.API.STREAM.{verb}.CF_alpha_EVENTS", timeout=1.0)  # type: ignore[arg-type]
        await violations.wait_for(f"$JS.API.STREAM.{verb}.CF_alpha_EVENTS")
    server, auth = auth_server
    admin = await connect(_url(server, auth, "alpha.admin"))
    try:
        info = await api_request(admin, "$JS.API.STREAM.INFO.CF_alpha_EVENTS")
        assert info["config"]["name"] == "CF_alpha_EVENTS"
    finally:
        await admin.close()


@pytest.mark.integration
async def test_agent_cannot_read_or_write_another_swarm(
    agent_alpha: tuple[object, Violations],
) -> None:
    nc, violations = agent_alpha
    # Core subscription on the other swarm's subjects: refused.
    await nc.subscribe("cf.beta.>")  # type: ignore[attr-defined]
    await violations.wait_for("cf.beta.>")
    # JetStream reads of the other swarm's stream: refused.
    with pytest.raises(Unavailable):
        await api_request(nc, "$JS.API.STREAM.INFO.CF_beta_EVENTS", timeout=1.0)  # type: ignore[arg-type]
    await violations.wait_for("$JS.API.STREAM.INFO.CF_beta_EVENTS")
    with pytest.raises(Unavailable):
        await api_request(nc, "$JS.API.DIRECT.GET.CF_beta_EVENTS",  # type: ignore[arg-type]
                          {"seq": 1}, timeout=1.0)
    # Writes into the other swarm: refused (and its account has no such stream anyway).
    log_b = EventLog(nc, "beta", actor="intruder")  # type: ignore[arg-type]
    out = build_append(log_b.event(TaskCreated(title="x"), "t-x"))
    with pytest.raises(Unavailable):
        await publish(log_b.js, out, timeout=1.0)
    await violations.wait_for(out.subject)
    # Its own account has no stream of beta: even allowed names would find nothing.
    own = await api_request(nc, "$JS.API.STREAM.NAMES")  # type: ignore[arg-type]
    assert all("beta" not in n for n in own["streams"] or [])


@pytest.mark.integration
async def test_client_without_credentials_is_refused(
    auth_server: tuple[EmbeddedServer, Path],
) -> None:
    server, _ = auth_server
    with pytest.raises(Unavailable, match="authorization violation"):
        await connect(server.url)
    with pytest.raises(Unavailable, match=r"refused the credentials") as info:
        await connect(server.url.replace("nats://", "nats://alpha.w1:wrong@"))
    assert "wrong" not in str(info.value)  # the password never lands in a message


@pytest.mark.integration
def test_cfctl_up_refuses_to_start_open_off_loopback(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.run(
        [CFCTL, "up", "--detach", "--port", str(port), "--data-dir", str(tmp_path),
         "--listen", "0.0.0.0"],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "refusing to start an open server" in lines[0]
    assert "cfctl creds create" in lines[0]
    assert not list(tmp_path.glob("nats-*.pid"))


@pytest.mark.integration
def test_cfctl_creds_and_auth_up(tmp_path: Path) -> None:
    """`cfctl creds create` + `cfctl up --auth` + status with the issued URL."""
    port = free_port()
    data = tmp_path / "data"
    env_args = ["--data-dir", str(data)]
    made = subprocess.run(
        [CFCTL, "--json", "--url", f"nats://127.0.0.1:{port}", "creds", "create", "admin",
         "--swarm", "alpha", "--admin", *env_args],
        capture_output=True, text=True, timeout=30, check=True,
    )
    import json

    admin = json.loads(made.stdout)
    try:
        up = subprocess.run(
            [CFCTL, "--swarm", "alpha", "up", "--detach", "--port", str(port), *env_args,
             "--listen", "0.0.0.0", "--auth", admin["auth_conf"]],
            capture_output=True, text=True, timeout=60,
        )
        assert up.returncode == 0, up.stderr
        st = subprocess.run(
            [CFCTL, "--url", admin["url"], "--swarm", "alpha", "status", "--json"],
            capture_output=True, text=True, timeout=30,
        )
        assert st.returncode == 0, st.stderr
        body = json.loads(st.stdout)
        assert body["server"]["auth_required"] is True
        assert all(s["exists"] for s in body["streams"])
        anon = subprocess.run(
            [CFCTL, "--url", f"nats://127.0.0.1:{port}", "status"],
            capture_output=True, text=True, timeout=30,
        )
        assert anon.returncode != 0
        assert "authorization violation" in anon.stderr
    finally:
        subprocess.run([CFCTL, "down", *env_args], capture_output=True, timeout=30)


@pytest.mark.integration
async def test_agent_permissions_cover_every_service(
    auth_server: tuple[EmbeddedServer, Path],
) -> None:
    """Tasks, memory, messages and the registry work for a plain agent user."""
    from cflow.swarm import Swarm

    server, auth = auth_server
    violations = Violations()
    url = _url(server, auth, "alpha.w1")
    async with Swarm.connect(url, swarm="alpha", agent="w1") as s:
        s.nc._error_cb = violations  # type: ignore[attr-defined]  # watch for refusals
        task = await s.tasks.create("permitted work")
        lease = await s.tasks.claim(task.task_id)
        assert lease is not None
        await lease.heartbeat()
        done = await lease.complete("ok")
        assert done.status == "completed"
        await s.memory.put("notes", "k1", "v1")
        assert (await s.memory.get("notes", "k1")).value == "v1"
        await s.agents.register("w1", ["python"])
        mid = await s.messages.send("w2", "hello")
        await s.messages.ensure_inbox("w2")
        assert (await s.messages.get(mid)) is not None
    assert violations.seen == []
