"""`cfctl up / join / down / init / status` and `cfctl creds`: the server and the cluster."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cflow.cli.app import (
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    app,
    emit,
    exit_soon,
    fail,
    interrupted,
    run,
    state,
)

if TYPE_CHECKING:
    from cflow.creds import Registry, User
    from cflow.server import EmbeddedServer, RunningServer, ServerOptions

DEFAULT_CLUSTER = "cflow"

creds_app = typer.Typer(help="Per-agent credentials (users with subject permissions).",
                        no_args_is_help=True)
app.add_typer(creds_app, name="creds")


def _data_dir(data_dir: Path | None) -> Path:
    from cflow.server import default_data_dir

    return (data_dir or default_data_dir()).expanduser().resolve()


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def _options(
    *, port: int, data_dir: Path | None, sync: str, listen: str, http_port: int | None,
    cluster: str | None, cluster_port: int, routes: str | None, server_name: str | None,
    leaf: str | None, leaf_port: int | None, auth: Path | None, hub_domain: str = "cflow",
) -> tuple[ServerOptions, Registry | None]:
    from cflow.creds import registry_for_conf
    from cflow.server import HUB_DOMAIN, ServerOptions, security_problem

    reg = None
    if auth is not None:
        auth = auth.expanduser().resolve()
        if not auth.is_file():
            fail(f"auth file {auth} not found (create it with `cfctl creds create`)", EXIT_USAGE)
        reg = registry_for_conf(auth)
    route_list = _split(routes)
    if route_list and not cluster:
        cluster = DEFAULT_CLUSTER
    if cluster and not route_list:
        # A JetStream cluster needs configured routes; a lone seed routes to
        # itself (the server recognises and drops the self-route).
        own = "127.0.0.1" if listen in ("0.0.0.0", "::") else listen  # noqa: S104
        route_list = (f"nats://{own}:{cluster_port}",)
    opts = ServerOptions(
        port=port,
        host=listen,
        data_dir=_data_dir(data_dir),
        sync=sync,
        server_name=server_name,
        http_port=http_port,
        cluster_name=cluster,
        cluster_port=cluster_port if cluster else None,
        routes=route_list,
        leaf_remotes=_split(leaf),
        leaf_port=leaf_port,
        auth_include=str(auth) if auth else None,
        route_user=reg.route_user if reg else None,
        route_password=reg.route_password if reg else None,
        jetstream=not leaf,
        js_domain=HUB_DOMAIN if (cluster or leaf_port is not None) and not leaf else None,
        leaf_hub_domain=hub_domain if leaf else None,
    )
    if cluster and auth is not None and reg is None:
        fail(f"no users.json next to {auth}: cluster routes need the route credentials "
             "that `cfctl creds` keeps there", EXIT_USAGE)
    problem = security_problem(opts)
    if problem:
        fail(problem, EXIT_USAGE)
    return opts, reg


def _client_url(server: EmbeddedServer, reg: Registry | None, swarm: str) -> str | None:
    """The URL `up` uses to create the swarm's streams (None: no admin credentials)."""
    if reg is None:
        return server.url if server.opts.auth_include is None else None
    admin = reg.admin_for(swarm)
    if admin is None:
        return None
    from cflow.creds import client_url

    return client_url(admin, server.url)


async def _ensure(url: str, swarm: str, replicas: int, clustered: bool) -> list[str]:
    from cflow.server import ensure_swarm_when_placeable
    from cflow.streams import connect
    from cflow.swarm import close_quietly

    nc = await connect(url, name="cfctl-up")
    try:
        return await ensure_swarm_when_placeable(nc, swarm, replicas,
                                                 60.0 if clustered else 20.0)
    finally:
        await close_quietly(nc)


