"""``cfctl worker --docker IMAGE``: one fresh container per task, via the Docker SDK.

Each attempt creates a container from IMAGE with the task environment (see
:meth:`TaskContext.env`; the body is in ``CFLOW_TASK_BODY``, containers get no
stdin), the CPU and memory limits, no network unless ``network=True``, and the
workspace directory mounted read-write at ``/workspace``. Exit 0 completes the
task with the container's stdout; anything else fails it with the tail of
stderr. The container is removed afterwards whatever happened; a cancelled
attempt (task cancelled, lease lost, worker stopping) or a timeout stops it
first (SIGTERM, then SIGKILL after ``kill_grace_s``). A worker killed -9 leaves
it to its watcher (:mod:`cflow.worker.guard`), which force-removes it.

The Docker SDK is blocking. Its API calls go through one dedicated thread (a
``CapacityLimiter(1)``), never the event loop. Waiting for a container to exit
is a long poll that would hold that one slot for the whole task, so each wait
gets its own thread and client; a stop is then never queued behind a wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from cflow.errors import CflowError, InvalidInput, NotFound, Unavailable
from cflow.worker.executor import Outcome, TaskContext, tail_text
from cflow.worker.guard import guard

T = TypeVar("T")
WORKSPACE_MOUNT = "/workspace"
LABEL = "io.cflow.task"


@contextlib.contextmanager
def docker_errors(what: str) -> Iterator[None]:
    """Translate Docker SDK exceptions by class (never by message)."""
    import docker.errors
    import requests.exceptions

    try:
        yield
    except docker.errors.ImageNotFound:
        raise NotFound("docker image", what) from None
    except docker.errors.NotFound:
        raise NotFound("docker container", what) from None
    except docker.errors.APIError as exc:
        raise CflowError(f"docker {what}: {exc.explanation or exc}", status=exc.status_code
                         ) from None
    except (docker.errors.DockerException, requests.exceptions.ConnectionError) as exc:
        raise Unavailable(f"no Docker engine reachable ({type(exc).__name__}); "
                          "start dockerd or set DOCKER_HOST") from None


def parse_memory(value: str | None) -> int | None:
    """``512m`` / ``1g`` / ``1048576`` -> bytes (pure)."""
    if value is None:
        return None
    text = value.strip().lower().removesuffix("b")
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise InvalidInput(f"memory limit {value!r}: use bytes or a k/m/g suffix") from None


def container_config(image: str, ctx: TaskContext, *, command: str | None, network: bool,
                     workspace: Path | None, cpus: float | None, memory: str | None
                     ) -> dict[str, Any]:
    """Keyword arguments of ``containers.create`` for one attempt (pure)."""
    config: dict[str, Any] = {
        "image": image,
        "environment": ctx.env(),
        "detach": True,
        "labels": {LABEL: ctx.task_id, f"{LABEL}.epoch": str(ctx.epoch)},
        "network_mode": None if network else "none",
        "stdin_open": False,
        "tty": False,
    }
    if command is not None:
        config["command"] = ["/bin/sh", "-c", command]
    if cpus is not None:
        if cpus <= 0:
            raise InvalidInput("--cpus must be > 0")
        config["nano_cpus"] = int(cpus * 1e9)
    mem = parse_memory(memory)
    if mem is not None:
        config["mem_limit"] = mem
        config["memswap_limit"] = mem  # no swap beyond the limit
    if workspace is not None:
        config["volumes"] = {str(workspace.resolve()): {"bind": WORKSPACE_MOUNT, "mode": "rw"}}
        config["working_dir"] = WORKSPACE_MOUNT
    if not network:
        del config["network_mode"]
        config["network_disabled"] = True
    return config


class DockerExecutor:
    name = "docker"

    def __init__(self, image: str, *, command: str | None = None, network: bool = False,
                 workspace: Path | None = None, cpus: float | None = None,
                 memory: str | None = None, timeout_s: float | None = None,
                 kill_grace_s: float = 2.0) -> None:
        if not image.strip():
            raise InvalidInput("--docker needs an image")
        if workspace is not None and not workspace.is_dir():
            raise InvalidInput(f"--workspace {workspace} is not a directory")
        parse_memory(memory)
        self.image = image
        self.command = command
        self.network = network
        self.workspace = workspace
        self.cpus = cpus
        self.memory = memory
        self.timeout_s = timeout_s
        self.kill_grace_s = kill_grace_s
        self.limiter = anyio.CapacityLimiter(1)
        self._client: Any = None
        self.containers: set[str] = set()  # ids of containers of running attempts

    # -- the one Docker thread

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs),
                                              limiter=self.limiter)

    def _make_client(self) -> Any:
        import docker

        with docker_errors("connect"):
            return docker.from_env(timeout=60)

    async def client(self) -> Any:
        if self._client is None:
            self._client = await self._call(self._make_client)
        return self._client

    async def aclose(self) -> None:
        """Close the shared Docker client (its unix socket)."""
        if self._client is not None:
            client, self._client = self._client, None
            await self._call(client.close)

    async def check(self) -> None:
        """Fail fast when no engine answers or the image is not available locally.

        Raises:
            Unavailable: no Docker engine.
            NotFound: the image is not present (pull it first: nothing is pulled here).
        """
        client = await self.client()

        def probe() -> None:
            with docker_errors("ping"):
                client.ping()
            with docker_errors(self.image):
                client.images.get(self.image)

        await self._call(probe)

    # -- one attempt

    async def run(self, ctx: TaskContext) -> Outcome:
        client = await self.client()
        workspace = Path(ctx.workdir) if ctx.workdir else self.workspace  # --repo: the worktree
        config = container_config(self.image, ctx, command=self.command, network=self.network,
                                  workspace=workspace, cpus=self.cpus, memory=self.memory)

        def create() -> Any:
            with docker_errors(self.image):
                container = client.containers.create(**config)
                guard.watch_container(container.id)  # removed even if this process is killed -9
                container.start()
                return container

        # Cancelled during creation, the thread still finishes and starts the
        # container: let it, then stop and remove what it made.
        creating = asyncio.ensure_future(self._call(create))
        try:
            container = await asyncio.shield(creating)
        except asyncio.CancelledError:
            with contextlib.suppress(CflowError):
                made = await creating
                await self._stop(made)
                await self._remove(made)
            raise
        self.containers.add(container.id)
        limit = min(t for t in (self.timeout_s, ctx.timeout_s, float("inf")) if t is not None)
        try:
            try:
                with anyio.fail_after(None if limit == float("inf") else limit):
                    status = await anyio.to_thread.run_sync(
                        self._wait, container.id, abandon_on_cancel=True)
            except TimeoutError:
                await self._stop(container)
                await self._remove(container)
                return Outcome(ok=False, error=f"timed out after {limit:g} s")
            code = int(status.get("StatusCode", -1))

            def logs() -> tuple[bytes, bytes]:
                with docker_errors(container.id[:12]):
                    return (container.logs(stdout=True, stderr=False),
                            container.logs(stdout=False, stderr=True))

            out, err = await self._call(logs)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._stop(container)
                await self._remove(container)
            raise
        await self._remove(container)
        if code == 0:
            return Outcome(ok=True, output=out, exit_code=0)
        tail = tail_text(err)
        why = f"container exit code {code}"
        return Outcome(ok=False, output=out, exit_code=code,
                       error=f"{why}: {tail}" if tail else why)

    def _wait(self, container_id: str) -> dict[str, Any]:
        # Its own client: the long poll must not hold the shared one's thread.
        client = self._make_client()
        try:
            with docker_errors(container_id[:12]):
                result: dict[str, Any] = client.api.wait(container_id)
                return result
        finally:
            client.close()

    async def _stop(self, container: Any) -> None:
        def stop() -> None:
            with contextlib.suppress(NotFound, CflowError), docker_errors(container.id[:12]):
                container.stop(timeout=max(1, int(self.kill_grace_s)))

        await self._call(stop)

    async def _remove(self, container: Any) -> None:
        def remove() -> None:
            with contextlib.suppress(NotFound, CflowError), docker_errors(container.id[:12]):
                container.remove(force=True)

        try:
            await self._call(remove)
        finally:
            self.containers.discard(container.id)
            guard.forget_container(container.id)
