"""Operating a swarm: `cfctl swarm pause|resume|stop`, `gate`, `budget`, `breaker`,
`metrics`, and the live view (`cfctl top`, `cfctl status --watch`)."""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import typer

from cflow.cli.app import EXIT_USAGE, app, emit, exit_soon, fail, interrupted, plural, run, state

if TYPE_CHECKING:
    from cflow.control import ControlView
    from cflow.events import Event
    from cflow.metrics import MetricsFold
    from cflow.swarm import Swarm

swarm_app = typer.Typer(help="Pause, resume or stop the whole swarm (or one parent task).",
                        no_args_is_help=True)
gate_app = typer.Typer(help="Human gates: approve or reject a task of kind gate.",
                       no_args_is_help=True)
budget_app = typer.Typer(help="Budgets of the swarm or of one parent task.", no_args_is_help=True)
breaker_app = typer.Typer(help="Circuit breakers per capability.", no_args_is_help=True)
app.add_typer(swarm_app, name="swarm")
app.add_typer(gate_app, name="gate")
app.add_typer(budget_app, name="budget")
app.add_typer(breaker_app, name="breaker")

_SCOPE = typer.Option("swarm", "--scope", help="'swarm' or a parent task id (its subtree).")
_REASON = typer.Option("", "--reason", "-r", help="Why (recorded in the event).")
_AS = typer.Option(None, "--as", help="Actor recorded on the event (default: $CFLOW_AGENT "
                   "or your user name).", envvar="CFLOW_ACTOR")


def human_actor(explicit: str | None = None) -> str:
    from cflow.cli.app import identity

    return identity(explicit)


async def _with_swarm(ctx: typer.Context, actor: str, fn: Any) -> Any:
    from cflow.swarm import Swarm

    c = state(ctx)
    async with Swarm.connect(c.url, swarm=c.swarm, agent=actor) as swarm:
        return await fn(swarm)


async def _scope_id(swarm: Swarm, scope: str) -> str:
    """``swarm``, or the whole id of the parent task ``scope`` names (a unique prefix will do)."""
    from cflow.cli.task_cmds import resolve

    return scope if scope == "swarm" else await resolve(swarm, scope)


async def _gate_id(swarm: Swarm, ref: str) -> str:
    from cflow.cli.task_cmds import resolve

    return await resolve(swarm, ref, kind="gate")


# ------------------------------------------------------------------- swarm


@swarm_app.command("pause")
def pause_cmd(ctx: typer.Context, scope: str = _SCOPE, reason: str = _REASON,
              actor: str | None = _AS) -> None:
    """Stop all claiming: agents see it at their next claim and take no new work."""
    who = human_actor(actor)

    async def body(s: Swarm) -> Any:
        nonlocal scope
        scope = await _scope_id(s, scope)
        return await s.control.pause(scope, reason)

    out = run(ctx, lambda: _with_swarm(ctx, who, body))
    emit(ctx, out, f"{_where(scope)} paused by {who}" + (f": {reason}" if reason else ""))


@swarm_app.command("resume")
def resume_cmd(ctx: typer.Context, scope: str = _SCOPE, reason: str = _REASON,
               actor: str | None = _AS) -> None:
    """Let claiming start again (after pause, stop, or an exceeded budget)."""
    who = human_actor(actor)

    async def body(s: Swarm) -> Any:
        nonlocal scope
        scope = await _scope_id(s, scope)
        return await s.control.resume(scope, reason)

    out = run(ctx, lambda: _with_swarm(ctx, who, body))
    emit(ctx, out, f"{_where(scope)} resumed by {who}")


@swarm_app.command("stop")
def stop_cmd(ctx: typer.Context, now: bool = typer.Option(
        False, "--now", help="Also cancel every claimed task: holders stop at their next "
                             "heartbeat."),
             reason: str = _REASON, actor: str | None = _AS) -> None:
    """Emergency stop: no more claims, workers exit; --now cancels running work too."""
    who = human_actor(actor)
    out = run(ctx, lambda: _with_swarm(ctx, who,
                                       lambda s: s.control.stop(reason, now=now)))
    extra = (f", {plural(len(out['cancelled']), 'claimed task')} cancelled" if now else "")
    emit(ctx, out, f"swarm STOPPED by {who}{extra}" + (f": {reason}" if reason else "")
         + "\n(resume with `cfctl swarm resume`)")


