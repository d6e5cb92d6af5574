"""Prometheus metrics of a swarm: folded from its events, served on a loopback port.

Theory of operation
-------------------
:class:`MetricsFold` (pure) folds stored events into counters, gauges and
histograms: tasks by status and capability (through the same
:class:`~cflow.tasks.TaskBoard` the claim path uses), claims, completions,
failures, reclaims (lease expiries), pickup time (ready -> claimed) and cycle time
(created -> completed), agents by status, the control state (paused, stopped,
open breakers) and events appended. Times come from the events' HLC wall time,
so a replay gives the same numbers; only the event rate gauge takes ``now``.

:class:`MetricsCollector` keeps a fold up to date by following the event stream
(an ordered push consumer, caught up once at start), and renders the
Prometheus text exposition format (version 0.0.4) with the projection lag: the
stream's last sequence minus what the projection (or, without one, this fold)
has applied. :func:`serve_metrics` is a minimal HTTP server on 127.0.0.1 that
answers ``GET /metrics`` with ``collect_fn()``; the projector and ``cfctl up``
start it for ``--metrics-port``. No new dependency: asyncio streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cflow import events as ev
from cflow.errors import CflowError, InvalidInput
from cflow.streams import BadMessage, StoredEvent
from cflow.tasks import STATUSES, TaskBoard, event_ms

if TYPE_CHECKING:
    from cflow.swarm import Swarm

log = logging.getLogger("cflow.metrics")

# Seconds. Agent pickups are sub-second to minutes; cycle times seconds to hours.
PICKUP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
CYCLE_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0,
                 86400.0)
RATE_WINDOW_S = 60.0
AGENT_STATUSES = ("online", "idle", "busy", "offline")


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        value = max(0.0, value)
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts,
                                                                     strict=True)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_num(self.total)}")
        out.append(f"{name}_count {self.count}")
        return out


class MetricsFold:
    """Metrics folded from events (pure: no I/O; time only from events and arguments)."""

    def __init__(self) -> None:
        self.board = TaskBoard()
        self.last_seq = 0
        self.bad_messages = 0
        self.events: Counter[str] = Counter()
        self.claims = 0
        self.completions = 0
        self.failures = 0  # every TaskFailed (attempt failed), final or retried
        self.failures_final = 0
        self.reclaims = 0  # claims that expired and were taken back by a reaper
        self.requeues = 0
        self.cancellations = 0
        self.created = 0
        self.cost_usd = 0.0
        self.pickup = Histogram(PICKUP_BUCKETS)
        self.cycle = Histogram(CYCLE_BUCKETS)
        self.agents: dict[str, str] = {}
        self.waiting_on_human: set[str] = set()  # Claude Code sessions at a permission prompt
        self.mode = "running"
        self.paused_scopes: set[str] = set()
        self.breakers_open: set[str] = set()
        self.budget_exceeded = 0
        self._recent: deque[int] = deque()  # event wall times in the rate window

    def apply(self, seq: int, event: ev.Event) -> None:
        """Fold one stored event (idempotent for a sequence already applied)."""
        if seq <= self.last_seq:
            return
        self.last_seq = seq
        self.events[event.type] += 1
        at = event_ms(event)
        self._recent.append(at)
        data = event.data
        if event.entity_kind == "task":
            before = self.board.get(event.entity_id)
            after = self.board.apply(seq, event)
            if after is None or after is before:
                return  # refused by the state machine: counted in board.rejected
            self._task(data, before, at)
        elif event.entity_kind == "agent":
            match data:
                case ev.AgentRegistered():
                    self.agents[event.entity_id] = "online"
                case ev.AgentStatusChanged(status=status, reason=reason):
                    self.agents[event.entity_id] = status
                    if status == "busy" and reason.startswith("waiting on a human"):
                        self.waiting_on_human.add(event.entity_id)
                    else:
                        self.waiting_on_human.discard(event.entity_id)
                case ev.AgentDeregistered():
                    self.agents[event.entity_id] = "offline"
        elif event.entity_kind == "control":
            self._control(data)

    def _task(self, data: ev.EventData, before: Any, at: int) -> None:
        match data:
            case ev.TaskCreated():
                self.created += 1
            case ev.TaskClaimed():
                self.claims += 1
                if before is not None and before.ready_ms is not None:
                    self.pickup.observe((at - before.ready_ms) / 1000)
            case ev.TaskCompleted(cost_usd=cost):
                self.completions += 1
                self.cost_usd += cost or 0.0
                if before is not None:
                    self.cycle.observe((at - before.created_ms) / 1000)
            case ev.TaskFailed(final=final, cost_usd=cost):
                self.failures += 1
                self.failures_final += int(final)
                self.cost_usd += cost or 0.0
            case ev.TaskLeaseExpired():
                self.reclaims += 1
            case ev.TaskRequeued():
                self.requeues += 1
            case ev.TaskCancelled():
                self.cancellations += 1
            case _:
                pass

    def _control(self, data: ev.EventData) -> None:
        match data:
            case ev.SwarmPaused(scope=scope):
                if scope == "swarm":
                    self.mode = "paused"
                else:
                    self.paused_scopes.add(scope)
            case ev.SwarmResumed(scope=scope):
                if scope == "swarm":
                    self.mode = "running"
                else:
                    self.paused_scopes.discard(scope)
            case ev.SwarmStopped():
                self.mode = "stopped"
            case ev.BudgetExceeded():
                self.budget_exceeded += 1
            case ev.BreakerOpened(scope=cap):
                self.breakers_open.add(cap)
            case ev.BreakerClosed(scope=cap):
                self.breakers_open.discard(cap)
            case _:
                pass

    def bad(self, seq: int) -> None:
        if seq > self.last_seq:
            self.last_seq = seq
            self.bad_messages += 1

    def event_rate(self, now_ms: int) -> float:
        """Events per second appended over the last :data:`RATE_WINDOW_S`."""
        horizon = now_ms - int(RATE_WINDOW_S * 1000)
        while self._recent and self._recent[0] < horizon:
            self._recent.popleft()
        return len(self._recent) / RATE_WINDOW_S

    def presence_counts(self) -> dict[str, int]:
        """Agents per presence state, from their status events and the claims they hold."""
        from cflow.agents import PRESENCE_STATES

        holders = {t.owner for t in self.board.tasks.values() if t.status == "claimed"}
        out = dict.fromkeys(PRESENCE_STATES, 0)
        for name, status in self.agents.items():
            gone = status == "offline"
            if gone:
                state = "dead" if name in holders else "offline"
            elif name in self.waiting_on_human:
                state = "waiting_on_human"
            elif status == "busy" or name in holders:
                state = "working"
            else:
                state = "idle"
            out[state] += 1
        return out

    def by_capability(self) -> dict[tuple[str, str], int]:
        out: Counter[tuple[str, str]] = Counter()
        for state in self.board.tasks.values():
            for cap in state.capabilities or ("",):
                out[(state.status, cap)] += 1
        return dict(out)

    def render(self, *, swarm: str, stream_last_seq: int | None, projected_seq: int | None,
               now_ms: int) -> str:
        """Prometheus text exposition format 0.0.4."""
        s = {"swarm": swarm}
        out: list[str] = []

        def metric(name: str, kind: str, help_: str,
                   samples: Iterable[tuple[dict[str, str], float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{_labels({**s, **labels})} {_num(value)}")

        counts = self.board.counts()
        metric("cflow_tasks", "gauge", "Tasks by status.",
               (({"status": st}, counts.get(st, 0)) for st in STATUSES))
        metric("cflow_tasks_by_capability", "gauge",
               "Tasks by status and required capability (\"\" for none).",
               (({"status": st, "capability": cap}, n)
                for (st, cap), n in sorted(self.by_capability().items())))
        metric("cflow_tasks_created_total", "counter", "Tasks created.", [({}, self.created)])
        metric("cflow_claims_total", "counter", "Claims (attempts started).", [({}, self.claims)])
        metric("cflow_completions_total", "counter", "Tasks completed.",
               [({}, self.completions)])
        metric("cflow_failures_total", "counter", "Attempts failed (final or retried).",
               [({"final": "true"}, self.failures_final),
                ({"final": "false"}, self.failures - self.failures_final)])
        metric("cflow_reclaims_total", "counter",
               "Claims whose lease expired and were taken back by a reaper.",
               [({}, self.reclaims)])
        metric("cflow_requeues_total", "counter", "Expired claims put back to ready.",
               [({}, self.requeues)])
        metric("cflow_cancellations_total", "counter", "Tasks cancelled.",
               [({}, self.cancellations)])
        metric("cflow_cost_usd_total", "counter", "Cost reported by executors, USD.",
               [({}, self.cost_usd)])
        for name, hist, help_ in (
                ("cflow_pickup_seconds", self.pickup, "Time from ready to claimed."),
                ("cflow_cycle_seconds", self.cycle, "Time from created to completed.")):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} histogram")
            out.extend(_with_labels(line, s) for line in hist.lines(name))
        agent_counts = Counter(self.agents.values())
        metric("cflow_agents", "gauge", "Agents by status.",
               (({"status": st}, agent_counts.get(st, 0)) for st in AGENT_STATUSES))
        metric("cflow_agents_waiting_on_human", "gauge",
               "Agents stopped at a permission prompt (Claude Code hooks).",
               [({}, len(self.waiting_on_human))])
        metric("cflow_agents_presence", "gauge",
               "Agents by presence (working, waiting_on_human, idle, offline, dead), as their "
               "events tell it: an agent killed without a word counts until its status changes.",
               (({"state": st}, n) for st, n in self.presence_counts().items()))
        metric("cflow_swarm_paused", "gauge", "1 while the swarm is paused or stopped.",
               [({"mode": self.mode}, 0 if self.mode == "running" else 1)])
        metric("cflow_scopes_paused", "gauge", "Parent-task scopes paused.",
               [({}, len(self.paused_scopes))])
        metric("cflow_breakers_open", "gauge", "Capabilities whose circuit breaker is open.",
               [({}, len(self.breakers_open))])
        metric("cflow_budget_exceeded_total", "counter", "Budgets exceeded.",
               [({}, self.budget_exceeded)])
        metric("cflow_events_total", "counter", "Events appended, by type.",
               (({"type": t}, n) for t, n in sorted(self.events.items())))
        metric("cflow_event_rate", "gauge",
               f"Events appended per second over the last {RATE_WINDOW_S:g} s.",
               [({}, self.event_rate(now_ms))])
        metric("cflow_quarantined_total", "counter", "Undecodable messages on the stream.",
               [({}, self.bad_messages)])
        if stream_last_seq is not None:
            metric("cflow_stream_last_seq", "gauge", "Last sequence of the event stream.",
                   [({}, stream_last_seq)])
            applied = self.last_seq if projected_seq is None else projected_seq
            metric("cflow_projection_lag", "gauge",
                   "Events on the stream not yet applied by the projection.",
                   [({}, max(0, stream_last_seq - applied))])
        return "\n".join(out) + "\n"


def _num(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value == int(value)
                                  and abs(value) < 1e15):
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _with_labels(line: str, labels: dict[str, str]) -> str:
    name, _, rest = line.partition(" ")
    extra = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    head = name.replace("{", "{" + extra + ",", 1) if "{" in name else name + "{" + extra + "}"
    return f"{head} {rest}"


# ------------------------------------------------------------------- parsing

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_text(text: str) -> list[Sample]:
    """Parse Prometheus text format (what :meth:`MetricsFold.render` writes).

    Raises:
        InvalidInput: a line that is neither a comment nor a sample.
    """
    out: list[Sample] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise InvalidInput(f"line {number} is not a Prometheus sample: {line!r}")
        labels = {k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
                  for k, v in _LABEL.findall(match.group(3) or "")}
        out.append(Sample(match.group(1), labels, float(match.group(4))))
    return out


def value_of(samples: Sequence[Sample], name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# ------------------------------------------------------------------ adapter


class MetricsCollector:
    """Follows a swarm's events into a :class:`MetricsFold`; renders on demand.

    ``projected_seq``, if given, returns the projection's checkpoint (the
    projector passes it), which makes ``cflow_projection_lag`` the lag of the
    DuckDB projection rather than of this fold.
    """

    def __init__(self, swarm: Swarm, *,
                 projected_seq: Callable[[], int | None] | None = None) -> None:
        self.swarm = swarm
        self.fold = MetricsFold()
        self.projected_seq = projected_seq
        self.caught_up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._moved = asyncio.Condition()

    async def start(self) -> None:
        """Follow the stream (once) and wait until the fold has caught up."""
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="metrics-follow")
        waiter = asyncio.create_task(self.caught_up.wait())
        done, _ = await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done and not self.caught_up.is_set():
            waiter.cancel()
            self._task.result()

    async def _follow(self) -> None:
        if await self.swarm.log.stream_last_seq() == 0:
            self.caught_up.set()
        async for item in self.swarm.log.follow(caught_up=self.caught_up):
            self._absorb(item)
            async with self._moved:
                self._moved.notify_all()

    async def wait_for_seq(self, seq: int, timeout_s: float = 10.0) -> bool:
        """Wait until the fold has applied ``seq`` (pushed by the consumer); False on timeout."""
        async with self._moved:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._moved.wait_for(lambda: self.fold.last_seq >= seq), timeout_s)
        return self.fold.last_seq >= seq

    def _absorb(self, item: StoredEvent | BadMessage) -> None:
        if isinstance(item, StoredEvent):
            self.fold.apply(item.seq, item.event)
        else:
            self.fold.bad(item.seq)

    async def catch_up(self) -> None:
        """One-shot: fold everything stored now, then stop (``cfctl metrics``)."""
        for item in await self.swarm.log.read(start_seq=self.fold.last_seq + 1):
            self._absorb(item)
        self.caught_up.set()

    async def collect(self) -> str:
        """The metrics text now."""
        from cflow.streams.client import wall_ms

        try:
            last: int | None = await self.swarm.log.stream_last_seq()
        except CflowError as exc:
            log.warning("stream info unavailable for metrics: %s", exc)
            last = None
        projected = self.projected_seq() if self.projected_seq else None
        text = self.fold.render(swarm=self.swarm.name, stream_last_seq=last,
                                projected_seq=projected, now_ms=wall_ms())
        return text + maintenance_lines(self.swarm.name, self.swarm.maintenance_health())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None


def maintenance_lines(swarm: str, health: dict[str, Any] | None) -> str:
    """Gauges and counters of this process's maintenance loop (pure)."""
    if health is None:
        return ""
    labels = _labels({"swarm": swarm})
    rows = [
        ("cflow_maintenance_running", "gauge", "1 while the maintenance loop runs",
         1 if health.get("running") else 0),
        ("cflow_maintenance_failures_total", "counter",
         "maintenance steps or loops that failed (retried or restarted)", health["failures"]),
        ("cflow_maintenance_sweeps_total", "counter", "whole-board sweeps done",
         health["sweeps"]),
        ("cflow_maintenance_reaped_total", "counter", "claims this process expired",
         health["reaped"]),
    ]
    age = health.get("last_sweep_age_s")
    if age is not None:
        rows.append(("cflow_maintenance_last_sweep_age_seconds", "gauge",
                     "seconds since the last whole-board sweep", age))
    out = []
    for name, kind, help_, value in rows:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}",
                f"{name}{labels} {_num(float(value))}"]
    return "\n".join(out) + "\n"


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def serve_metrics(port: int, collect_fn: Callable[[], Awaitable[str]], *,
                        host: str = "127.0.0.1") -> asyncio.Server:
    """Serve ``GET /metrics`` (Prometheus text) on ``host:port``; returns the server.

    Loopback by default: metrics name agents and tasks. ``port`` 0 picks a free
    port (``server.sockets[0].getsockname()[1]``). Close it with
    ``server.close(); await server.wait_closed()``.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while True:  # headers, ignored
                line = await asyncio.wait_for(reader.readline(), 5)
                if line in (b"\r\n", b"\n", b""):
                    break
            parts = request.decode("latin-1").split()
            method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            if method not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path.split("?")[0] in ("/metrics", "/"):
                try:
                    body = (await collect_fn()).encode()
                    status, ctype = "200 OK", CONTENT_TYPE
                except CflowError as exc:
                    status, body, ctype = ("503 Service Unavailable", f"{exc}\n".encode(),
                                           "text/plain")
            else:
                status, body, ctype = "404 Not Found", b"try /metrics\n", "text/plain"
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    try:
        return await asyncio.start_server(handle, host, port)
    except OSError as exc:
        raise InvalidInput(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}",
                           port=port) from None


async def run_metrics_server(swarm: Swarm, port: int, *, host: str = "127.0.0.1",
                             projected_seq: Callable[[], int | None] | None = None,
                             ready: Callable[[int], None] | None = None) -> None:
    """Follow the swarm and serve its metrics until cancelled (``--metrics-port``)."""
    collector = MetricsCollector(swarm, projected_seq=projected_seq)
    await collector.start()
    server = await serve_metrics(port, collector.collect, host=host)
    try:
        if ready is not None:
            ready(server.sockets[0].getsockname()[1])
        await asyncio.Future()  # until cancelled
    finally:
        server.close()
        await server.wait_closed()
        await collector.aclose()


async def serve_swarm_metrics(url: str, swarm: str, port: int, *, host: str = "127.0.0.1",
                              projected_seq: Callable[[], int | None] | None = None,
                              ready: Callable[[int], None] | None = None) -> None:
    """Connect to ``swarm`` and serve its metrics until cancelled (for ``--metrics-port``).

    Raises:
        InvalidInput: the port cannot be bound. Unavailable: NATS is unreachable.
    """
    from cflow.swarm import Swarm

    async with Swarm.connect(url, swarm=swarm, agent="cflow-metrics", ensure=False) as s:
        await run_metrics_server(s, port, host=host, projected_seq=projected_seq, ready=ready)


__all__ = [
    "CONTENT_TYPE",
    "Histogram",
    "MetricsCollector",
    "MetricsFold",
    "Sample",
    "parse_text",
    "run_metrics_server",
    "serve_metrics",
    "serve_swarm_metrics",
    "value_of",
]
