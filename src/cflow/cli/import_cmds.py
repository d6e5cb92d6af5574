"""`cfctl import claude-flow PATH`: bring an existing claude-flow installation over."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cflow.cli.app import app, emit, plural, run, state

if TYPE_CHECKING:
    from cflow.importer import ImportReport, Source

import_app = typer.Typer(help="Import data from other tools.", no_args_is_help=True)
app.add_typer(import_app, name="import")


@import_app.command("claude-flow")
def claude_flow(
    ctx: typer.Context,
    path: Path = typer.Argument(Path("."), help="Project directory (with .swarm/, .hive-mind/)."),
) -> None:
    """Import memory (.swarm/memory.db) and agents, tasks, memory (.hive-mind/hive.db).

    Re-running it imports nothing twice.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from cflow.importer import Importer, read_source

    c = state(ctx)
    holder: dict[str, Source] = {}

    async def read() -> None:
        holder["source"] = read_source(path)

    run(ctx, read)  # a missing or malformed file becomes one line on stderr
    source = holder["source"]
    console = Console(stderr=True)

    async def body() -> ImportReport:
        from cflow.swarm import Swarm

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      console=console, transient=c.json, disable=c.json) as progress:
            bar = progress.add_task("importing claude-flow", total=source.total)

            def step(kind: str) -> None:
                progress.update(bar, advance=1, description=f"importing {kind}")

            async with Swarm.connect(c.url, swarm=c.swarm, agent="import") as swarm:
                report: ImportReport = await Importer(swarm, on_step=step).run(source)
                return report

    report = run(ctx, body)
    data = {"files": source.files, **report.to_dict()}

    def human(_: Any) -> None:
        imp = report.imported
        typer.echo(f"imported {plural(imp['memory'], 'memory entry', 'memory entries')}, "
                   f"{plural(imp['agents'], 'agent')}, {plural(imp['tasks'], 'task')} "
                   f"from {', '.join(source.files)}")
        for reason, count in sorted(report.skipped.items()):
            typer.echo(f"skipped {count}: {reason}")
        for note in report.notes:
            typer.echo(f"note: {note}")

    emit(ctx, data, human)