@swarm_app.command("state")
def state_cmd(ctx: typer.Context) -> None:
    """Mode, paused scopes, budgets, open breakers and pending gates."""
    out = run(ctx, lambda: _with_swarm(ctx, "cfctl-control", lambda s: s.control.status()))
    emit(ctx, out, lambda d: typer.echo("\n".join(control_lines(d))))


def _lines(lines: list[str], none: str) -> None:
    """The result lines on stdout; when there are none, saying so on stderr."""
    if lines:
        typer.echo("\n".join(lines))
    else:
        typer.echo(none, err=True)


def _duration(s: float) -> str:
    """``3600`` -> ``1 h``, ``600`` -> ``10 min``, ``90`` -> ``90 s``."""
    if s >= 3600 and s % 3600 == 0:
        return f"{s / 3600:g} h"
    if s >= 60 and s % 60 == 0:
        return f"{s / 60:g} min"
    return f"{s:g} s"


def budget_words(limits: dict[str, float]) -> str:
    """A scope's budget limits in words (``at most 200 claims per 1 h, $20.00 of spending``)."""
    from cflow.control import DEFAULT_WINDOW_S

    parts = []
    if "max_children" in limits:
        parts.append(f"{plural(int(limits['max_children']), 'task')} under one parent")
    if "max_depth" in limits:
        parts.append(f"sub-tasks {plural(int(limits['max_depth']), 'level')} deep")
    if "max_attempts" in limits:
        window = limits.get("window_s", DEFAULT_WINDOW_S)
        parts.append(f"{plural(int(limits['max_attempts']), 'claim')} per {_duration(window)}")
    if "max_spend_usd" in limits:
        parts.append(f"${limits['max_spend_usd']:,.2f} of spending")
    words = [f"at most {', '.join(parts)}"] if parts else []
    if "window_s" in limits and "max_attempts" not in limits:
        words.append(f"claims counted per {_duration(limits['window_s'])}")
    breaker = []
    if "breaker_failures" in limits:
        failures = plural(int(limits["breaker_failures"]), "failure")
        breaker.append(f"opens after {failures} in a row")
    if "breaker_window_s" in limits:
        breaker.append(f"counts failures at most {_duration(limits['breaker_window_s'])} "
                       "apart")
    if "breaker_cooldown_s" in limits:
        breaker.append(f"stays open {_duration(limits['breaker_cooldown_s'])}")
    if breaker:
        words.append(f"a capability's breaker {', '.join(breaker)}")
    return "; ".join(words) or "no limits"


def _budget_where(scope: str, swarm: str | None = None) -> str:
    if scope == "swarm":
        return f"swarm {swarm}" if swarm else "the swarm"
    return f"task {scope}"


def _where(scope: str) -> str:
    return "swarm" if scope == "swarm" else f"scope {scope}"


def control_lines(d: dict[str, Any]) -> list[str]:
    """Human lines for a control section (also used by `cfctl status`)."""
    if "error" in d:
        return [f"control  {d['error']}"]
    lines = []
    mode = d.get("mode", "running")
    if mode != "running":
        who = f" by {d['actor']}" if d.get("actor") else ""
        why = f": {d['reason']}" if d.get("reason") else ""
        lines.append(f"*** SWARM {mode.upper()}{who}{why} ***")
    else:
        lines.append("control  running")
    for scope in d.get("paused_scopes", []):
        lines.append(f"  scope {scope['scope']} {scope['mode']}: {scope.get('reason') or '-'}")
    for b in d.get("open_breakers", []):
        lines.append(f"  breaker OPEN for capability {b['capability']}: {b['reason']}")
    for scope, limits in sorted(d.get("budgets", {}).items()):
        lines.append(f"  budget of {_budget_where(scope)}: {budget_words(limits)}")
    gates = d.get("pending_gates", [])
    if gates:
        lines.append(f"pending gates ({len(gates)}):")
        for g in gates:
            note = " (waiting for dependencies)" if g.get("waiting_for_deps") else ""
            lines.append(f"  {g['task_id']}  {g['title']}{note}")
    return lines


