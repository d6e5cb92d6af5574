"""The Docker executor against a real engine, with an image built locally FROM scratch.

The image is a static busybox (Debian's ``busybox-static``) copied into an empty
image: nothing is pulled from a registry. Without a reachable engine or without
``/bin/busybox`` every test here is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cflow.errors import NotFound
from cflow.swarm import Swarm
from cflow.worker import TaskContext, Worker, WorkerOptions
from cflow.worker.docker_exec import DockerExecutor, container_config, parse_memory
from test_worker import CFCTL

IMAGE = "cflow-test-busybox:latest"
BUSYBOX = Path("/bin/busybox")
DOCKERFILE = """FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
"""


def ctx(body: str = "the body", task_id: str = "t1") -> TaskContext:
    return TaskContext(task_id=task_id, title="title", body=body, attempt=1, epoch=9,
                       url="nats://x", swarm="s", agent="w")


def test_container_config_is_pure_and_locked_down(tmp_path: Path) -> None:
    cfg = container_config("img", ctx(), command="echo hi", network=False, workspace=tmp_path,
                           cpus=0.5, memory="64m")
    assert cfg["command"] == ["/bin/sh", "-c", "echo hi"]
    assert cfg["network_disabled"] is True and "network_mode" not in cfg
    assert cfg["nano_cpus"] == 500_000_000 and cfg["mem_limit"] == 64 * 1024**2
    assert cfg["volumes"] == {str(tmp_path.resolve()): {"bind": "/workspace", "mode": "rw"}}
    assert cfg["environment"]["CFLOW_TASK_ID"] == "t1"
    open_cfg = container_config("img", ctx(), command=None, network=True, workspace=None,
                                cpus=None, memory=None)
    assert "command" not in open_cfg and open_cfg["network_mode"] is None
    assert parse_memory("1g") == 1024**3 and parse_memory("512") == 512


@pytest.fixture(autouse=True)
async def _close_executors(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Every DockerExecutor a test makes gets its client closed (no leaked sockets)."""
    made: list[DockerExecutor] = []
    original = DockerExecutor.__init__

    def init(self: DockerExecutor, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(DockerExecutor, "__init__", init)
    yield
    for exe in made:
        await exe.aclose()


@pytest.fixture(scope="session")
def docker_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        import docker
        import docker.errors
    except ImportError:  # pragma: no cover - docker is a dependency
        pytest.skip("docker SDK not installed")
    client = None
    refused = None
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except docker.errors.DockerException as exc:
        refused = type(exc).__name__
        if client is not None:
            client.close()
    if refused is not None or client is None:
        # The SDK leaks the socket of a refused connection; collect it outside the
        # except block (its traceback holds it) with ResourceWarning silenced.
        _collect_quietly()
        pytest.skip(f"no Docker engine reachable: {refused} "
                    "(.ci/run installs docker.io and starts dockerd)")
    if not BUSYBOX.exists():
        client.close()
        pytest.skip("/bin/busybox missing: apt-get install busybox-static")
    ctx_dir = tmp_path_factory.mktemp("image")
    shutil.copy2(BUSYBOX, ctx_dir / "busybox")
    (ctx_dir / "Dockerfile").write_text(DOCKERFILE)
    try:
        client.images.build(path=str(ctx_dir), tag=IMAGE, rm=True, forcerm=True, pull=False)
    except docker.errors.DockerException as exc:
        client.close()
        pytest.skip(f"the engine cannot build images here: {exc}")
    try:
        yield IMAGE
    finally:
        client.close()


def _collect_quietly() -> None:
    import gc
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def container_exists(container_id: str) -> bool:
    import docker
    import docker.errors

    client = docker.from_env()
    try:
        client.containers.get(container_id)
        return True
    except docker.errors.NotFound:
        return False
    finally:
        client.close()


async def wait_container(exe: DockerExecutor, within: float = 30.0) -> str:
    async with asyncio.timeout(within):
        while not exe.containers:
            await asyncio.sleep(0.05)  # the container id is our own bookkeeping, no event
    return next(iter(exe.containers))


pytestmark = pytest.mark.docker


async def test_run_env_workspace_and_no_network(docker_image: str, tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("from the host")
    exe = DockerExecutor(docker_image, workspace=tmp_path, command=(
        'echo "$CFLOW_TASK_ID $CFLOW_EPOCH $CFLOW_TASK_BODY"; cat hello.txt; echo; '
        'ls /sys/class/net; echo out > result.txt'))
    await exe.check()
    out = await exe.run(ctx())
    assert out.ok, out.error
    assert out.result == "t1 9 the body\nfrom the host\nlo\n"
    assert (tmp_path / "result.txt").read_text() == "out\n"
    assert not exe.containers


async def test_failure_reports_stderr_and_removes_container(docker_image: str) -> None:
    exe = DockerExecutor(docker_image, command="echo partial; echo oops >&2; exit 4")
    out = await exe.run(ctx())
    assert not out.ok and out.exit_code == 4
    assert out.error == "container exit code 4: oops"


async def test_cancel_stops_and_removes_the_container(docker_image: str) -> None:
    exe = DockerExecutor(docker_image, command="sleep 60", kill_grace_s=1)
    run = asyncio.create_task(exe.run(ctx()))
    cid = await wait_container(exe)
    assert await asyncio.to_thread(container_exists, cid)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert not await asyncio.to_thread(container_exists, cid)


def containers_of(task_id: str) -> list[Any]:
    import docker

    client = docker.from_env()
    try:
        return list(client.containers.list(all=True, filters={"label": f"io.cflow.task={task_id}"}))
    finally:
        client.close()


class ContainerEvents:
    """Docker's event stream for one task's containers, opened before what it awaits."""

    def __init__(self, task_id: str) -> None:
        import docker

        self.client = docker.from_env()
        self.stream = self.client.events(decode=True, filters={
            "type": "container", "label": f"io.cflow.task={task_id}"})

    async def next(self, action: str) -> dict[str, Any]:
        """The next event whose action is ``action`` (``start``, ``destroy``...)."""

        def read() -> dict[str, Any]:
            for event in self.stream:
                if event.get("Action") == action:
                    return event
            raise AssertionError(f"docker's event stream ended before {action!r}")

        return await asyncio.to_thread(read)

    def close(self) -> None:
        self.stream.close()  # ends a read still waiting in its thread
        self.client.close()


async def test_cancel_during_creation_leaves_no_container(docker_image: str) -> None:
    exe = DockerExecutor(docker_image, command="sleep 60", kill_grace_s=1)
    await exe.check()  # the client exists: the cancel lands in the create step
    run = asyncio.create_task(exe.run(ctx(task_id="early-cancel")))
    await asyncio.sleep(0)  # let it start creating, then cancel at once
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert await asyncio.to_thread(containers_of, "early-cancel") == []


async def test_timeout_stops_the_container(docker_image: str) -> None:
    exe = DockerExecutor(docker_image, command="sleep 60", timeout_s=1.0, kill_grace_s=1)
    out = await exe.run(ctx())
    assert not out.ok and out.error == "timed out after 1 s"
    assert not exe.containers


async def test_limits_are_applied(docker_image: str) -> None:
    # cgroup v2 files first, then v1.
    exe = DockerExecutor(docker_image, cpus=0.5, memory="64m", command=(
        "cat /sys/fs/cgroup/memory.max 2>/dev/null "
        "|| cat /sys/fs/cgroup/memory/memory.limit_in_bytes; "
        "cat /sys/fs/cgroup/cpu.max 2>/dev/null || cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us"))
    out = await exe.run(ctx())
    assert out.ok, out.error
    memory, cpu = out.result.split("\n")[:2]
    assert int(memory) == 64 * 1024**2
    assert cpu.split()[0] == "50000"  # 0.5 CPU of a 100 ms period


async def test_missing_image_fails_at_check(docker_image: str) -> None:
    exe = DockerExecutor("cflow-no-such-image:never")
    with pytest.raises(NotFound, match="docker image not found"):
        await exe.check()


@pytest.mark.integration
async def test_worker_runs_tasks_in_containers(docker_image: str, nats_url: str,
                                               swarm_name: str) -> None:
    exe = DockerExecutor(docker_image, command='echo "container did $CFLOW_TASK_TITLE"')
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="dw") as s:
        w = Worker(s, exe, WorkerOptions(name="dw", url=nats_url))
        run = asyncio.create_task(w.run())
        try:
            await asyncio.wait_for(w.started.wait(), 15)
            t = await s.tasks.create("a container task")
            board = await s.tasks.ensure_board()

            def done() -> bool:
                st = board.get(t.task_id)
                return st is not None and st.status == "completed"

            async with s.tasks._changed:
                await asyncio.wait_for(s.tasks._changed.wait_for(done), 60)
            state: Any = board.get(t.task_id)
            assert state.result == "container did a container task\n"
        finally:
            w.drain()
            await asyncio.wait_for(run, 30)


@contextlib.asynccontextmanager
async def container_worker(docker_image: str, nats_url: str, swarm_name: str,
                           cli_env: dict[str, str], log_path: Path, *, lease_ttl_s: float
                           ) -> AsyncIterator[tuple[subprocess.Popen[bytes], str,
                                                    ContainerEvents]]:
    """A `cfctl worker --docker` whose container (``sleep 120``) has started: the
    worker process, the task id and the task's container events. Afterwards the
    worker is killed (thawed first) and any container of the task removed."""
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="tester") as s:
        t = await s.tasks.create("long container task", lease_ttl_s=lease_ttl_s)
    events = ContainerEvents(t.task_id)  # open before anything can happen
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [*CFCTL, "worker", "--name", "boxer", "--docker", docker_image,
             "--docker-cmd", "sleep 120"],
            env=cli_env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        async with asyncio.timeout(60):
            await events.next("start")
        yield worker, t.task_id, events
    finally:
        events.close()
        if worker.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGCONT)
            worker.kill()
            worker.wait(10)
        with contextlib.suppress(Exception):  # one removed meanwhile: 404
            for container in containers_of(t.task_id):
                container.remove(force=True)