def _start(
    ctx: typer.Context, opts: ServerOptions, reg: Registry | None, *, detach: bool,
    replicas: int, init: bool, metrics_port: int | None = None, ui_port: int | None = None,
) -> None:
    from cflow.errors import CflowError
    from cflow.server import EmbeddedServer, RunningServer

    c = state(ctx)
    server = EmbeddedServer(opts)
    # Ctrl-C, SIGTERM and a closed terminal stop the node in order (services, then
    # the server); installed before anything starts, so a signal at any point is a
    # clean stop, never a KeyboardInterrupt mid-startup.
    signals = _record_signals()
    try:
        # Its own session: a terminal's Ctrl-C reaches only cfctl, which stops the
        # projector before the server it reads from.
        pid = server.start(detach=True)
    except CflowError as err:
        fail(str(err))
    url = _client_url(server, reg, c.swarm)
    notes: list[str] = []
    streams: list[str] = []
    services: dict[str, Any] | None = None
    try:
        if not init:
            pass
        elif url is None:
            notes.append(f"no admin user for swarm {c.swarm} in the auth file: streams not "
                         f"created (`cfctl creds create admin --swarm {c.swarm} --admin`)")
        elif opts.clustered:
            # A cluster member cannot create streams before its peers are there
            # (no JetStream meta leader yet), and only `cfctl init` decides replicas.
            notes.append("cluster member: once the servers are up, run `cfctl init "
                         "--replicas 3` (or 1) against any of them")
        elif opts.leaf_remotes:
            notes.append("leaf node: the hub's JetStream holds the streams (run `cfctl init` "
                         "against the hub)")
        elif not signals:
            streams = run(ctx, lambda: _ensure(url, c.swarm, replicas, opts.clustered))
        if detach and not signals:
            services = _start_services(ctx, server, url or server.url, replicas, metrics_port,
                                       wait=bool(streams))
    except BaseException:
        server.stop()
        server.pid_path.unlink(missing_ok=True)
        raise
    if signals:
        _stop_node(server, None)
        interrupted("stopped the server")
    db = opts.data_dir / f"{c.swarm}.duckdb"
    info = {
        "url": server.url,
        "pid": pid,
        "port": opts.port,
        "data_dir": str(opts.data_dir),
        "config": str(server.config_path),
        "log": str(server.log_path),
        "sync": opts.sync,
        "cluster": opts.cluster_name,
        "server_name": _server_name(server),
        "swarm": c.swarm,
        "streams": streams,
        "detached": detach,
        "projection": str(db),
        "services_pid": services["pid"] if services else None,
        "services_log": services["log"] if services else None,
        "notes": notes,
    }

    def human(d: dict[str, Any]) -> None:
        typer.echo(f"nats-server ready at {d['url']} (pid {d['pid']}, data {d['data_dir']}, "
                   f"sync {d['sync']})")
        if d["cluster"]:
            typer.echo(f"cluster {d['cluster']} as {d['server_name']}")
        if d["streams"]:
            typer.echo(f"swarm {d['swarm']}: {len(d['streams'])} streams and buckets ready")
        where = f"pid {d['services_pid']}, " if d["services_pid"] else ""
        typer.echo(f"projector, query service and maintenance: {where}{d['projection']}")
        for note in d["notes"]:
            typer.echo(f"note: {note}")
        if d["detached"]:
            typer.echo(f"stop it with: cfctl down --data-dir {d['data_dir']}")
        else:
            typer.echo("running in the foreground; Ctrl-C stops it")

    emit(ctx, info, human)
    sys.stdout.flush()
    if detach:
        server.proc = None  # the server outlives us; `cfctl down` stops it by its pid file
        return
    running = RunningServer(url=url or server.url, swarm=c.swarm, replicas=replicas,
                            data_dir=opts.data_dir, metrics_port=metrics_port)
    import anyio

    from cflow.cli.app import exit_code_for

    try:
        anyio.run(_foreground, server, running, signals, ui_port)
    except CflowError as err:
        fail(str(err), exit_code_for(err))
    finally:
        _stop_node(server, None)
    if signals:
        interrupted("stopped the server and the projector")
    fail(f"nats-server exited on its own (see {server.log_path}); stopped the projector")


def _record_signals() -> list[int]:
    """Note SIGINT / SIGTERM / SIGHUP instead of dying; the list fills as they come."""
    import signal

    signals: list[int] = []

    def handler(signum: int, frame: object) -> None:
        signals.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
    return signals


def _stop_node(server: EmbeddedServer, services_pid: int | None) -> None:
    """Stop the services (they write last checkpoints through the server), then the server."""
    from cflow.server import stop_pid

    if services_pid is not None:
        stop_pid(services_pid)
    server.stop()
    server.pid_path.unlink(missing_ok=True)


def _services_pid_path(data_dir: Path, port: int) -> Path:
    return data_dir / f"services-{port}.pid"