# -------------------------------------------------------------------- gates


@gate_app.command("approve")
def approve_cmd(ctx: typer.Context, task_id: str = typer.Argument(
                    ..., help="The gate (a unique id prefix will do)."),
                note: str = typer.Option("", "--note", "-n", help="Recorded as the result."),
                actor: str | None = _AS) -> None:
    """Approve a gate: its dependents become ready."""
    who = human_actor(actor)

    async def body(s: Swarm) -> Any:
        nonlocal task_id
        task_id = await _gate_id(s, task_id)
        return await s.control.approve(task_id, note)

    out = run(ctx, lambda: _with_swarm(ctx, who, body))
    emit(ctx, out.to_dict(), f"gate {task_id} approved by {who}")


@gate_app.command("reject")
def reject_cmd(ctx: typer.Context, task_id: str = typer.Argument(
                    ..., help="The gate (a unique id prefix will do)."),
               note: str = typer.Option("", "--note", "-n", help="Why (dependents are "
                                        "blocked with it)."),
               actor: str | None = _AS) -> None:
    """Reject a gate: its dependents are blocked with the reason."""
    who = human_actor(actor)

    async def body(s: Swarm) -> Any:
        nonlocal task_id
        task_id = await _gate_id(s, task_id)
        return await s.control.reject(task_id, note)

    out = run(ctx, lambda: _with_swarm(ctx, who, body))
    emit(ctx, out.to_dict(), f"gate {task_id} rejected by {who}: {out.error}")


@gate_app.command("list")
def gates_cmd(ctx: typer.Context) -> None:
    """Gates waiting for a human."""
    out = run(ctx, lambda: _with_swarm(ctx, "cfctl-control",
                                       lambda s: s.control.pending_gates()))
    emit(ctx, out, lambda gates: _lines([f"{g['task_id']}  {g['status']:<8} {g['title']}"
                                         for g in gates], "no pending gates"))


# ------------------------------------------------------------------ budgets


@budget_app.command("set")
def budget_set_cmd(
    ctx: typer.Context,
    scope: str = _SCOPE,
    max_children: int | None = typer.Option(None, "--max-children",
                                            help="Tasks created under one parent."),
    max_depth: int | None = typer.Option(None, "--max-depth",
                                         help="Depth of sub-task creation below the scope."),
    max_attempts: int | None = typer.Option(None, "--max-attempts",
                                            help="Claims in total per window."),
    window: float | None = typer.Option(None, "--window", help="Window of --max-attempts, s."),
    max_spend: float | None = typer.Option(None, "--max-spend",
                                           help="Reported cost of tasks, USD."),
    breaker_failures: int | None = typer.Option(
        None, "--breaker-failures", help="Consecutive failures of a capability that open "
                                         "its breaker (swarm scope)."),
    breaker_window: float | None = typer.Option(None, "--breaker-window",
                                                help="Failures further apart do not add up, s."),
    breaker_cooldown: float | None = typer.Option(None, "--breaker-cooldown",
                                                  help="How long a breaker stays open, s."),
    replace: bool = typer.Option(False, "--replace", help="Drop limits not given here."),
    actor: str | None = _AS,
) -> None:
    """Set budgets; exceeding one pauses the scope with a BudgetExceeded event."""
    given = {
        "max_children": max_children, "max_depth": max_depth, "max_attempts": max_attempts,
        "window_s": window, "max_spend_usd": max_spend, "breaker_failures": breaker_failures,
        "breaker_window_s": breaker_window, "breaker_cooldown_s": breaker_cooldown,
    }
    limits = {k: float(v) for k, v in given.items() if v is not None}
    if not limits and not replace:
        fail("give at least one limit (see --help)", EXIT_USAGE)
    who = human_actor(actor)

    async def body(s: Swarm) -> Any:
        nonlocal scope
        scope = await _scope_id(s, scope)
        return await s.control.set_budget(scope, limits, replace_all=replace)

    out = run(ctx, lambda: _with_swarm(ctx, who, body))
    emit(ctx, out, f"budget of {_budget_where(scope, state(ctx).swarm)}: "
                   f"{budget_words(out['limits'])}")


