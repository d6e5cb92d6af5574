"""The servers a run starts (single nodes per sync setting, a local 3-node cluster)
and the description of the machine that every result file carries."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from cflow import server as server_mod
from cflow.server import EmbeddedServer, ServerOptions, binary, free_port

# How each sync setting is printed next to a write figure.
DURABILITY = {
    "always": "nats sync always",
    "default": "nats sync default",
}
SQLITE_DURABILITY = {
    "strict": "sqlite WAL FULL + IMMEDIATE",
    "default": "sqlite WAL NORMAL",
}


def start_single(base: Path, sync: str) -> EmbeddedServer:
    opts = ServerOptions(port=free_port(), data_dir=base / f"nats-{sync}", sync=sync,
                         server_name=f"bench-{sync}")
    server = EmbeddedServer(opts)
    server.start()
    return server


def start_cluster(base: Path, size: int = 3, sync: str = "default") -> list[EmbeddedServer]:
    """``size`` nats-servers on loopback, each routed to all the others."""

    def build() -> list[EmbeddedServer]:
        ports = [free_port() for _ in range(size)]
        cports = [free_port() for _ in range(size)]
        routes = tuple(f"nats-route://127.0.0.1:{p}" for p in cports)
        return [EmbeddedServer(ServerOptions(
            port=ports[i], data_dir=base / f"cluster-{i}", sync=sync,
            server_name=f"bench-c{i}", cluster_name="bench", cluster_port=cports[i],
            cluster_host="127.0.0.1",
            routes=tuple(r for j, r in enumerate(routes) if j != i),
        )) for i in range(size)]

    return server_mod.start_cluster(build)


async def wait_jetstream_ready(url: str | list[str], timeout: float = 30.0) -> None:
    """A cluster answers JetStream requests only once its meta leader is elected."""
    import nats

    nc = await nats.connect(servers=url if isinstance(url, list) else [url])
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = await nc.request("$JS.API.INFO", b"", timeout=2.0)
                body = json.loads(reply.data)
                if "error" not in body:
                    return
            except (TimeoutError, nats.errors.Error):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("cluster JetStream not ready")
            await asyncio.sleep(0.2)  # leader election has no event we can subscribe to
    finally:
        await nc.close()


class Servers:
    """Lazily started servers for one run; everything is stopped in ``close``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.single: dict[str, EmbeddedServer] = {}
        self.cluster: list[EmbeddedServer] | None = None
        self.stack = AsyncExitStack()

    def url(self, sync: str) -> str:
        if sync not in self.single:
            self.single[sync] = start_single(self.base, sync)
        return self.single[sync].url

    async def cluster_urls(self) -> list[str]:
        if self.cluster is None:
            self.cluster = start_cluster(self.base)
            await wait_jetstream_ready([s.url for s in self.cluster])
        return [s.url for s in self.cluster]

    def close(self) -> None:
        for srv in [*self.single.values(), *(self.cluster or [])]:
            try:
                srv.stop()
            except Exception:  # stop the rest whatever happens
                srv.kill()


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).strip()
    except OSError as exc:
        return f"unknown ({exc})"


def _fs_type(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True,
                             timeout=5, check=False)
        return out.stdout.splitlines()[1].split()[1]
    except (OSError, IndexError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(base: Path) -> dict[str, Any]:
    import sqlite3
    from importlib.metadata import version

    import duckdb

    return {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "nats_server": _version([binary(), "--version"]),
        "nats_py": version("nats-py"),
        "duckdb": duckdb.__version__,
        "sqlite": sqlite3.sqlite_version,
        "filesystem": _fs_type(base),
        "temp_dir": str(base),
    }


@contextlib.asynccontextmanager
async def bench_server(url: str | None, tmp: Path | None, prefix: str
                       ) -> AsyncIterator[tuple[str, Path]]:
    """``(url, tmp)`` for a bench module run on its own: a temporary directory
    (unless ``tmp`` is given) and an embedded nats-server, sync default (unless
    ``url`` is given); both gone afterwards."""
    with contextlib.ExitStack() as stack:
        if tmp is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
        if url is None:
            server = EmbeddedServer(ServerOptions(port=free_port(), data_dir=tmp / "nats",
                                                  sync="default"))
            server.start()
            stack.callback(server.stop)
            url = server.url
        yield url, tmp
