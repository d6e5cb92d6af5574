"""`cfctl ui`: the web console (board, task, graph, agents, analytics, memory, operate)."""

from __future__ import annotations

import contextlib

import typer

from cflow.cli.app import EXIT_USAGE, app, fail, run, state


@app.command("ui")
def ui_cmd(
    ctx: typer.Context,
    port: int = typer.Option(8700, "--port", help="HTTP port (0: any free port)."),
    listen: str = typer.Option("127.0.0.1", "--listen", help="Listen address; anything but "
                               "loopback needs --auth and TLS."),
    auth: bool = typer.Option(False, "--auth", help="Every page needs the token, not only "
                              "the actions (required off loopback)."),
    token: str | None = typer.Option(None, "--token", envvar="CFLOW_UI_TOKEN",
                                     help="The token actions need (default: a new random one)."),
    operator: str | None = typer.Option(None, "--operator", help="Who acts through this "
                                        "console (events name ui:OPERATOR; default: $USER)."),
    tls_cert: str | None = typer.Option(None, "--tls-cert", help="Serve HTTPS with this "
                                        "certificate (PEM; with --tls-key)."),
    tls_key: str | None = typer.Option(None, "--tls-key", help="The certificate's key (PEM)."),
    behind_tls_proxy: bool = typer.Option(False, "--behind-tls-proxy", help="A TLS proxy in "
                                          "front terminates HTTPS (allows a non-loopback "
                                          "listener without --tls-cert)."),
) -> None:
    """Serve the web console; prints the URL and the token that actions need."""
    import sys

    from cflow.ui.auth import listener_problem, operator_problem
    from cflow.ui.server import console_url, default_operator, new_token, serve

    c = state(ctx)
    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together", EXIT_USAGE)
    problem = listener_problem(listen, auth, tls_cert is not None or behind_tls_proxy)
    if problem:
        fail(problem, EXIT_USAGE)
    secret = token or new_token()
    who = operator or default_operator()
    if operator_problem(who):
        fail(operator_problem(who) or "", EXIT_USAGE)

    def ready(bound: int) -> None:
        import json

        https = tls_cert is not None
        info = {"url": console_url(listen, bound, https=https),
                "login": console_url(listen, bound, secret, https=https),
                "token": secret, "actor": f"ui:{who}", "swarm": c.swarm, "port": bound}
        if c.json:
            sys.stdout.write(json.dumps(info) + "\n")
        else:
            sys.stdout.write(f"console for swarm {c.swarm} at {info['url']}\n"
                             f"token for actions (as ui:{who}): {secret}\n"
                             f"log in: {info['login']}\n")
        sys.stdout.flush()

    async def body() -> None:
        import asyncio
        import signal

        loop = asyncio.get_running_loop()
        task = asyncio.create_task(serve(c.url, c.swarm, host=listen, port=port, token=secret,
                                         operator=who, auth=auth, on_ready=ready,
                                         tls_cert=tls_cert, tls_key=tls_key,
                                         behind_tls_proxy=behind_tls_proxy))
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    run(ctx, body)