@budget_app.command("show")
def budget_show_cmd(ctx: typer.Context) -> None:
    """Every budget set in the swarm."""
    out = run(ctx, lambda: _with_swarm(ctx, "cfctl-control", lambda s: s.control.budgets()))
    swarm = state(ctx).swarm
    emit(ctx, out, lambda d: _lines([
        f"budget of {_budget_where(scope, swarm)}: {budget_words(limits)}"
        for scope, limits in sorted(d.items())], "no budgets"))


@breaker_app.command("list")
def breaker_list_cmd(ctx: typer.Context) -> None:
    """Circuit breakers (open and recently closed)."""
    async def body(s: Swarm) -> list[dict[str, Any]]:
        import msgspec

        view = await s.control.ensure()
        return [msgspec.to_builtins(b) for b in view.breakers.values()]

    out = run(ctx, lambda: _with_swarm(ctx, "cfctl-control", body))
    emit(ctx, out, lambda rows: _lines([breaker_line(b) for b in rows], "no breakers"))


def breaker_line(b: dict[str, Any]) -> str:
    """``python: open until 2026-12-03 06:05:00 UTC: 5 consecutive failures``."""
    import datetime

    line = f"{b['capability']}: {b['state']}"
    if b["state"] == "open" and b["until_ms"]:
        until = datetime.datetime.fromtimestamp(b["until_ms"] / 1000, datetime.UTC)
        line += f" until {until:%Y-%m-%d %H:%M:%S} UTC"
    if b["reason"]:
        return f"{line}: {b['reason']}"
    return line + (f" after {plural(b['failures'], 'failure')}" if b["failures"] else "")


@breaker_app.command("close")
def breaker_close_cmd(ctx: typer.Context, capability: str = typer.Argument(...),
                      actor: str | None = _AS) -> None:
    """Close an open breaker before its cool-down ends."""
    who = human_actor(actor)
    out = run(ctx, lambda: _with_swarm(
        ctx, who, lambda s: s.control.close_breaker(capability, actor=who)))
    emit(ctx, {"capability": capability, "closed": out},
         f"breaker {capability} closed" if out else f"breaker {capability} was not open")


# ------------------------------------------------------------------ metrics


@app.command("metrics")
def metrics_cmd(
    ctx: typer.Context,
    serve: bool = typer.Option(False, "--serve", help="Keep serving /metrics until stopped."),
    port: int = typer.Option(9464, "--port", help="Port for --serve (loopback)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address for --serve."),
) -> None:
    """Print the swarm's Prometheus metrics once (or serve them with --serve)."""
    from cflow.metrics import MetricsCollector, parse_text, run_metrics_server

    c = state(ctx)

    async def once(s: Swarm) -> str:
        collector = MetricsCollector(s)
        await collector.catch_up()
        return await collector.collect()

    async def forever(s: Swarm) -> None:
        def ready(bound: int) -> None:
            typer.echo(f"serving metrics of swarm {c.swarm} at http://{host}:{bound}/metrics",
                       err=True)

        await run_metrics_server(s, port, host=host, ready=ready)

    if serve:
        run(ctx, lambda: _with_swarm(ctx, "cfctl-metrics", forever))
        return
    text = run(ctx, lambda: _with_swarm(ctx, "cfctl-metrics", once))
    if c.json:
        emit(ctx, [{"name": s.name, "labels": s.labels, "value": s.value}
                   for s in parse_text(text)])
    else:
        sys.stdout.write(text)


# ---------------------------------------------------------------- live view


