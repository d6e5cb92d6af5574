"""`cfctl projector`, `cfctl projections rebuild`, `cfctl query`, `cfctl report`, `cfctl export`."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cflow.cli.app import app, emit, exit_soon, fail, interrupted, plural, run, say, state
from cflow.gitflow.report import MERGES_SQL

if TYPE_CHECKING:
    from cflow.projections.query import QueryResult

projections_app = typer.Typer(help="Manage the DuckDB projection of the swarm.",
                              no_args_is_help=True)
app.add_typer(projections_app, name="projections")

DB_OPTION = typer.Option(None, "--db", help="Projection database file "
                         "(default: $XDG_DATA_HOME/cflow/projections/<swarm>/projection.duckdb).")


def _db_path(swarm: str, db: Path | None) -> Path:
    from cflow.projections.projector import default_db_path

    return db if db is not None else default_db_path(swarm)


@app.command("projector")
def projector_cmd(
    ctx: typer.Context,
    db: Path | None = DB_OPTION,
    batch: int = typer.Option(5000, "--batch", min=1, help="Largest batch per transaction."),
    # 1 is store.DEFAULT_THREADS, not imported here: it would import DuckDB for --help.
    threads: int = typer.Option(1, "--threads", min=1, max=256,
                                help="DuckDB threads per statement (1 keeps small batches "
                                "and point queries cheapest; more speeds up heavy "
                                "analytics on a machine with cores to spare)."),
    no_query: bool = typer.Option(False, "--no-query", help="Do not serve the query service."),
    no_reap: bool = typer.Option(False, "--no-reap", help="Do not act as a lease reaper and "
                                 "readiness evaluator (every long-lived process is one)."),
    metrics_port: int | None = typer.Option(None, "--metrics-port",
                                            help="Serve Prometheus metrics on 127.0.0.1:PORT."),
) -> None:
    """Fold the swarm's events into DuckDB and serve read-only queries until stopped."""
    import asyncio
    import contextlib
    import signal

    from cflow.projections.projector import Projector, run_projector

    c = state(ctx)
    path = _db_path(c.swarm, db)

    running: list[Projector] = []

    def ready(projector: Projector) -> None:
        running.append(projector)
        typer.echo(f"projector: swarm {c.swarm}, {path}, from sequence "
                   f"{projector.applied_seq + 1}", err=True)

    signals: list[int] = []

    async def body() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(sig: int) -> None:
            if not signals:
                exit_soon("stopped the projector")
            signals.append(sig)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        metrics = None
        if metrics_port is not None:
            from cflow.metrics import serve_swarm_metrics

            metrics = asyncio.create_task(serve_swarm_metrics(
                c.url, c.swarm, metrics_port,
                projected_seq=lambda: running[0].applied_seq if running else None))
        try:
            await run_projector(c.url, c.swarm, path, stop, serve_queries=not no_query,
                                batch_max=batch, ready=ready, reap=not no_reap,
                                threads=threads)
        finally:
            if metrics is not None:
                metrics.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await metrics

    run(ctx, body)
    if signals:
        interrupted("stopped the projector")


@projections_app.command("rebuild")
def rebuild_cmd(ctx: typer.Context, db: Path | None = DB_OPTION) -> None:
    """Replay the whole stream into a fresh file and swap it in atomically.

    Without --db: the file the swarm's running projector serves (the default file
    when none runs). If a running projector holds the file, it rebuilds in the background and swaps
    the fresh file in itself (it keeps projecting and answering queries meanwhile).
    """
    import anyio.to_thread
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from cflow.errors import NotFound
    from cflow.projections.projector import file_in_use, rebuild, rebuild_running
    from cflow.swarm import Swarm

    c = state(ctx)
    path = _db_path(c.swarm, db)

    async def body() -> dict[str, Any]:
        async with Swarm.connect(c.url, swarm=c.swarm, agent="cfctl-rebuild") as swarm:
            with Progress("[progress.description]{task.description}", BarColumn(),
                          MofNCompleteColumn(), TimeElapsedColumn(),
                          disable=c.json or not sys.stderr.isatty(),
                          console=_err_console()) as bar:
                task = bar.add_task("rebuilding", total=None)

                def progress(seq: int, total: int) -> None:
                    bar.update(task, completed=seq, total=total)

                if db is None:  # the file the swarm's running projector serves, if one runs
                    bar.update(task, description="rebuilding in the running projector")
                    try:
                        return await rebuild_running(swarm.log.nc, c.swarm, None,
                                                     progress=progress)
                    except NotFound:
                        bar.update(task, description="rebuilding")
                        say(ctx, f"no projector of swarm {c.swarm} runs: rebuilding the "
                                 f"default file {path}")
                if await anyio.to_thread.run_sync(file_in_use, path):
                    bar.update(task, description="rebuilding in the running projector")
                    return await rebuild_running(swarm.log.nc, c.swarm, path,
                                                 progress=progress)
                return await rebuild(swarm.log, path, progress=progress)

    result = run(ctx, body)
    where = " by the running projector, swapped in" if result.get("background") else ""
    emit(ctx, result, f"rebuilt {result['path']}{where}: {result['events']} events up to "
                      f"sequence {result['last_seq']} ({result['quarantined']} quarantined) in "
                      f"{result['seconds']} s")