def _start_services(ctx: typer.Context, server: EmbeddedServer, url: str, replicas: int,
                    metrics_port: int | None, *, wait: bool) -> dict[str, Any]:
    """Start the detached node's services (projector, query service, maintenance) as
    their own process next to the server; ``wait``: until queries are answered."""
    import subprocess

    c = state(ctx)
    data_dir = server.opts.data_dir
    log_path = data_dir / f"services-{server.opts.port}.log"
    args = [sys.executable, "-c", "from cflow.cli import main; main()", "--url", url,
            "--swarm", c.swarm, "node-services", "--data-dir", str(data_dir),
            "--port", str(server.opts.port), "--replicas", str(replicas)]
    if metrics_port is not None:
        args += ["--metrics-port", str(metrics_port)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    _services_pid_path(data_dir, server.opts.port).write_text(f"{proc.pid}\n")
    if wait:
        try:
            run(ctx, lambda: _wait_queries(url, c.swarm, proc))
        except BaseException:
            from cflow.server import stop_pid

            stop_pid(proc.pid)
            _services_pid_path(data_dir, server.opts.port).unlink(missing_ok=True)
            raise
    return {"pid": proc.pid, "log": str(log_path)}


async def _wait_queries(url: str, swarm: str, proc: Any, within_s: float = 30.0) -> None:
    """Until the projector's query service answers (it is what `cfctl query` needs)."""
    import time

    from cflow.errors import CflowError, Unavailable
    from cflow.swarm import Swarm

    deadline = time.monotonic() + within_s
    async with Swarm.connect(url, swarm=swarm, agent="cfctl-up", ensure=False) as facade:
        while True:
            if proc.poll() is not None:
                raise Unavailable(f"the node's services exited (code {proc.returncode})")
            try:
                await facade.query("SELECT 1", timeout_s=1)
                return
            except CflowError:
                if time.monotonic() > deadline:
                    raise
            # the query service announces nothing; asking is how one learns it is up


async def _foreground(server: EmbeddedServer, running: RunningServer,
                      signals: list[int] | None = None, ui_port: int | None = None) -> None:
    """Run the node's services until the server exits or a signal comes."""
    import importlib
    import signal

    import anyio

    from cflow.server import FOREGROUND_SERVICES

    proc = server.proc
    assert proc is not None
    if signals is None:
        signals = []
    if signals:
        return
    async with anyio.create_task_group() as tg:
        import asyncio

        loop = asyncio.get_running_loop()

        def on_signal(sig: int) -> None:
            signals.append(sig)
            tg.cancel_scope.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, on_signal, sig)
        for _name, target in FOREGROUND_SERVICES:
            module, _, attr = target.partition(":")
            tg.start_soon(getattr(importlib.import_module(module), attr), running)
        if ui_port is not None:  # the web console, next to the projector
            from cflow.ui.server import serve_for_up

            tg.start_soon(serve_for_up, running, ui_port)
        await anyio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)
        tg.cancel_scope.cancel()


def _server_name(server: EmbeddedServer) -> str:
    import socket

    return server.opts.server_name or f"cflow-{socket.gethostname()}-{server.opts.port}"


@app.command("node-services", hidden=True)
def node_services(
    ctx: typer.Context,
    data_dir: Path = typer.Option(..., "--data-dir"),
    port: int = typer.Option(..., "--port"),
    replicas: int = typer.Option(1, "--replicas"),
    metrics_port: int | None = typer.Option(None, "--metrics-port"),
) -> None:
    """The services of a detached node (started by `cfctl up --detach`)."""
    import importlib

    from cflow.server import FOREGROUND_SERVICES, RunningServer

    c = state(ctx)
    running = RunningServer(url=c.url, swarm=c.swarm, replicas=replicas,
                            data_dir=data_dir, metrics_port=metrics_port)

    async def body() -> None:
        import asyncio
        import signal

        import anyio

        async with anyio.create_task_group() as tg:
            loop = asyncio.get_running_loop()
            def on_signal() -> None:
                exit_soon("stopped the node's services")
                tg.cancel_scope.cancel()

            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal)
            for _name, target in FOREGROUND_SERVICES:
                module, _, attr = target.partition(":")
                tg.start_soon(getattr(importlib.import_module(module), attr), running)
            await _until_server_gone(data_dir, port)
            exit_soon("the node's server is gone: stopped its services")
            tg.cancel_scope.cancel()

    try:
        run(ctx, body)
    finally:
        path = _services_pid_path(data_dir, port)
        if path.exists() and path.read_text().strip() == str(os.getpid()):
            path.unlink()