@dataclass
class LiveState:
    """What the live view shows, updated event by event (no re-querying)."""

    swarm: str
    fold: MetricsFold
    recent: deque[tuple[int, str, str, str]] = field(default_factory=lambda: deque(maxlen=8))
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    control: dict[str, Any] = field(default_factory=dict)
    stream_last_seq: int = 0
    projected_seq: int | None = None
    server: str = ""
    streams: list[dict[str, Any]] = field(default_factory=list)
    connected: bool = True
    last_contact_ms: int = 0  # when the server last answered (wall clock)

    def contact(self, connected: bool, now_ms: int) -> None:
        self.connected = connected
        if connected:
            self.last_contact_ms = now_ms

    def absorb(self, seq: int, event: Event) -> None:
        from cflow import events as ev
        from cflow.tasks import event_ms

        before = self.fold.board.get(event.entity_id)
        self.fold.apply(seq, event)
        self.stream_last_seq = max(self.stream_last_seq, seq)
        at = event_ms(event)
        title = before.title if before is not None else event.entity_id
        match event.data:
            case ev.TaskCompleted():
                self.recent.appendleft((at, "completed", title, event.actor))
            case ev.TaskFailed(error=error):
                self.recent.appendleft((at, "failed", title, error[:60]))
            case ev.TaskLeaseExpired(owner=owner):
                self.recent.appendleft((at, "reclaimed", title, f"from {owner}"))
            case ev.AgentRegistered():
                self.agents[event.entity_id] = {"status": "online", "task": None, "seen": at}
            case ev.AgentStatusChanged(status=status, task_id=task_id):
                info = self.agents.setdefault(event.entity_id, {})
                info.update(status=status, task=task_id, seen=at)
            case ev.AgentDeregistered():
                self.agents.setdefault(event.entity_id, {}).update(status="offline", task=None,
                                                                   seen=at)
            case _:
                pass

    def snapshot(self) -> dict[str, Any]:
        from cflow.streams.client import wall_ms

        fold = self.fold
        gates = [{"task_id": s.task_id, "title": s.title}
                 for s in fold.board.tasks.values() if s.kind == "gate" and s.status == "ready"]
        queue: dict[str, dict[str, int]] = {}
        for (status, cap), n in fold.by_capability().items():
            queue.setdefault(cap or "-", {})[status] = n
        applied = self.projected_seq if self.projected_seq is not None else fold.last_seq
        counts = dict(fold.board.counts())
        if gates:  # a gate waits for a person: it is not work anyone can claim
            counts["ready"] = counts.get("ready", 0) - len(gates)
            counts["gates"] = len(gates)
        now = wall_ms()
        return {
            "connected": self.connected,
            "stale_s": (round((now - self.last_contact_ms) / 1000, 1)
                        if self.last_contact_ms and not self.connected else 0.0),
            "swarm": self.swarm,
            "server": self.server,
            "streams": self.streams,
            "control": self.control,
            "tasks": counts,
            "queue": queue,
            "agents": self.agents,
            "recent": list(self.recent),
            "claims": fold.claims, "completions": fold.completions, "failures": fold.failures,
            "reclaims": fold.reclaims,
            "pending_gates": gates,
            "event_rate": round(fold.event_rate(wall_ms()), 2),
            "stream_last_seq": self.stream_last_seq,
            "projection_lag": max(0, self.stream_last_seq - applied),
            "projection": "duckdb" if self.projected_seq is not None else "live fold",
        }


MAX_ROWS = 4  # rows per table in the live view, so it fits 80x24