def _err_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


async def _query(ctx: typer.Context, sql: str, *, limit: int, wait_for: int | None = None,
                 timeout_s: float = 10.0) -> QueryResult:
    from cflow.projections.query import QueryClient
    from cflow.streams import connect
    from cflow.swarm import close_quietly

    c = state(ctx)
    nc = await connect(c.url, name="cflow:cfctl-query")
    try:
        return await QueryClient(nc, c.swarm).query(sql, limit=limit, wait_for_seq=wait_for,
                                                   timeout_s=timeout_s)
    finally:
        await close_quietly(nc)


async def _task_id(ctx: typer.Context, ref: str) -> str:
    """The whole task id for ``ref`` (a checked token), or a unique prefix of one, from the
    projection's ``tasks`` table."""
    from cflow.cli.ids import WHOLE_ID_LENGTH, pick, require_id

    if len(require_id(ref, "task")) >= WHOLE_ID_LENGTH:
        return ref
    found = await _query(ctx, f"SELECT task_id FROM tasks WHERE starts_with(task_id, '{ref}')",
                         limit=1000)
    return pick("task", ref, [str(row[0]) for row in found.rows])


def _table(result: QueryResult, title: str | None = None) -> None:
    from rich.table import Table

    from cflow.cli.app import console as cli_console

    table = Table(title=title, show_lines=False)
    for col in result.columns:
        table.add_column(col, overflow="fold")
    for row in result.rows:
        table.add_row(*[_cell(v) for v in row])
    console = cli_console()
    console.print(table)
    if result.truncated:
        console.print(f"[yellow]truncated at {plural(len(result.rows), 'row')} (use --limit)[/]")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


@app.command("query")
def query_cmd(
    ctx: typer.Context,
    sql: str = typer.Argument(..., help="One read-only SQL statement."),
    as_json: bool = typer.Option(False, "--json", help="Rows as JSON objects."),
    as_csv: bool = typer.Option(False, "--csv", help="Rows as CSV with a header."),
    limit: int = typer.Option(1000, "--limit", min=0, help="Row cap."),
    wait_for: int | None = typer.Option(None, "--wait-for", help="Wait until the projection "
                                        "reached this stream sequence."),
    timeout: float = typer.Option(10.0, "--timeout", help="Time limit in seconds."),
) -> None:
    """Run read-only SQL on the projection, through the query service."""
    result = run(ctx, lambda: _query(ctx, sql, limit=limit, wait_for=wait_for,
                                     timeout_s=timeout))
    if as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(result.columns)
        writer.writerows([[_cell(v) for v in row] for row in result.rows])
    elif as_json or state(ctx).json:
        sys.stdout.write(json.dumps(result.dicts(), default=str) + "\n")
    else:
        _table(result)


REPORTS = {
    "cycle-time": ("cycle time and wait time (seconds)",
                   "SELECT l.dimension, l.value, l.metric, l.n, round(l.p50_s, 3) AS p50_s, "
                   "round(l.p95_s, 3) AS p95_s, round(l.avg_s, 3) AS avg_s FROM latency_stats l"),
    "throughput": ("throughput per hour",
                   "SELECT * FROM throughput_hourly ORDER BY hour DESC"),
    "agents": ("agents", "SELECT a.agent_id, a.status, a.current_task, a.tasks_claimed, "
               "a.tasks_completed, a.tasks_failed, round(u.busy_s, 1) AS busy_s, "
               "round(u.utilisation, 3) AS utilisation, a.last_seen "
               "FROM agents a LEFT JOIN agent_utilisation u USING (agent_id) "
               "ORDER BY a.agent_id"),
    "failures": ("failures", "SELECT * FROM failure_stats"),
    # SQL over the projection's events (see cflow.gitflow.report).
    "merges": ("merges: lead time, rejection rate, causes", MERGES_SQL),
}