@pytest.mark.integration
@pytest.mark.chaos
async def test_a_frozen_workers_container_is_removed_when_its_lease_runs_out(
        docker_image: str, nats_url: str, swarm_name: str, cli_env: dict[str, str],
        tmp_path: Path) -> None:
    """SIGSTOP of a `cfctl worker --docker`: the frozen worker cannot stop its container
    when its lease runs out, so its watcher removes it, before the server's TTL of the
    last renewal (otherwise it would run on beside the next holder's)."""
    ttl = 2.0
    async with container_worker(docker_image, nats_url, swarm_name, cli_env,
                                tmp_path / "worker.log", lease_ttl_s=ttl) as (
            worker, task_id, events):
        os.kill(worker.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ttl + 5):
                await events.next("die")
        died_after = time.monotonic() - frozen_at
        # The event is read on a thread after Docker sent it: some slack.
        assert died_after < ttl + 0.5, f"the container ran {died_after:.1f} s after the freeze"
        async with asyncio.timeout(20):
            await events.next("destroy")  # force-removed, not only killed
        assert containers_of(task_id) == []


@pytest.mark.integration
@pytest.mark.chaos
async def test_a_killed_workers_container_is_removed(docker_image: str, nats_url: str,
                                                     swarm_name: str, cli_env: dict[str, str],
                                                     tmp_path: Path) -> None:
    """kill -9 of a `cfctl worker --docker` leaves no container working on: its watcher
    force-removes it (otherwise it would run on beside the next holder's)."""
    async with container_worker(docker_image, nats_url, swarm_name, cli_env,
                                tmp_path / "worker.log", lease_ttl_s=30.0) as (
            worker, task_id, events):
        worker.kill()
        worker.wait(10)
        async with asyncio.timeout(20):
            await events.next("destroy")
        assert containers_of(task_id) == []