def render_live(snap: dict[str, Any]) -> Any:
    """A rich renderable of a live snapshot (pure, testable with a recording console)."""
    import datetime

    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    if not snap.get("connected", True):
        parts.append(Panel(Text(f"DISCONNECTED: no answer from the server for "
                                f"{snap.get('stale_s', 0):g} s; the figures below are the "
                                "last ones seen (stale)", style="bold white on red"),
                           style="red"))
    control = snap.get("control") or {}
    mode = control.get("mode", "running")
    if mode != "running":
        who = f" by {control['actor']}" if control.get("actor") else ""
        why = f": {control['reason']}" if control.get("reason") else ""
        parts.append(Panel(Text(f"SWARM {mode.upper()}{who}{why}", style="bold white on red"),
                           style="red"))
    for scope in control.get("paused_scopes", []):
        parts.append(Text(f"scope {scope['scope']} paused: {scope.get('reason', '')}",
                          style="bold yellow"))
    for b in control.get("open_breakers", []):
        parts.append(Text(f"breaker OPEN: {b['capability']} ({b['reason']})",
                          style="bold yellow"))
    head = (f"swarm {snap['swarm']}  {snap.get('server', '')}  events {snap['stream_last_seq']}"
            f"  rate {snap['event_rate']}/s  projection lag {snap['projection_lag']}"
            f" ({snap['projection']})")
    parts.append(Text(head, style="bold"))
    if snap.get("streams"):
        parts.append(Text("  ".join(f"{st['name']}: {st.get('health', '?')}"
                                    for st in snap["streams"] if st.get("exists")),
                          style="dim"))
    tasks = Table(title="tasks", expand=False, box=None)
    for status in snap["tasks"]:
        tasks.add_column(status, justify="right")
    tasks.add_row(*(str(n) for n in snap["tasks"].values()))
    parts.append(tasks)
    parts.append(Text(f"claims {snap['claims']}  completions {snap['completions']}  "
                      f"failures {snap['failures']}  reclaims {snap['reclaims']}"))
    if snap["queue"]:
        queue = Table(title="queue by capability", box=None)
        queue.add_column("capability")
        for col in ("ready", "claimed", "pending", "blocked"):
            queue.add_column(col, justify="right")
        for cap, by in sorted(snap["queue"].items()):
            queue.add_row(cap, *(str(by.get(col, 0)) for col in
                                 ("ready", "claimed", "pending", "blocked")))
        parts.append(queue)
    if snap["agents"]:
        agents = Table(title="agents", box=None)
        for col in ("agent", "status", "task", "last seen"):
            agents.add_column(col, overflow="ellipsis", no_wrap=True)
        shown = sorted(snap["agents"].items())
        if len(shown) > MAX_ROWS:
            parts.append(Text(f"{len(shown) - MAX_ROWS} more agents not shown", style="dim"))
        for name, info in shown[:MAX_ROWS]:
            seen = info.get("seen")
            when = (datetime.datetime.fromtimestamp(seen / 1000, datetime.UTC)
                    .strftime("%H:%M:%S") if seen else "-")
            agents.add_row(name, info.get("status", "?"), info.get("task") or "-", when)
        parts.append(agents)
    if snap["pending_gates"]:
        parts.append(Text("pending gates: " + ", ".join(
            f"{g['task_id']} ({g['title']})" for g in snap["pending_gates"]),
            style="bold magenta"))
    if snap["recent"]:
        recent = Table(title="recent", box=None)
        for col in ("time", "what", "task", "detail"):
            recent.add_column(col, overflow="ellipsis", no_wrap=True)
        for at, what, title, detail in snap["recent"][:MAX_ROWS]:
            when = datetime.datetime.fromtimestamp(at / 1000, datetime.UTC).strftime("%H:%M:%S")
            style = {"failed": "red", "reclaimed": "yellow"}.get(what, "green")
            recent.add_row(when, Text(what, style=style), title, detail)
        parts.append(recent)
    return Group(*parts)