async def _until_server_gone(data_dir: Path, port: int, every_s: float = 1.0) -> None:
    """Return once the nats-server recorded for ``port`` in ``data_dir`` is gone (stopped
    by anything, even kill -9): a node's services never outlive their server."""
    import anyio

    from cflow.server import is_nats_server, recorded_servers

    while True:
        pids = [pid for p, pid in recorded_servers(data_dir) if p == port]
        if not pids or not any(is_nats_server(pid) for pid in pids):
            return
        await anyio.sleep(every_s)


_PORT = typer.Option(4222, "--port", help="Client port.")
_DATA = typer.Option(None, "--data-dir", help="Store, config, log and pid file (default: "
                     "$XDG_DATA_HOME/cflow).")
_SYNC = typer.Option("always", "--sync", help="always: fsync every write before the ack "
                     "(safe on one node); default: the server's 2-minute interval (faster; "
                     "a 3-replica cluster tolerates a node loss).")
_LISTEN = typer.Option("127.0.0.1", "--listen", help="Client (and cluster) listen address; "
                       "anything but loopback needs --auth.")
_HTTP = typer.Option(None, "--http-port", help="Monitoring endpoint port (on 127.0.0.1).")
_CPORT = typer.Option(6222, "--cluster-port", help="Cluster route port.")
_NAME = typer.Option(None, "--server-name", help="Unique server name (default: host + port).")
_AUTH = typer.Option(None, "--auth", help="auth.conf written by `cfctl creds create` "
                     "(required off loopback and for clusters).")
_REPL = typer.Option(1, "--replicas", help="Replicas of the swarm's streams (1 or 3).")
_DETACH = typer.Option(False, "--detach", help="Return once ready; stop with `cfctl down`.")
_INIT = typer.Option(True, "--init/--no-init", help="Create the swarm's streams once ready.")


@app.command()
def up(
    ctx: typer.Context,
    port: int = _PORT,
    data_dir: Path | None = _DATA,
    sync: str = _SYNC,
    detach: bool = _DETACH,
    http_port: int | None = _HTTP,
    listen: str = _LISTEN,
    cluster: str | None = typer.Option(None, "--cluster", help="Cluster name (join a cluster)."),
    cluster_port: int = _CPORT,
    routes: str | None = typer.Option(None, "--routes", help="Seed routes, comma-separated "
                                      "(nats://host:6222,...)."),
    server_name: str | None = _NAME,
    leaf: str | None = typer.Option(None, "--leaf", help="Hub URL(s) to join as a leaf node "
                                    "(nats://user:pass@hub:7422); uses the hub's JetStream."),
    leaf_port: int | None = typer.Option(None, "--leaf-port", help="Accept leaf nodes on this "
                                         "port (a hub)."),
    hub_domain: str = typer.Option("cflow", "--hub-domain", help="JetStream domain of the "
                                   "hub a leaf node uses (cflow clusters and hubs use 'cflow')."),
    auth: Path | None = _AUTH,
    replicas: int = _REPL,
    init: bool = _INIT,
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", help="Serve Prometheus metrics on 127.0.0.1:PORT (foreground)."),
    ui_port: int | None = typer.Option(
        None, "--ui-port", help="Serve the web console on 127.0.0.1:PORT (foreground; the "
        "token for actions is printed on stderr)."),
) -> None:
    """Start the embedded nats-server (JetStream on, 127.0.0.1 by default)."""
    opts, reg = _options(
        port=port, data_dir=data_dir, sync=sync, listen=listen, http_port=http_port,
        cluster=cluster, cluster_port=cluster_port, routes=routes, server_name=server_name,
        leaf=leaf, leaf_port=leaf_port, auth=auth, hub_domain=hub_domain,
    )
    if ui_port is not None and detach:
        fail("--ui-port serves the console from the foreground process: drop --detach "
             "(or run `cfctl ui` next to the detached server)", EXIT_USAGE)
    _start(ctx, opts, reg, detach=detach, replicas=replicas, init=init,
           metrics_port=metrics_port, ui_port=ui_port)