@app.command("report")
def report_cmd(
    ctx: typer.Context,
    kind: str = typer.Argument(..., help="cycle-time | throughput | agents | failures | "
                               "timeline"),
    task_id: str | None = typer.Argument(None, help="Task id or a unique prefix (for "
                                          "timeline)."),
    limit: int = typer.Option(200, "--limit", min=1),
) -> None:
    """Print an analytics view as a table."""
    from cflow.events import check_token

    queries: list[tuple[str, str]] = []
    if kind == "timeline":
        if not task_id:
            fail("report timeline needs a TASK_ID (a unique prefix will do)", 2)
        check_token(task_id, "task id")
    elif kind == "failures":
        queries = [REPORTS["failures"], ("top errors", "SELECT * FROM top_errors")]
    elif kind in REPORTS:
        queries = [REPORTS[kind]]
    else:
        fail(f"unknown report {kind!r}; one of: {', '.join([*REPORTS, 'timeline'])}", 2)

    async def body() -> list[tuple[str, QueryResult]]:
        if task_id and kind == "timeline":
            whole = await _task_id(ctx, task_id)  # a checked token
            # --json keeps the exact values; _timeline renders its columns for a person.
            columns = ("seq, ts, type, actor, hlc, refused, data" if state(ctx).json
                       else "hlc, type, actor, refused, data")
            queries.append((f"timeline of {whole}",
                            f"SELECT {columns} FROM task_timeline "
                            f"WHERE task_id = '{whole}' ORDER BY seq"))
        return [(title, await _query(ctx, sql, limit=limit)) for title, sql in queries]

    results = run(ctx, body)
    if state(ctx).json:
        emit(ctx, {title: r.dicts() for title, r in results})
        return
    for title, result in results:
        if kind == "timeline":
            _timeline(result, title)
        else:
            _table(result, title)


def _timeline(result: QueryResult, title: str) -> None:
    """A task's events for a person: time, type, actor and a ``key=value`` summary of the
    event's fields, cut with an ellipsis to fit the terminal (80 columns in a pipe)."""
    from rich.table import Table

    from cflow.cli.app import console as cli_console
    from cflow.cli.app import fields_summary, human_time

    task_id = title.removeprefix("timeline of ")
    rows = []
    for hlc, type_, actor, refused, data in result.rows:
        fields = json.loads(data) if isinstance(data, str) else dict(data or {})
        if fields.get("task_id") == task_id:  # the title says whose timeline it is
            del fields["task_id"]
        summary = fields_summary(fields)
        rows.append((human_time(hlc), str(type_), str(actor or ""),
                     f"refused {summary}".rstrip() if refused else summary))
    console = cli_console()
    if not sys.stdout.isatty():
        console.width = 80  # a pipe has no width of its own; console() would not cut
    table = Table(title=title, box=None, pad_edge=False, title_justify="left")
    # Time, type and actor stay whole (an actor up to 20 characters); the summary gets
    # the rest of the line, cut with an ellipsis.
    widths = [max([len(name), *(len(row[i]) for row in rows)])
              for i, name in enumerate(("time", "type", "actor"))]
    widths[2] = min(widths[2], 20)
    for name, width in zip(("time", "type", "actor"), widths, strict=True):
        table.add_column(name, no_wrap=True, overflow="ellipsis", width=width)
    table.add_column("event", no_wrap=True, overflow="ellipsis",
                     max_width=max(console.width - sum(widths) - 2 * len(widths), 10))
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if result.truncated:
        console.print(f"[yellow]truncated at {plural(len(result.rows), 'row')} (use --limit)[/]")


@app.command("export")
def export_cmd(
    ctx: typer.Context,
    parquet: Path = typer.Option(..., "--parquet", help="Directory for one file per table."),
    db: Path | None = DB_OPTION,
) -> None:
    """Write every projection table as Parquet (from the file, or via the query service)."""
    from cflow.projections.export import export_file, export_via_service

    c = state(ctx)
    path = _db_path(c.swarm, db)

    async def body() -> dict[str, int]:
        import anyio.to_thread

        from cflow.errors import Unavailable

        if path.exists():
            try:
                return await anyio.to_thread.run_sync(export_file, path, parquet)
            except Unavailable:
                pass  # a projector holds the file: ask it instead
        from cflow.streams import connect
        from cflow.swarm import close_quietly

        nc = await connect(c.url, name="cflow:cfctl-export")
        try:
            return await export_via_service(nc, c.swarm, parquet)
        finally:
            await close_quietly(nc)

    counts = run(ctx, body)
    emit(ctx, counts, "\n".join(f"{t}: {plural(n, 'row')} -> {parquet / (t + '.parquet')}"
                                for t, n in counts.items()))
