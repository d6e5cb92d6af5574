"""Run the console with uvicorn: for ``cfctl ui`` and for a foreground ``cfctl up --ui-port``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import nats.errors

from cflow.errors import CflowError, InvalidInput, Unavailable
from cflow.ui.app import Console, create_app
from cflow.ui.auth import Access, listener_problem, operator_problem

if TYPE_CHECKING:
    from cflow.server import RunningServer

log = logging.getLogger(__name__)
GRACEFUL_S = 1  # live pages hold their event streams open: do not wait for them


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn without its signal handlers: whoever runs us (``cfctl ui``, a foreground
        ``cfctl up``) owns SIGINT/SIGTERM and stops us by cancelling."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server


def default_operator() -> str:
    """The local user's name (``operator`` where the system has none for this uid)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "operator"


def new_token() -> str:
    return secrets.token_urlsafe(24)


def console_url(host: str, port: int, token: str | None = None, *, https: bool = False
                ) -> str:
    shown = f"[{host}]" if ":" in host else host
    base = f"{'https' if https else 'http'}://{shown}:{port}"
    # After '#': the browser never sends it; the login page posts it.
    return f"{base}/login#token={token}" if token else base


async def serve(url: str, swarm: str, *, host: str = "127.0.0.1", port: int = 8700,
                token: str | None = None, operator: str = "operator",
                auth: bool = False, on_ready: Callable[[int], None] | None = None,
                tls_cert: str | None = None, tls_key: str | None = None,
                behind_tls_proxy: bool = False) -> None:
    """Serve the console until cancelled.

    Raises:
        InvalidInput: a non-loopback ``host`` without ``auth``.
        Unavailable: NATS unreachable at startup.
    """
    if (tls_cert is None) != (tls_key is None):
        raise InvalidInput("--tls-cert and --tls-key go together")
    tls = tls_cert is not None or behind_tls_proxy
    problem = listener_problem(host, auth, tls) or operator_problem(operator)
    if problem:
        raise InvalidInput(problem)
    from cflow.swarm import Swarm
    from cflow.ui.live import LiveHub
    from cflow.ui.reads import Reads

    access = Access(token=token or new_token(), operator=operator, reads_need_token=auth,
                    secure_cookies=tls)
    sock = _listen(host, port)
    closing = False
    try:
        # Connected before uvicorn starts, so "NATS unreachable" is our one-line error.
        async with Swarm.connect(url, swarm=swarm, agent=access.actor, ensure=False) as facade:
            hub = LiveHub(facade)
            await hub.start()
            try:
                console = Console(url=url, swarm_name=swarm, access=access, swarm=facade,
                                  reads=Reads(facade), hub=hub)
                await _run(create_app(console), sock, on_ready, tls_cert, tls_key)
            finally:
                closing = True
                await hub.stop()
    except (OSError, nats.errors.Error) as exc:
        if not closing:
            raise
        # Stopping with NATS gone: closing the connection fails; nothing is left to lose.
        log.warning("console stopped; its NATS connection was already lost (%s)", exc)
    finally:
        sock.close()


async def _run(app: Any, sock: socket.socket, on_ready: Callable[[int], None] | None,
               tls_cert: str | None = None, tls_key: str | None = None) -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=GRACEFUL_S, ssl_certfile=tls_cert,
                            ssl_keyfile=tls_key)
    server = _server_class()(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await _started(server, task)
        if on_ready is not None:
            on_ready(sock.getsockname()[1])
        await asyncio.shield(task)  # cancelled: shut uvicorn down below
    finally:
        server.should_exit = True
        if not task.done():
            await asyncio.shield(task)


def _listen(host: str, port: int) -> socket.socket:
    """Bind here, so a taken port is our one-line error rather than uvicorn's exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise Unavailable(f"cannot serve the console on {host}:{port}: "
                          f"{exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


async def _started(server: Any, task: asyncio.Task[None]) -> None:
    # uvicorn has no "started" event to await; its startup takes a few loop turns.
    while not server.started:
        if task.done():
            await task  # re-raise what stopped it
            raise Unavailable("the console stopped while starting")
        await asyncio.sleep(0.01)


async def serve_for_up(running: RunningServer, port: int) -> None:
    """The console next to a foreground ``cfctl up`` (loopback; token printed on stderr)."""
    import os
    import sys

    token = os.environ.get("CFLOW_UI_TOKEN") or new_token()

    def ready(bound: int) -> None:
        sys.stderr.write(f"console at {console_url('127.0.0.1', bound)} "
                         f"(log in to act: {console_url('127.0.0.1', bound, token)})\n")
        sys.stderr.flush()

    try:
        await serve(running.url, running.swarm, port=port, token=token,
                    operator=default_operator(), on_ready=ready)
    except CflowError as exc:  # the node goes on without its console
        sys.stderr.write(f"error: console not started: {exc}\n")


__all__ = ["console_url", "default_operator", "new_token", "serve", "serve_for_up"]