@app.command()
def join(
    ctx: typer.Context,
    seeds: str = typer.Argument(..., help="Route URL(s) of cluster members, comma-separated "
                                "(nats://seed:6222)."),
    port: int = _PORT,
    data_dir: Path | None = _DATA,
    sync: str = _SYNC,
    detach: bool = _DETACH,
    listen: str = _LISTEN,
    cluster: str = typer.Option(DEFAULT_CLUSTER, "--cluster", help="Cluster name of the seed."),
    cluster_port: int = _CPORT,
    server_name: str | None = _NAME,
    http_port: int | None = _HTTP,
    auth: Path | None = _AUTH,
) -> None:
    """Start a server that joins the cluster at SEEDS (short form of `up --cluster --routes`)."""
    opts, reg = _options(
        port=port, data_dir=data_dir, sync=sync, listen=listen, http_port=http_port,
        cluster=cluster, cluster_port=cluster_port, routes=seeds, server_name=server_name,
        leaf=None, leaf_port=None, auth=auth,
    )
    # A joining server never creates streams: it would race the seed, and only
    # `cfctl init --replicas 3` decides to spread them.
    _start(ctx, opts, reg, detach=detach, replicas=1, init=False)


@app.command()
def down(
    ctx: typer.Context,
    port: int | None = typer.Option(None, "--port", help="Stop only this port's server."),
    data_dir: Path | None = _DATA,
) -> None:
    """Stop the node(s) `cfctl up --detach` started with this data dir.

    Exit 5 when no node was started with it (the line says which dirs do hold one).
    """
    from cflow.errors import CflowError
    from cflow.server import recorded_servers, stop_recorded

    where = _data_dir(data_dir)
    recorded = [p for p, _ in recorded_servers(where) if port is None or p == port]
    if not recorded and not list(where.glob("services-*.pid")):
        fail(_no_node(where, port, state(ctx).url), EXIT_NOT_FOUND)
    services = _stop_services(where, port)
    try:
        stopped = stop_recorded(where, port)
    except CflowError as err:
        from cflow.cli.app import exit_code_for

        fail(str(err), exit_code_for(err))
    emit(ctx, [{"port": p, "pid": pid, "services_pid": services.get(p)} for p, pid in stopped],
         "\n".join(f"stopped nats-server pid {pid} (port {p})"
                   + (f" and its services pid {services[p]}" if p in services else "")
                   for p, pid in stopped))


def _no_node(data_dir: Path, port: int | None, url: str) -> str:
    """The line for `cfctl down` finding no node in ``data_dir``; it names the data dir
    of the node on ``port`` (else on the ports of ``url``), found among this host's
    processes."""
    from urllib.parse import urlsplit

    from cflow.server import running_nodes

    on = f" on port {port}" if port is not None else ""
    ports = {port} if port is not None else set()
    for u in url.split(",") if port is None else ():
        try:
            ports.add(urlsplit(u.strip()).port or 4222)
        except ValueError:  # not a URL: no port to look for
            continue
    nodes = {p: d for p, d in running_nodes().items() if p in ports}
    known = "; ".join(f"`cfctl down --data-dir {d}` stops the one on port {p}"
                      for p, d in sorted(nodes.items()))
    return (f"no cflow node was started{on} with data dir {data_dir}; pass the --data-dir "
            f"it was started with" + (f" ({known})" if known else ""))


def _stop_services(data_dir: Path, port: int | None) -> dict[int, int]:
    """Stop the detached services recorded in ``data_dir``: {port: pid} stopped."""
    from cflow.server import stop_pid

    stopped = {}
    for path in sorted(data_dir.glob("services-*.pid")):
        try:
            p, pid = int(path.stem.removeprefix("services-")), int(path.read_text().strip())
        except ValueError:
            continue
        if port is not None and p != port:
            continue
        if _is_cflow(pid) and stop_pid(pid):
            stopped[p] = pid
        path.unlink(missing_ok=True)
    return stopped


def _is_cflow(pid: int) -> bool:
    try:
        return b"node-services" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@app.command()
def init(
    ctx: typer.Context,
    replicas: int = _REPL,
) -> None:
    """Create or update the swarm's streams and buckets (idempotent)."""
    from cflow.server import ensure_swarm_when_placeable
    from cflow.streams import connect
    from cflow.streams.definitions import swarm_resources
    from cflow.swarm import close_quietly

    c = state(ctx)
    swarm_resources(c.swarm, replicas)  # refuses replicas other than 1 or 3, before connecting

    async def body() -> list[str]:
        nc = await connect(c.url, name="cfctl-init")
        try:
            return await ensure_swarm_when_placeable(nc, c.swarm, replicas, 30.0)
        finally:
            await close_quietly(nc)

    made = run(ctx, body)
    emit(ctx, {"swarm": c.swarm, "replicas": replicas, "streams": made},
         f"swarm {c.swarm}: {len(made)} streams and buckets ready (replicas {replicas})")