async def live_view(swarm: Swarm, *, monitor_url: str | None = None,
                    duration_s: float | None = None, as_json: bool = False,
                    out: Any = None, stop: Any = None) -> None:
    """Follow the swarm's events and control state and redraw in place until ``stop``
    (an ``asyncio.Event``) is set or ``duration_s`` passed."""
    import asyncio
    import contextlib
    import json

    from rich.console import Console
    from rich.live import Live

    from cflow.errors import CflowError
    from cflow.metrics import MetricsFold
    from cflow.status import collect_status
    from cflow.streams import StoredEvent

    live = LiveState(swarm.name, MetricsFold())
    dirty = asyncio.Event()
    caught_up = asyncio.Event()

    async def follow_events() -> None:
        async for item in swarm.log.follow(caught_up=caught_up):
            if isinstance(item, StoredEvent):
                live.absorb(item.seq, item.event)
            if caught_up.is_set():
                dirty.set()

    async def follow_control() -> None:
        async for view in swarm.control.watch():
            live.control = _control_dict(view)
            dirty.set()

    async def slow_facts() -> None:
        # Server/stream health and the projector's checkpoint change slowly and are
        # not events: look them up every few seconds.
        while True:
            with contextlib.suppress(CflowError):
                status = await collect_status(swarm, monitor_url=monitor_url)
                srv = status["server"]
                live.server = f"{srv.get('name')} {srv.get('version')}"
                live.streams = status.get("streams", [])
            try:
                live.projected_seq = (await swarm.query("SELECT 1", timeout_s=1)).checkpoint
            except CflowError:
                live.projected_seq = None  # no projector serving queries
            live.stream_last_seq = max(live.stream_last_seq,
                                       await _safe_last_seq(swarm))
            dirty.set()
            await asyncio.sleep(5)  # periodic by nature: these facts are not events

    console = out or Console()
    workers = [asyncio.create_task(f()) for f in (follow_events, follow_control, slow_facts)]
    loop = asyncio.get_running_loop()
    end = loop.time() + duration_s if duration_s is not None else None
    stopped = stop or asyncio.Event()

    def going() -> bool:
        return not stopped.is_set() and (end is None or loop.time() < end)

    try:
        catching_up = asyncio.ensure_future(caught_up.wait())
        leaving = asyncio.ensure_future(stopped.wait())
        try:
            await asyncio.wait([catching_up, leaving], timeout=30,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            catching_up.cancel()
            leaving.cancel()
        if as_json:
            from cflow.streams.client import wall_ms

            while going():
                await _wait_dirty(dirty, end, loop, stopped)
                live.contact(swarm.nc.is_connected, wall_ms())
                sys.stdout.write(json.dumps(live.snapshot(), default=str) + "\n")
                sys.stdout.flush()
            return
        from cflow.streams.client import wall_ms

        with Live(render_live(live.snapshot()), console=console, refresh_per_second=4,
                  screen=False) as screen:
            while going():
                await _wait_dirty(dirty, end, loop, stopped)
                live.contact(swarm.nc.is_connected, wall_ms())
                screen.update(render_live(live.snapshot()))
    finally:
        for w in workers:
            w.cancel()
        for w in workers:
            with contextlib.suppress(asyncio.CancelledError, CflowError):
                await w


async def _wait_dirty(dirty: Any, end: float | None, loop: Any, stopped: Any = None) -> None:
    import asyncio

    timeout = 1.0 if end is None else max(0.0, min(1.0, end - loop.time()))
    waits = [asyncio.ensure_future(dirty.wait())]
    if stopped is not None:
        waits.append(asyncio.ensure_future(stopped.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    dirty.clear()
    if stopped is None or not stopped.is_set():
        await asyncio.sleep(0.2)  # coalesce a burst of events into one redraw


async def _safe_last_seq(swarm: Swarm) -> int:
    from cflow.errors import CflowError

    try:
        return await swarm.log.stream_last_seq()
    except CflowError:
        return 0


def _control_dict(view: ControlView) -> dict[str, Any]:
    from cflow.streams.client import wall_ms

    return view.to_dict(wall_ms())


def watch_status(ctx: typer.Context, monitor_url: str | None = None,
                 duration_s: float | None = None) -> None:
    """`cfctl status --watch`: the live view, refreshing in place until Ctrl-C."""
    from cflow.swarm import Swarm

    c = state(ctx)

    async def body() -> bool:
        import asyncio
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        def on_signal() -> None:
            if not stop.is_set():
                exit_soon("left the live view")  # it only reads: nothing to lose
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C is how one leaves a live view
            loop.add_signal_handler(sig, on_signal)
        async with Swarm.connect(c.url, swarm=c.swarm, agent="cfctl-watch",
                                 ensure=False) as swarm:
            await swarm.log.stream_last_seq()  # NotFound (one line) for a swarm never set up
            await live_view(swarm, monitor_url=monitor_url, duration_s=duration_s,
                            as_json=c.json, stop=stop)
        return stop.is_set()

    if run(ctx, body):
        interrupted("left the live view")


@app.command("top")
def top_cmd(
    ctx: typer.Context,
    monitor: str | None = typer.Option(None, "--monitor", envvar="CFLOW_MONITOR",
                                       help="Monitoring endpoint (http://127.0.0.1:8222)."),
    duration: float | None = typer.Option(None, "--for", help="Stop after this many seconds."),
) -> None:
    """Live view of the swarm (same as `cfctl status --watch`)."""
    watch_status(ctx, monitor, duration)
