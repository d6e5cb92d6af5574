"""The console's Starlette app: pages, their JSON twins, live updates, and the operator's actions.

Every page has a JSON twin under ``/api`` with the same data (tests and scripts
read those). Reads come from the projection (:mod:`cflow.ui.reads`) and the
control bucket; writes go through the ``Swarm`` facade (control, gates, tasks),
connected as ``ui:<operator>``, so every event they append names the human.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cflow.errors import (
    CflowError,
    ConflictError,
    InvalidInput,
    InvalidState,
    LimitExceeded,
    NotFound,
    QueryRejected,
    Unavailable,
)
from cflow.ui.auth import COOKIE, SESSION_COOKIE, Access
from cflow.ui.reads import STATUS_ORDER, BoardFilter, Reads

if TYPE_CHECKING:
    from jinja2 import Environment
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from cflow.swarm import Swarm
    from cflow.ui.live import LiveHub

HERE = Path(__file__).parent
log = logging.getLogger(__name__)
KEEPALIVE_S = 15.0
# No framing by other sites, no inline or foreign scripts (htmx runs with eval off),
# and the login link's token never leaves in a Referer.
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
     b"img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
Handler = Callable[["Request"], Awaitable["Response"]]


@dataclass
class Console:
    """What the handlers share: the facade, its reads, the live hub, the access rules."""

    url: str
    swarm_name: str
    access: Access
    swarm: Swarm | None = None
    reads: Reads | None = None
    hub: LiveHub | None = None
    env: Environment | None = None

    @property
    def s(self) -> Swarm:
        assert self.swarm is not None, "the console is not connected"
        return self.swarm

    @property
    def r(self) -> Reads:
        assert self.reads is not None, "the console is not connected"
        return self.reads


# ------------------------------------------------------------------ formatting


def _parse_ts(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        stamp = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def fmt_age(value: Any) -> str:
    stamp = _parse_ts(value)
    if stamp is None:
        return ""
    return fmt_duration((datetime.now(UTC) - stamp).total_seconds())


def fmt_duration(seconds: Any) -> str:
    if seconds is None:
        return ""
    s = float(seconds)
    if s < 0:
        return "0s"
    if s < 60:
        return f"{s:.1f}s" if s < 10 else f"{s:.0f}s"
    if s < 3600:
        return f"{s / 60:.0f}m"
    if s < 86400:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def fmt_time(value: Any) -> str:
    stamp = _parse_ts(value)
    return "" if stamp is None else stamp.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def fmt_ms(value: Any) -> str:
    if not value:
        return ""
    return datetime.fromtimestamp(int(value) / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def fmt_pct(value: Any) -> str:
    return "" if value is None else f"{float(value) * 100:.1f}%"


def _environment() -> Environment:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(age=fmt_age, dur=fmt_duration, ts=fmt_time, ms=fmt_ms, pct=fmt_pct,
                       tojson_compact=lambda v: json.dumps(v, default=str))
    return env


# ------------------------------------------------------------------ errors

_STATUS: list[tuple[type[CflowError], int]] = [
    (NotFound, 404), (QueryRejected, 400), (InvalidInput, 400), (InvalidState, 409),
    (ConflictError, 409), (LimitExceeded, 503), (Unavailable, 503),
]


def status_for(err: CflowError) -> int:
    for kind, code in _STATUS:
        if isinstance(err, kind):
            return code
    return 500


def as_cflow_error(exc: Exception) -> CflowError:
    """Any exception a handler let through, as the error the page shows: a lost or slow
    NATS (raw client errors, sockets, timeouts) is Unavailable; anything else is an
    internal error whose one line names its type (the log has the same line)."""
    import nats.errors

    if isinstance(exc, CflowError):
        return exc
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, nats.errors.Error | OSError | TimeoutError):
        return Unavailable(f"NATS unavailable ({type(exc).__name__}: {text}); "
                           "the page retries")
    return CflowError(f"internal error ({type(exc).__name__}: {text}); the console's "
                      "log has the same line")


def wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") and request.headers.get("hx-request") != "true"


# ------------------------------------------------------------------ NATS users


async def nats_user_accepted(url: str, swarm: str, user: str, password: str) -> None:
    """Return if the NATS server at ``url`` requires users and accepts this user of ``swarm``.

    Raises:
        InvalidInput: no user or password, a user of another swarm, a server that
            accepts anyone (then only the console's token counts), or NATS refused it.
    """
    from cflow.creds import with_userinfo
    from cflow.streams.client import split_urls

    if not user or not password:
        raise InvalidInput("log in with a NATS user and its password")
    if not user.startswith(f"{swarm}."):
        raise InvalidInput(f"{user} is not a user of swarm {swarm} (its users are named "
                           f"{swarm}.AGENT by `cfctl creds create`)")
    bare = [_without_userinfo(u) for u in split_urls(url)]
    if await _connects(bare):
        raise InvalidInput("this NATS server lets anyone in (no users): log in with the "
                           "token `cfctl ui` printed")
    if not await _connects([with_userinfo(u, user, password) for u in bare]):
        raise InvalidInput(f"NATS refused user {user} (wrong password, or revoked)")


def _without_userinfo(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


async def _connects(servers: list[str]) -> bool:
    import nats
    import nats.errors

    async def quiet(*_: Any) -> None:
        return None

    try:
        nc = await nats.connect(servers=servers, connect_timeout=2, allow_reconnect=False,
                                max_reconnect_attempts=0, error_cb=quiet, name="cflow-ui-login")
    except (nats.errors.Error, OSError, TimeoutError):
        return False
    await nc.close()
    return True


# ------------------------------------------------------------------ the app


def create_app(console: Console) -> Starlette:
    """The ASGI app over a connected console (:func:`cflow.ui.server.serve` connects it)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    console.env = _environment()

    async def render(request: Request, template: str, status: int = 200, **ctx: Any
                     ) -> Response:
        assert console.env is not None
        if "control" not in ctx and console.swarm is not None:
            ctx["control"] = await console.swarm.control.state()  # the banner, on every page
        page = console.env.get_template(template).render(
            request=request, swarm=console.swarm_name,
            operator=console.access.identity(request.headers, request.cookies),
            can_write=console.access.presented(request.headers, request.cookies) is not None,
            path=request.url.path, statuses=STATUS_ORDER, **ctx)
        return HTMLResponse(page, status_code=status)

    async def error_response(request: Request, err: CflowError) -> Response:
        code = status_for(err)
        if wants_json(request):
            return JSONResponse({"ok": False, "code": err.code, "error": str(err)},
                                status_code=code)
        # control=None: the banner's read would fail the same way the page did.
        if request.headers.get("hx-request") == "true":
            return await render(request, "flash.html", code, ok=False, message=str(err),
                                control=None)
        return await render(request, "error.html", code, message=str(err), code=code,
                            control=None)

    class Guard:
        """Who may read, from which Host, and the security headers on every answer."""

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            from starlette.requests import Request

            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            request = Request(scope)
            path = request.url.path
            refusal = None
            if not console.access.host_allowed(request.headers.get("host", "")):
                refusal = PlainTextResponse(
                    "this console answers only on a loopback address (Host header "
                    f"{request.headers.get('host', '')!r}); serve it with --auth to "
                    "reach it by another name", status_code=421)
            elif (path not in ("/login", "/healthz") and not path.startswith("/static/")
                    and not console.access.may_read(request.headers, request.cookies)):
                refusal = PlainTextResponse(
                    "this console needs its token: open the /login#token=... link "
                    "`cfctl ui` printed", status_code=401)

            async def send_with_headers(message: Any) -> None:
                if message["type"] == "http.response.start":
                    message.setdefault("headers", [])
                    message["headers"] = list(message["headers"]) + SECURITY_HEADERS
                await send(message)

            if refusal is not None:
                await refusal(scope, receive, send_with_headers)
                return
            started = False

            async def send_tracked(message: Any) -> None:
                nonlocal started
                started = started or message["type"] == "http.response.start"
                await send_with_headers(message)

            try:
                await self.app(scope, receive, send_tracked)
            except Exception as exc:  # the catch-all: one log line, never a traceback
                err = as_cflow_error(exc)
                log.warning("%s %s: %s", request.method, path, err)
                if started:  # a stream already under way: the client sees it end
                    return
                await (await error_response(request, err))(scope, receive, send_with_headers)

    def secure(request: Request) -> bool:
        return console.access.secure_cookies or request.url.scheme == "https"

    def handles(fn: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except CflowError as err:
                return await error_response(request, err)
            except Exception as exc:
                wrapped_err = as_cflow_error(exc)
                log.warning("%s %s: %s", request.method, request.url.path, wrapped_err)
                return await error_response(request, wrapped_err)
        wrapped.__name__ = fn.__name__
        return wrapped

    def seq_of(request: Request) -> int | None:
        raw = request.query_params.get("seq", "")
        return int(raw) if raw.isdigit() else None

    # -------------------------------------------------------------- reads

    async def check_nats_user(url: str, swarm: str, user: str, password: str) -> None:
        await nats_user_accepted(url, swarm, user, password)

    async def index(request: Request) -> Response:
        from starlette.responses import RedirectResponse

        return RedirectResponse("/board", status_code=303)

    async def healthz(request: Request) -> Response:
        hub = console.hub
        return JSONResponse({"ok": True, "swarm": console.swarm_name,
                             "seq": hub.seq if hub else 0,
                             "live_pages": hub.subscribers if hub else 0})

    def _next(request: Request, given: str | None) -> str:
        target = given or "/board"
        if not target.startswith("/") or target.startswith(("//", "/\\")):
            target = "/board"  # only this console's own pages, never another site
        return target

    async def login(request: Request) -> Response:
        if request.query_params.get("token"):  # a token in a URL ends up in logs and history
            return await render(request, "login.html", 400,
                                message="the token is posted, never sent in the URL: open the "
                                "/login#token=... link `cfctl ui` printed, or paste it below")
        return await render(request, "login.html", next=request.query_params.get("next"))

    def logged_in(request: Request, actor_user: str | None, next_page: str) -> Response:
        from starlette.responses import RedirectResponse

        from cflow.ui.auth import SESSION_TTL_S

        response = RedirectResponse(_next(request, next_page), status_code=303)
        response.set_cookie(SESSION_COOKIE, console.access.open_session(actor_user),
                            max_age=SESSION_TTL_S, httponly=True, samesite="strict",
                            secure=secure(request))
        return response

    async def login_post(request: Request) -> Response:
        """Log in with the console's token (posted by the /login#token=... page), or with a
        NATS user of this swarm (the server itself checks the password)."""
        f = await request.form()
        next_page = str(f.get("next") or "")
        if "token" in f:
            if not console.access.token_matches(str(f.get("token") or "")):
                return await render(request, "login.html", 401,
                                    message="wrong token: use the link `cfctl ui` printed")
            return logged_in(request, None, next_page)
        user, password = str(f.get("user") or "").strip(), str(f.get("password") or "")
        try:
            await check_nats_user(console.url, console.swarm_name, user, password)
        except CflowError as err:
            return await render(request, "login.html", 401, message=str(err))
        return logged_in(request, user, next_page)

    async def logout(request: Request) -> Response:
        from starlette.responses import RedirectResponse

        console.access.sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
        response = RedirectResponse("/board", status_code=303)
        response.delete_cookie(COOKIE)
        response.delete_cookie(SESSION_COOKIE)
        return response

    async def _board(request: Request) -> tuple[Any, Any]:
        f = BoardFilter.parse(request.query_params)
        board = await console.r.board(f, seq=seq_of(request))
        # From the projection: the console folds no board of its own.
        gates = [] if f.page > 1 else await console.r.gates(seq=seq_of(request))
        return board, gates

    async def board_page(request: Request) -> Response:
        board, gates = await _board(request)
        return await render(request, "board.html", board=board, gates=gates,
                      control=await console.s.control.state())

    async def board_rows(request: Request) -> Response:
        board, gates = await _board(request)
        return await render(request, "board_rows.html", board=board, gates=gates)

    async def api_tasks(request: Request) -> Response:
        board, _ = await _board(request)
        return JSONResponse(board.to_dict() | {"elapsed_ms": board.elapsed_ms},
                            headers={"cache-control": "no-store"})

    async def _task(request: Request) -> dict[str, Any]:
        task_id = request.path_params["task_id"]
        task = await console.r.task(task_id, seq=seq_of(request))
        if task is None:
            raise NotFound("task", task_id)
        return task

    async def task_page(request: Request) -> Response:
        return await render(request, "task.html", task=await _task(request))

    async def task_body(request: Request) -> Response:
        return await render(request, "task_body.html", task=await _task(request))

    async def api_task(request: Request) -> Response:
        return JSONResponse(json.loads(json.dumps(await _task(request), default=str)))

    async def _graph(request: Request) -> dict[str, Any]:
        from cflow.ui.graph import layout

        parent = request.query_params.get("parent", "").strip()
        data = await console.r.graph(parent, seq=seq_of(request))
        placed = layout([(n["task_id"], n["title"] or n["task_id"], n["status"])
                         for n in data["nodes"]],
                        [(t, d) for t, d in data["edges"]], data["critical"])
        return {**data, "layout": placed, "parent": parent}

    async def graph_page(request: Request) -> Response:
        return await render(request, "graph.html", graph=await _graph(request))

    async def graph_body(request: Request) -> Response:
        return await render(request, "graph_body.html", graph=await _graph(request))

    async def api_graph(request: Request) -> Response:
        g = await _graph(request)
        lay = g.pop("layout")
        return JSONResponse({**g, "width": lay.width, "height": lay.height,
                             "positions": {n.id: [n.x, n.y] for n in lay.nodes}})

    async def _permissions() -> list[dict[str, Any]]:
        # The same code as `cfctl permissions list`: relayed prompts nobody answered yet.
        from cflow.permissions import pending_permissions

        found: list[dict[str, Any]] = await pending_permissions(console.s)
        return found

    async def agents_page(request: Request) -> Response:
        template = "agents_body.html" if request.query_params.get("part") else "agents.html"
        return await render(request, template, agents=await console.r.agents(seq=seq_of(request)),
                            permissions=await _permissions())

    async def api_permissions(request: Request) -> Response:
        return JSONResponse(await _permissions(), headers={"cache-control": "no-store"})

    async def api_agents(request: Request) -> Response:
        return JSONResponse(json.loads(json.dumps(await console.r.agents(), default=str)))

    async def analytics_page(request: Request) -> Response:
        template = "analytics_body.html" if request.query_params.get("part") else "analytics.html"
        return await render(request, template, a=await console.r.analytics(seq=seq_of(request)))

    async def api_analytics(request: Request) -> Response:
        return JSONResponse(json.loads(json.dumps(await console.r.analytics(), default=str)))

    async def _memory(request: Request) -> dict[str, Any]:
        q = request.query_params.get("q", "").strip()
        namespace = request.query_params.get("namespace", "").strip()
        page = BoardFilter.parse({"page": request.query_params.get("page")}).page
        data = await console.r.memory(namespace, page)
        data.update(q=q, namespace=namespace, page=page, hits=[])
        if q:
            hits = await console.s.memory.search(q, namespace=namespace or None, limit=20)
            data["hits"] = [h.to_dict() for h in hits]
        return data

    async def memory_page(request: Request) -> Response:
        return await render(request, "memory.html", m=await _memory(request))

    async def api_memory(request: Request) -> Response:
        return JSONResponse(json.loads(json.dumps(await _memory(request), default=str)))

    async def messages_page(request: Request) -> Response:
        agent = request.query_params.get("agent", "").strip()
        return await render(request, "messages.html", m=await console.r.messages(agent),
                            agent=agent)

    async def api_messages(request: Request) -> Response:
        agent = request.query_params.get("agent", "").strip()
        return JSONResponse(json.loads(json.dumps(await console.r.messages(agent), default=str)))

    async def banner(request: Request) -> Response:
        return await render(request, "banner.html", control=await console.s.control.state())

    async def api_control(request: Request) -> Response:
        out = await console.s.control.status()
        return JSONResponse(json.loads(json.dumps(out, default=str)))

    async def events(request: Request) -> Response:
        from starlette.responses import StreamingResponse

        hub = console.hub
        assert hub is not None

        async def stream() -> AsyncIterator[str]:
            async with hub.subscribe() as queue:
                yield f"event: hello\ndata: {json.dumps({'seq': hub.seq})}\n\n"
                while True:
                    try:
                        update = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                    except TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    body = {"seq": update.seq, "control": update.control,
                            "types": sorted(update.types)}
                    yield f"event: update\ndata: {json.dumps(body)}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store",
                                          "x-accel-buffering": "no"})

    # -------------------------------------------------------------- writes

    async def form(request: Request) -> dict[str, str]:
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                raw = await request.json()
            except ValueError:
                raise InvalidInput("the request body is not JSON") from None
            if not isinstance(raw, dict):
                raise InvalidInput("the request body must be a JSON object")
            return {str(k): str(v) for k, v in raw.items() if v is not None}
        data = await request.form()
        return {k: str(v) for k, v in data.items()}

    def writes(fn: Callable[[Request, dict[str, str]], Awaitable[tuple[str, dict[str, Any]]]]
               ) -> Handler:
        async def wrapped(request: Request) -> Response:
            refusal = console.access.write_refusal(request.headers, request.cookies)
            if refusal is not None:
                if wants_json(request):
                    return JSONResponse({"ok": False, "code": "UNAUTHORIZED",
                                         "error": refusal}, status_code=401)
                return await render(request, "flash.html", 401, ok=False, message=refusal)
            message, data = await fn(request, await form(request))
            body = {"ok": True, "actor": actor_of(request), "message": message, **data}
            if wants_json(request):
                return JSONResponse(json.loads(json.dumps(body, default=str)))
            return await render(request, "flash.html", ok=True, message=message)
        wrapped.__name__ = fn.__name__
        return handles(wrapped)

    def actor_of(request: Request) -> str:
        return console.access.identity(request.headers, request.cookies)

    async def swarm_pause(request: Request, f: dict[str, str]) -> tuple[str, dict[str, Any]]:
        who = actor_of(request)
        out = await console.s.control.pause(reason=f.get("reason", ""), actor=who)
        return f"swarm paused by {who}", out

    async def swarm_resume(request: Request, f: dict[str, str]) -> tuple[str, dict[str, Any]]:
        who = actor_of(request)
        out = await console.s.control.resume(reason=f.get("reason", ""), actor=who)
        return f"swarm resumed by {who}", out

    async def swarm_stop(request: Request, f: dict[str, str]) -> tuple[str, dict[str, Any]]:
        who = actor_of(request)
        now = f.get("now", "").lower() in ("1", "true", "on", "yes")
        out = await console.s.control.stop(reason=f.get("reason", ""), now=now, actor=who)
        extra = f", {len(out['cancelled'])} claims cancelled" if now else ""
        return f"swarm stopped by {who}{extra}", out

    async def gate_decide(request: Request, f: dict[str, str]) -> tuple[str, dict[str, Any]]:
        who = actor_of(request)
        task_id, verb = request.path_params["task_id"], request.path_params["verb"]
        control = console.s.control
        if verb == "approve":
            state = await control.approve(task_id, f.get("note", ""), actor=who)
        elif verb == "reject":
            state = await control.reject(task_id, f.get("note", ""), actor=who)
        else:
            raise NotFound("gate action", verb)
        return f"gate {task_id} {verb}d by {who}", {"task": state.to_dict()}

    async def task_cancel(request: Request, f: dict[str, str]) -> tuple[str, dict[str, Any]]:
        who = actor_of(request)
        task_id = request.path_params["task_id"]
        reason = f.get("reason") or f"cancelled from the console by {who}"
        state = await console.s.tasks.cancel(task_id, reason, actor=who)
        return f"task {task_id} cancelled by {who}", {"task": state.to_dict()}

    async def task_requeue(request: Request, f: dict[str, str]) -> tuple[str, dict[str, Any]]:
        who = actor_of(request)
        from cflow.ui.operate import requeue

        task_id = request.path_params["task_id"]
        new = await requeue(console.s, task_id, by=who)
        return (f"task {task_id} requeued by {who} as {new.task_id}",
                {"task": new.to_dict(), "requeued_from": task_id})

    async def permission_answer(request: Request, f: dict[str, str]
                                ) -> tuple[str, dict[str, Any]]:
        from cflow.permissions import answer_permission

        who = actor_of(request)
        request_id, verb = request.path_params["request_id"], request.path_params["verb"]
        if verb not in ("allow", "deny"):
            raise NotFound("permission answer", verb)
        out = await answer_permission(console.s, request_id, verb, actor=who)
        return f"{verb} sent to {out['agent']} for {request_id} by {who}", out

    get = ["GET"]
    post = ["POST"]
    routes = [
        Route("/", index, methods=get),
        Route("/healthz", healthz, methods=get),
        Route("/favicon.ico", lambda request: Response(status_code=204), methods=get),
        Route("/login", login, methods=get),
        Route("/login", login_post, methods=post),
        Route("/logout", logout, methods=post),
        Route("/board", handles(board_page), methods=get),
        Route("/board/rows", handles(board_rows), methods=get),
        Route("/tasks/{task_id}", handles(task_page), methods=get),
        Route("/tasks/{task_id}/body", handles(task_body), methods=get),
        Route("/graph", handles(graph_page), methods=get),
        Route("/graph/body", handles(graph_body), methods=get),
        Route("/agents", handles(agents_page), methods=get),
        Route("/analytics", handles(analytics_page), methods=get),
        Route("/memory", handles(memory_page), methods=get),
        Route("/messages", handles(messages_page), methods=get),
        Route("/banner", handles(banner), methods=get),
        Route("/events", events, methods=get),
        Route("/api/tasks", handles(api_tasks), methods=get),
        Route("/api/tasks/{task_id}", handles(api_task), methods=get),
        Route("/api/graph", handles(api_graph), methods=get),
        Route("/api/agents", handles(api_agents), methods=get),
        Route("/api/analytics", handles(api_analytics), methods=get),
        Route("/api/memory", handles(api_memory), methods=get),
        Route("/api/messages", handles(api_messages), methods=get),
        Route("/api/control", handles(api_control), methods=get),
        Route("/api/swarm/pause", writes(swarm_pause), methods=post),
        Route("/api/swarm/resume", writes(swarm_resume), methods=post),
        Route("/api/swarm/stop", writes(swarm_stop), methods=post),
        Route("/api/gates/{task_id}/{verb}", writes(gate_decide), methods=post),
        Route("/api/tasks/{task_id}/cancel", writes(task_cancel), methods=post),
        Route("/api/tasks/{task_id}/requeue", writes(task_requeue), methods=post),
        Route("/api/permissions", handles(api_permissions), methods=get),
        Route("/api/permissions/{request_id}/{verb}", writes(permission_answer), methods=post),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Guard)])
    app.state.console = console
    return app


__all__ = ["Console", "create_app", "fmt_age", "fmt_duration", "status_for"]