@app.command()
def status(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    monitor: str | None = typer.Option(None, "--monitor", envvar="CFLOW_MONITOR",
                                       help="Monitoring endpoint (http://127.0.0.1:8222)."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Live view, refreshing in place "
                               "(same as `cfctl top`)."),
) -> None:
    """Servers, JetStream usage, and the swarm's streams with replica health."""
    from cflow.status import collect_status
    from cflow.swarm import Swarm

    c = state(ctx)
    c.json = c.json or as_json
    if watch:
        from cflow.cli.ops_cmds import watch_status

        watch_status(ctx, monitor)
        return

    async def body() -> dict[str, Any]:
        async with Swarm.connect(c.url, swarm=c.swarm, agent="cfctl-status",
                                 ensure=False) as swarm:
            return await collect_status(swarm, monitor_url=monitor)

    emit(ctx, run(ctx, body), _render_status)


LABEL_WIDTH = len("jetstream") + 2  # `cfctl status`: every value starts in one column


def _row(label: str, text: object) -> str:
    return f"{label:<{LABEL_WIDTH - 1}} {text}"


def _render_status(d: dict[str, Any]) -> None:
    s = d["server"]
    typer.echo(_row("server", f"{s['name']} {s['version']} at {s['connected_url']}"
                    + (f", cluster {s['cluster']}" if s["cluster"] else "")))
    if len(d["servers"]) > 1:
        typer.echo(_row("servers", ", ".join(d["servers"])))
    if "monitor" in d:
        m = d["monitor"]
        typer.echo(_row("monitor", m.get("error") or m))
    js = d["jetstream"]
    if not js["enabled"]:
        typer.echo(_row("jetstream", f"off: {js['error']}"))
    else:
        typer.echo(_row("jetstream", f"{js['streams']} streams, {js['consumers']} consumers, "
                                     f"{js['storage']} bytes stored"))
    typer.echo(_row("swarm", d["swarm"]))
    for st in d["streams"]:
        if not st["exists"]:
            typer.echo(f"  {st['name']:<32} missing (run `cfctl init`)")
            continue
        summary = st.get("summary") or (f"R{st['num_replicas']} {st['health']}"
                                        + (f", leader {st['leader']}" if st["leader"] else ""))
        msgs = "msg " if st["messages"] == 1 else "msgs"
        typer.echo(f"  {st['name']:<32} {st['messages']:>8} {msgs}  {summary}")
    if "control" in d:
        from cflow.cli.ops_cmds import control_lines

        for line in control_lines(d["control"]):  # shared with `cfctl top`: realigned here
            label, _, text = line.partition("  ")
            typer.echo(_row(label, text) if label == "control" else line)
    if "maintenance" in d:
        typer.echo("\n".join(maintenance_lines(d["maintenance"])))
    q = d.get("queries")
    if isinstance(q, dict):
        typer.echo(_row("queries", f"answered by a projector, projected up to event "
                                   f"{q['checkpoint']}" if q.get("serving") else
                        "no projector answering (`cfctl up` or `cfctl projector` runs one)"))
    agents = d.get("agents")
    if isinstance(agents, dict) and "error" not in agents:
        shown = ", ".join(f"{n} {state.replace('_', ' ')}" for state, n in agents.items() if n)
        typer.echo(_row("agents", shown or "none registered"))
    for key, value in d.items():
        if key not in ("swarm", "server", "servers", "monitor", "jetstream", "streams",
                       "control", "maintenance", "queries", "agents"):
            text = value.get("error", value) if isinstance(value, dict) else value
            typer.echo(_row(key, text))


def maintenance_lines(section: Any) -> list[str]:
    """Who maintains the swarm (reaps, sweeps) and how that is going."""
    if isinstance(section, dict):  # the section itself failed
        return [_row("maint", section.get("error", section))]
    if not section:
        return [_row("maint", "no maintaining process answered (start a worker, `cfctl up` "
                              "or a projector; claims still reap dead holders themselves)")]
    out = [_row("maint", f"{len(section)} process{'es' if len(section) != 1 else ''}")]
    for r in section:
        state = "running" if r.get("running") else "STOPPED"
        error = (f", last error {r['last_error_age_s']:g} s ago in {r['last_error_loop']}: "
                 f"{r['last_error']}" if r.get("last_error") else "")
        sweep = r.get("last_sweep_age_s")
        out.append(f"  {r.get('agent')} pid {r.get('pid')} on {r.get('host')}: {state}, "
                   f"{r.get('failures', 0)} failures, {r.get('reaped', 0)} reaped, "
                   f"last sweep {'never' if sweep is None else f'{sweep:g} s ago'}{error}")
    return out


