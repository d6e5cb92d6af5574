"""``cfctl mcp``: connect, become the agent, serve MCP on stdio (or streamable HTTP).

Start-up order: log to stderr (stdout carries only protocol messages), connect
to NATS within a short timeout (a missing server is one line on stderr and exit
code 6, well inside Claude Code's 30 s start limit), register the agent, start
presence + maintenance, then serve. The process ends when its client goes away:
stdin reaches EOF (the stdio transport returns) or the parent process changes
(we were re-parented because Claude Code died). Leases are not released on the
way out; they expire after their TTL and other agents reclaim the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cflow.errors import InvalidInput

log = logging.getLogger("cflow.mcp")

CONNECT_TIMEOUT_S = 5.0
PARENT_POLL_S = 1.0
LOOPBACK_NAMES = ("localhost",)


@dataclass
class Options:
    url: str
    swarm: str
    agent: str
    capabilities: list[str] = field(default_factory=list)
    http: tuple[str, int] | None = None
    connect_timeout_s: float = CONNECT_TIMEOUT_S


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
    serving = asyncio.create_task(server.serve(), name="mcp-http")
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True  # graceful: finish requests, run the app's shutdown
    stopping.cancel()
    await serving


async def serve(opts: Options, stop: asyncio.Event | None = None) -> None:
    """Run the adapter until the client goes away (or ``stop`` is set).

    Raises:
        Unavailable: NATS not reachable within the connect timeout.
        InvalidInput: a bad swarm or agent name.
    """
    from cflow.events import check_token
    from cflow.hooks import open_swarm
    from cflow.mcp.adapter import Adapter, default_labels
    from cflow.mcp.server import build_server

    check_token(opts.agent, "agent name")
    ppid = os.getppid()
    stop = stop or asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        swarm = await open_swarm(stack, opts.url, opts.swarm, opts.agent,
                                 timeout_s=opts.connect_timeout_s)
        adapter = Adapter(swarm, capabilities=opts.capabilities, labels=default_labels())
        await stack.enter_async_context(adapter.running())
        srv = build_server(adapter)
        log.info("agent %s serving swarm %s (%s)", opts.agent, opts.swarm,
                 f"http://{opts.http[0]}:{opts.http[1]}/mcp" if opts.http else "stdio")
        if opts.http:
            await _serve_http(srv, *opts.http, stop)
            return
        serving = asyncio.create_task(srv.run_stdio_async(), name="mcp-stdio")
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
        log.info("client went away; leases (%d held) will expire", len(adapter.leases))


async def _until_signalled(opts: Options) -> None:
    """``serve`` that ends quietly on SIGTERM/SIGINT (leases are left to expire)."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(opts, stop)
    if stop.is_set():
        log.info("terminated by a signal; held leases will expire")


def run(opts: Options) -> None:
    """Blocking entry point for the CLI."""
    setup_logging()
    asyncio.run(_until_signalled(opts))


def resolve_agent(explicit: str | None, env: dict[str, str] | None = None) -> str:
    from cflow.hooks import claude_agent_name

    return claude_agent_name(explicit, env=env)


def resolve_capabilities(given: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
    from cflow.hooks import capabilities_from_env

    caps = {c.strip() for item in given for c in item.split(",") if c.strip()}
    return sorted(caps) if caps else capabilities_from_env(env)


__all__ = ["Options", "parse_http", "resolve_agent", "resolve_capabilities", "run", "serve"]
