"""Run the console with uvicorn: for ``cfctl ui`` and for a foreground ``cfctl up --ui-port``."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from cflow.errors import InvalidInput
from cflow.ui.app import Console, create_app
from cflow.ui.auth import Access, listener_problem

if TYPE_CHECKING:
    from cflow.server import RunningServer

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


def new_token() -> str:
    return secrets.token_urlsafe(24)


def console_url(host: str, port: int, token: str | None = None) -> str:
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}"
    return f"{base}/login?token={token}" if token else base


async def serve(url: str, swarm: str, *, host: str = "127.0.0.1", port: int = 8700,
                token: str | None = None, operator: str = "operator",
                auth: bool = False, on_ready: Callable[[int], None] | None = None) -> None:
    """Serve the console until cancelled.

    Raises:
        InvalidInput: a non-loopback ``host`` without ``auth``.
        Unavailable: NATS unreachable at startup.
    """
    import uvicorn

    problem = listener_problem(host, auth)
    if problem:
        raise InvalidInput(problem)
    access = Access(token=token or new_token(), operator=operator, reads_need_token=auth)
    app = create_app(Console(url=url, swarm_name=swarm, access=access))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=GRACEFUL_S,
                             lifespan="on")
    server = _server_class()(config)
    import asyncio

    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                await task  # re-raise the startup error
                return
            await asyncio.sleep(0.02)
        if on_ready is not None:
            bound = port
            for srv in server.servers:
                for sock in srv.sockets:
                    bound = sock.getsockname()[1]
            on_ready(bound)
        await asyncio.shield(task)  # cancelled: shut uvicorn down below, lifespan included
    finally:
        server.should_exit = True
        if not task.done():
            await asyncio.shield(task)


async def serve_for_up(running: RunningServer, port: int) -> None:
    """The console next to a foreground ``cfctl up`` (loopback; token printed on stderr)."""
    import getpass
    import os
    import sys

    token = os.environ.get("CFLOW_UI_TOKEN") or new_token()

    def ready(bound: int) -> None:
        sys.stderr.write(f"console at {console_url('127.0.0.1', bound)} "
                         f"(log in to act: {console_url('127.0.0.1', bound, token)})\n")
        sys.stderr.flush()

    await serve(running.url, running.swarm, port=port, token=token,
                operator=getpass.getuser(), on_ready=ready)


__all__ = ["console_url", "new_token", "serve", "serve_for_up"]