# ------------------------------------------------------------------ creds


def _creds_dir(directory: Path | None, data_dir: Path | None) -> Path:
    return (directory or _data_dir(data_dir) / "auth").expanduser().resolve()


def _user_info(user: User, directory: Path, url: str) -> dict[str, Any]:
    from cflow.creds import AUTH_CONF, client_url

    return {
        "user": user.name,
        "password": user.password,
        "swarm": user.swarm,
        "agent": user.agent,
        "admin": user.admin,
        "capabilities": user.capabilities,
        "url": client_url(user, url),
        "auth_conf": str(directory / AUTH_CONF),
    }


_CAPS = typer.Option([], "--capability", help="Capability (repeatable).")
_CREDS_DIR = typer.Option(None, "--dir", help="Credentials directory (default: <data-dir>/auth).")


@creds_app.command("create")
def creds_create(
    ctx: typer.Context,
    agent: str = typer.Argument(..., help="Agent name (the user is <swarm>.<agent>)."),
    swarm: str | None = typer.Option(None, "--swarm", help="Swarm (default: the global --swarm)."),
    capability: list[str] = _CAPS,
    admin: bool = typer.Option(False, "--admin", help="Whole-account user (may delete streams)."),
    rotate: bool = typer.Option(False, "--rotate", help="Issue a new password."),
    directory: Path | None = _CREDS_DIR,
    data_dir: Path | None = _DATA,
) -> None:
    """Issue credentials for AGENT in a swarm and rewrite auth.conf (running servers reload)."""
    from cflow import creds
    from cflow.errors import CflowError
    from cflow.server import reload_recorded

    c = state(ctx)
    where = _creds_dir(directory, data_dir)
    try:
        user = creds.create(where, agent, swarm or c.swarm, capabilities=capability,
                            admin=admin, rotate=rotate)
    except CflowError as err:
        fail(str(err), EXIT_USAGE)
    reloaded = reload_recorded(_data_dir(data_dir))
    info = {**_user_info(user, where, c.url), "reloaded_pids": reloaded}

    def human(d: dict[str, Any]) -> None:
        typer.echo(f"user {d['user']} ({'admin' if d['admin'] else 'agent'} of swarm "
                   f"{d['swarm']}) in {d['auth_conf']}")
        typer.echo(f"export CFLOW_URL='{d['url']}'")
        if d["capabilities"]:
            typer.echo(f"capabilities: {', '.join(d['capabilities'])}")
        if not reloaded:
            typer.echo(f"start the server with: cfctl up --auth {d['auth_conf']}")

    emit(ctx, info, human)


@creds_app.command("list")
def creds_list(
    ctx: typer.Context,
    directory: Path | None = _CREDS_DIR,
    data_dir: Path | None = _DATA,
) -> None:
    """Users in the credentials directory (passwords not shown)."""
    from cflow import creds

    reg = creds.load(_creds_dir(directory, data_dir))
    rows = [{"user": u.name, "swarm": u.swarm, "admin": u.admin,
             "capabilities": u.capabilities} for u in reg.users]
    emit(ctx, rows, "\n".join(f"{r['user']:<40} {'admin' if r['admin'] else 'agent'}"
                              for r in rows) or "no users")


@creds_app.command("revoke")
def creds_revoke(
    ctx: typer.Context,
    user: str = typer.Argument(..., help="User name <swarm>.<agent>."),
    directory: Path | None = _CREDS_DIR,
    data_dir: Path | None = _DATA,
) -> None:
    """Remove a user and rewrite auth.conf (running servers reload)."""
    from cflow import creds
    from cflow.cli.app import exit_code_for
    from cflow.errors import CflowError
    from cflow.server import reload_recorded

    try:
        creds.revoke(_creds_dir(directory, data_dir), user)
    except CflowError as err:
        fail(str(err), exit_code_for(err))
    reloaded = reload_recorded(_data_dir(data_dir))
    emit(ctx, {"revoked": user, "reloaded_pids": reloaded}, f"revoked {user}")
