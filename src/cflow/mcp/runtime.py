"""``cfctl mcp``: connect, become the agent, serve MCP on stdio (or streamable HTTP).

Start-up order on stdio: the :mod:`~cflow.mcp.front` thread owns stdin/stdout
first and answers ``initialize`` and ``tools/list`` within milliseconds; then
the SDK is imported, NATS connected within a short timeout (a missing server is
one line on stderr and exit code 6), maintenance started, and the queued
requests are served. The agent registers at its first tool call or after
:data:`~cflow.mcp.adapter.ENGAGE_AFTER_S` (a health check that connects and
leaves registers nothing). The process ends when its client goes away (stdin
EOF, parent gone) or on SIGTERM/SIGINT, at once. Leases are never released on
the way out; they expire after their TTL and other agents reclaim the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cflow.errors import InvalidInput
from cflow.mcp.front import (
    FORWARDED_INIT_ID,
    INIT_WAIT_S,
    Front,
    is_claude_code,
    is_forwarded_init_answer,
)

log = logging.getLogger("cflow.mcp")

CONNECT_TIMEOUT_S = 5.0
PARENT_POLL_S = 1.0
RECONNECT_MIN_S = 0.5  # a cfctl mcp that answered its client retries NATS this often, doubling
RECONNECT_MAX_S = 5.0
RELAY_NOTE_S = 1.0  # an edit note relayed for a hook takes at most this (the hook waits)
STOP_GRACE_S = 0.4  # a signalled server that has not exited by then leaves at once
LOOPBACK_NAMES = ("localhost",)
DEFAULT_URL = "nats://127.0.0.1:4222"  # as the CLI's --url


@dataclass
class Options:
    url: str
    swarm: str
    agent: str
    capabilities: list[str] = field(default_factory=list)
    http: tuple[str, int] | None = None
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    engage_after_s: float | None = None  # None: the adapter's default


def parse_http(value: str) -> tuple[str, int]:
    """``HOST:PORT`` on a loopback address (pure).

    Raises:
        InvalidInput: not HOST:PORT, or a host that is not loopback.
    """
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidInput(f"--http wants HOST:PORT, got {value!r}")
    if host not in LOOPBACK_NAMES:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise InvalidInput(f"--http serves on loopback only (127.0.0.1, ::1, localhost), "
                               f"not {host!r}")
    return host, int(port_text)


def setup_logging(level: int = logging.INFO) -> None:
    """Everything to stderr; the SDK's own basicConfig then finds a handler and stays out."""
    root = logging.getLogger()
    if not any(getattr(h, "_cflow", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("cflow-mcp %(levelname)s %(name)s: %(message)s"))
        handler._cflow = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("mcp", "httpx", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


async def _watch_parent(original_ppid: int) -> None:
    """Return when our parent process is gone (we were re-parented)."""
    while True:
        await asyncio.sleep(PARENT_POLL_S)  # no portable event for "parent died"
        if os.getppid() != original_ppid:
            break
    log.info("parent process %s went away; exiting without releasing leases", original_ppid)


async def _serve_http(srv: Any, host: str, port: int, stop: asyncio.Event) -> None:
    """Streamable HTTP at ``http://host:port/mcp`` until ``stop``; logs to stderr only."""
    import uvicorn

    app = srv.streamable_http_app()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            log_config=None)
    server = uvicorn.Server(config)
    import socket

    # Bound and listening before we say so: clients may connect the moment they read it.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="mcp-http")
    log.info("listening on http://%s:%s/mcp", host, port)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True  # graceful: finish requests, run the app's shutdown
    stopping.cancel()
    await serving


async def _serve_front(srv: Any, front: Front, stop: asyncio.Event) -> None:
    """The SDK server on the front's queue of forwarded lines, until input ends or ``stop``."""
    import mcp_types as types
    from mcp.shared._context_streams import create_context_streams
    from mcp.shared.message import SessionMessage

    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
    def sink(item: bytes | None) -> None:
        loop.call_soon_threadsafe(inbox.put_nowait, item)

    front.attach(sink)
    read_writer, read_stream = create_context_streams[SessionMessage | Exception](0)
    write_stream, write_reader = create_context_streams[SessionMessage](0)

    async def pump_in() -> None:
        async with read_writer:
            while (line := await inbox.get()) is not None:
                try:
                    message = types.jsonrpc_message_adapter.validate_json(line, by_name=False)
                except Exception as exc:  # the session answers a parse error
                    await read_writer.send(exc)
                    continue
                await read_writer.send(SessionMessage(message))

    async def pump_out() -> None:
        async with write_reader:
            async for item in write_reader:
                data = item.message.model_dump(by_alias=True, exclude_unset=True, mode="json")
                if is_forwarded_init_answer(data):
                    continue
                front.write(json.dumps(data, separators=(",", ":"), ensure_ascii=False))

    lowlevel = srv._lowlevel_server
    tasks = [asyncio.create_task(pump_in(), name="mcp-in"),
             asyncio.create_task(pump_out(), name="mcp-out"),
             asyncio.create_task(lowlevel.run(read_stream, write_stream,
                                              lowlevel.create_initialization_options()),
                                 name="mcp-session"),
             asyncio.create_task(stop.wait(), name="stop")]
    try:
        await asyncio.wait({tasks[2], tasks[3]}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _open_channel(adapter: Any, front: Front) -> None:
    """Push swarm events into the session; relay its permission prompts to the swarm."""
    from cflow.mcp.channel import PERMISSION_REQUEST, Channel

    loop = asyncio.get_running_loop()
    channel = Channel(adapter, lambda message: front.write(
        json.dumps(message, separators=(",", ":"), ensure_ascii=False), droppable=True))
    adapter.channel = channel
    relays: set[asyncio.Task[str]] = set()

    def relay(params: dict[str, Any]) -> None:  # on the front's reader thread
        def start() -> None:
            task = loop.create_task(channel.relay_permission(params))
            relays.add(task)
            task.add_done_callback(relays.discard)

        loop.call_soon_threadsafe(start)

    front.handle_notification(PERMISSION_REQUEST, relay)


async def _connect(stack: contextlib.AsyncExitStack, opts: Options, front: Front | None) -> Any:
    """Connect to NATS. A client that already got its tool list is not left hanging:
    while NATS is unreachable its calls are answered BACKEND_UNAVAILABLE and the
    connection is retried in the background (without a client: Unavailable at once)."""
    from cflow.errors import Unavailable
    from cflow.hooks import open_swarm

    backoff = RECONNECT_MIN_S
    degraded = False
    kept: list[bytes | None] = []
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                return await open_swarm(stack, opts.url, opts.swarm, opts.agent,
                                        timeout_s=opts.connect_timeout_s)
            except Unavailable as exc:
                if front is None or not front.initialized.is_set():
                    raise
                if not degraded:
                    degraded = True
                    log.warning("NATS unreachable (%s); answering BACKEND_UNAVAILABLE "
                                "and retrying", exc)

                    def sink(item: bytes | None, reason: str = str(exc),
                             on: Front = front) -> None:
                        loop.call_soon_threadsafe(_answer_unavailable, on, item, kept, reason)

                    front.attach(sink)
                if front.closed.is_set():
                    raise
            await asyncio.sleep(backoff)  # a reconnect backoff is a timer by nature
            backoff = min(RECONNECT_MAX_S, backoff * 2)
    finally:
        if degraded:
            front.detach(kept)  # type: ignore[union-attr]


def _answer_unavailable(front: Front, item: bytes | None, kept: list[bytes | None],
                        reason: str) -> None:
    """While NATS is unreachable: calls get BACKEND_UNAVAILABLE, the handshake is kept."""
    try:
        message = json.loads(item) if item is not None else None
    except ValueError:
        message = None
    if not isinstance(message, dict) or "id" not in message \
            or message.get("id") == FORWARDED_INIT_ID:
        kept.append(item)  # end of input, notifications, the handshake: for the server
        return
    text = (f"BACKEND_UNAVAILABLE: the swarm's NATS server is unreachable ({reason}). "
            "Hint: retry in a few seconds; cfctl mcp reconnects by itself.")
    if message.get("method") == "tools/call":
        answer: dict[str, Any] = {"result": {"content": [{"type": "text", "text": text}],
                                             "isError": True}}
    else:
        answer = {"error": {"code": -32603, "message": text}}
    front.write(json.dumps({"jsonrpc": "2.0", "id": message["id"], **answer}))


async def serve(opts: Options, stop: asyncio.Event | None = None,
                front: Front | None = None,
                on_serving: Callable[[], None] | None = None) -> None:
    """Run the adapter until the client goes away (or ``stop`` is set).

    Raises:
        Unavailable: NATS not reachable within the connect timeout.
        InvalidInput: a bad swarm or agent name.
    """
    from cflow.events import check_token
    from cflow.mcp.adapter import Adapter, default_labels
    from cflow.mcp.server import build_server

    check_token(opts.agent, "agent name")
    ppid = os.getppid()
    stop = stop or asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        swarm = await _connect(stack, opts, front)
        adapter = Adapter(swarm, capabilities=opts.capabilities, labels=default_labels())
        if front is not None and not front.initialized.is_set():
            # Connected before the client said who it is: wait a moment for initialize.
            await asyncio.to_thread(front.initialized.wait, INIT_WAIT_S)
        if front is not None and (is_claude_code(front.client)
                                  or os.environ.get("CFLOW_CHANNELS") == "1"):
            _open_channel(adapter, front)
        await stack.enter_async_context(adapter.running(
            engage_after_s=opts.engage_after_s if front is not None else 0.0))
        if front is not None:
            await stack.enter_async_context(_hook_relay(adapter, opts.swarm))
        srv = build_server(adapter)
        if on_serving is not None:
            on_serving()
        if opts.http:
            log.info("agent %s serving swarm %s over HTTP", opts.agent, opts.swarm)
            await _serve_http(srv, *opts.http, stop)
            return
        log.info("agent %s serving swarm %s (stdio)", opts.agent, opts.swarm)
        serving = asyncio.create_task(
            _serve_front(srv, front, stop) if front is not None else srv.run_stdio_async(),
            name="mcp-stdio")
        watcher = asyncio.create_task(_watch_parent(ppid), name="parent-watch")
        stopping = asyncio.create_task(stop.wait(), name="stop")
        try:
            await asyncio.wait({serving, watcher, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (serving, watcher, stopping):
                task.cancel()
            for task in (serving, watcher, stopping):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if adapter.channel is not None:
            await adapter.channel.close()
        log.info("client went away; leases (%d held) will expire", len(adapter.leases))


@contextlib.asynccontextmanager
async def _hook_relay(adapter: Any, swarm: str) -> Any:
    """Answer this session's hooks on a Unix socket: edit notes on the leases we hold.

    A hook then needs no NATS connection of its own (the hook falls back to one
    when nobody listens). Best effort: no socket, no relay.
    """
    from cflow.errors import CflowError
    from cflow.hooks import EDIT_NOTE, clear_waiting, hook_socket_path

    path = hook_socket_path(swarm, adapter.agent)

    async def note(request: dict[str, Any], paths: list[str]) -> int:
        noted = 0
        for task_id, lease in list(adapter.leases.items()):
            if not lease.lost.is_set():
                await adapter.swarm.tasks.note(
                    task_id, EDIT_NOTE.format(tool=request.get("tool_name", "?")),
                    epoch=lease.epoch, paths=paths)
                noted += 1
        await clear_waiting(adapter.swarm, adapter.agent)
        return noted

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reply: dict[str, Any]
        try:
            request = json.loads(await asyncio.wait_for(reader.readline(), 5))
            paths = [str(p) for p in request.get("paths") or []][:100]
            noted = 0
            if request.get("event") == "PostToolUse" and paths:
                if not adapter.swarm.nc.is_connected:  # an outage: answer at once
                    raise CflowError("the backend is unreachable; edit not noted")
                # PostToolUse runs in-line: the session waits for this answer.
                noted = await asyncio.wait_for(note(request, paths), RELAY_NOTE_S)
            reply = {"ok": True, "noted": noted}
        except (CflowError, ValueError, TimeoutError, AttributeError) as exc:
            reply = {"ok": False, "error": str(exc) or type(exc).__name__}
        try:
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    server = None
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        server = await asyncio.start_unix_server(answer, path)
    except OSError as exc:
        log.info("no hook relay (%s); hooks reach NATS themselves", exc)
    try:
        yield server
    finally:
        if server is not None:
            server.close()
            with contextlib.suppress(OSError):
                os.unlink(path)


def _quit_now(signum: int, frame: object) -> None:
    """Before serving nothing is held: leave at once, even in the middle of an import."""
    os._exit(0)


async def _until_signalled(opts: Options, front: Front | None) -> None:
    """``serve`` that ends at once on SIGTERM/SIGINT (leases are left to expire).

    Claude Code sends SIGINT at session end and escalates to SIGTERM after about
    100 ms and SIGKILL after about 500 ms. Until the server serves (SDK import, NATS
    connect) a signal ends the process on the spot; while serving, it stops the
    server gracefully (closing NATS, releasing nothing), with :data:`STOP_GRACE_S`
    as the hard limit.
    """
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def graceful() -> None:
        stop.set()
        loop.call_later(STOP_GRACE_S, _quit_now, 0, None)

    def serving() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, graceful)

    await serve(opts, stop, front, on_serving=serving)
    if stop.is_set():
        log.info("terminated by a signal; held leases will expire")


def run(opts: Options) -> None:
    """Blocking entry point for the CLI: the front answers first, then the full server."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _quit_now)
    front = None if opts.http else Front().start()
    setup_logging()
    if opts.engage_after_s is None:
        from cflow.mcp.adapter import ENGAGE_AFTER_S

        opts.engage_after_s = ENGAGE_AFTER_S
    try:
        asyncio.run(_until_signalled(opts, front))
    finally:
        if front is not None:
            front.flush(1.0)  # what was answered still goes out (the writer is a daemon)


def resolve_agent(explicit: str | None, env: dict[str, str] | None = None) -> str:
    from cflow.hooks import claude_agent_name

    return claude_agent_name(explicit, env=env)


def resolve_capabilities(given: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
    from cflow.hooks import capabilities_from_env

    caps = {c.strip() for item in given for c in item.split(",") if c.strip()}
    return sorted(caps) if caps else capabilities_from_env(env)


def fast_main(argv: Sequence[str], env: dict[str, str] | None = None) -> int | None:
    """``cfctl mcp [--agent A] [-c CAP]...`` without Typer; None: let the full CLI handle it.

    The URL and swarm come from ``CFLOW_URL`` and ``CFLOW_SWARM`` (what ``.mcp.json``
    sets), with the CLI's defaults.
    """
    from cflow.errors import CflowError

    env = dict(os.environ) if env is None else env
    agent: str | None = None
    caps: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, eq, value = arg.partition("=")
        if name in ("--agent", "--capability", "-c") and (eq or args):
            value = value if eq else args.pop(0)
            if name == "--agent":
                agent = value
            else:
                caps.append(value)
        else:
            return None  # --http, --help, anything else: the full CLI
    try:
        opts = Options(url=env.get("CFLOW_URL") or DEFAULT_URL,
                       swarm=env.get("CFLOW_SWARM") or "default",
                       agent=resolve_agent(agent, env),
                       capabilities=resolve_capabilities(caps, env))
        run(opts)
    except CflowError as err:
        sys.stderr.write(f"error: {err}\n")
        return exit_code(err)
    except KeyboardInterrupt:
        return 0
    return 0


def exit_code(err: Exception) -> int:
    from cflow.errors import Unavailable

    return 6 if isinstance(err, Unavailable) else 2


__all__ = ["Options", "fast_main", "parse_http", "resolve_agent", "resolve_capabilities", "run",
           "serve"]
