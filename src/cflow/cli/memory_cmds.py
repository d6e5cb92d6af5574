"""`cfctl memory set/get/delete/list/search/history`: shared memory from the shell."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import typer

from cflow.cli.app import app, emit, identity, run, state
from cflow.cli.task_cmds import REQUEST_ID_OPTION, maybe_stored, new_request_id

if TYPE_CHECKING:
    from cflow.memory import HistoryItem, MemoryEntry, SearchHit

memory_app = typer.Typer(help="Shared, namespaced memory with TTL, history and search.",
                         no_args_is_help=True)
app.add_typer(memory_app, name="memory")

NS_OPTION = typer.Option("default", "--namespace", "-n", help="Namespace.")


def _swarm(ctx: typer.Context) -> Any:

    from cflow.swarm import Swarm

    c = state(ctx)
    return Swarm.connect(c.url, swarm=c.swarm,
                         agent=identity(c.agent))


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


@memory_app.command("set")
def set_(
    ctx: typer.Context,
    key: str,
    value: str,
    namespace: str = NS_OPTION,
    ttl: float | None = typer.Option(None, "--ttl", help="Expire after S seconds."),
    tag: list[str] = typer.Option([], "--tag", "-t", help="Tag (repeatable)."),
    as_json: bool = typer.Option(False, "--json-value", help="VALUE is JSON."),
    version: int | None = typer.Option(
        None, "--if-version", help="Compare-and-set: only if at this version (0: absent)."),
    request_id: str | None = REQUEST_ID_OPTION,
) -> None:
    """Store VALUE under KEY; prints the new version."""
    rid = request_id or new_request_id()

    async def body() -> MemoryEntry:
        async with _swarm(ctx) as swarm:
            with maybe_stored("memory write", rid):
                entry: MemoryEntry = await swarm.memory.put(
                    namespace, key, value, tags=tag, ttl_s=ttl, expected_version=version,
                    content_type="json" if as_json else "text", request_id=rid)
            return entry

    entry = run(ctx, body)
    emit(ctx, entry.to_dict(), f"{entry.namespace}/{entry.key} version {entry.version}")


@memory_app.command("get")
def get(ctx: typer.Context, key: str, namespace: str = NS_OPTION) -> None:
    """Print the value of KEY (exit 5 if absent or expired)."""

    async def body() -> MemoryEntry:
        async with _swarm(ctx) as swarm:
            entry: MemoryEntry = await swarm.memory.get(namespace, key)
            return entry

    entry = run(ctx, body)
    emit(ctx, entry.to_dict(), entry.value)


@memory_app.command("delete")
def delete(
    ctx: typer.Context,
    key: str,
    namespace: str = NS_OPTION,
    version: int | None = typer.Option(None, "--if-version", help="Only if at this version."),
) -> None:
    """Delete KEY."""

    async def body() -> int:
        async with _swarm(ctx) as swarm:
            revision: int = await swarm.memory.delete(namespace, key, expected_version=version)
            return revision

    revision = run(ctx, body)
    emit(ctx, {"namespace": namespace, "key": key, "version": revision},
         f"deleted {namespace}/{key}")


@memory_app.command("list")
def list_(
    ctx: typer.Context,
    namespace: str | None = typer.Option(None, "--namespace", "-n", help="Only this namespace."),
    tag: str | None = typer.Option(None, "--tag", "-t", help="Only entries with this tag."),
) -> None:
    """List live entries."""

    async def body() -> list[MemoryEntry]:
        async with _swarm(ctx) as swarm:
            entries: list[MemoryEntry] = await swarm.memory.list(namespace=namespace, tag=tag)
            return entries

    entries = run(ctx, body)

    def human(_: Any) -> None:
        if not entries:
            typer.echo("no entries", err=True)
        for e in entries:
            tags = f"  [{', '.join(e.tags)}]" if e.tags else ""
            value = " ".join(e.value.split())
            value = value if len(value) <= 60 else value[:59] + "…"
            typer.echo(f"{e.namespace}/{e.key}  v{e.version}{tags}  {value}")

    emit(ctx, [e.to_dict() for e in entries], human)


@memory_app.command("search")
def search(
    ctx: typer.Context,
    query: str,
    namespace: str | None = typer.Option(None, "--namespace", "-n", help="Only this namespace."),
    tag: str | None = typer.Option(None, "--tag", "-t", help="Only entries with this tag."),
    limit: int = typer.Option(10, "--limit", "-k", help="How many results."),
) -> None:
    """Ranked full-text search (BM25 over key, value and tags)."""

    async def body() -> list[SearchHit]:
        async with _swarm(ctx) as swarm:
            hits: list[SearchHit] = await swarm.memory.search(query, namespace=namespace,
                                                              tag=tag, limit=limit)
            return hits

    hits = run(ctx, body)

    def human(_: Any) -> None:
        if not hits:
            typer.echo("no matches", err=True)
        for h in hits:
            typer.echo(f"{h.score:7.3f}  {h.namespace}/{h.key}  {h.snippet}")

    emit(ctx, [h.to_dict() for h in hits], human)


@memory_app.command("history")
def history(ctx: typer.Context, key: str, namespace: str = NS_OPTION) -> None:
    """Every version of KEY, oldest first."""

    async def body() -> list[HistoryItem]:
        async with _swarm(ctx) as swarm:
            items: list[HistoryItem] = await swarm.memory.history(namespace, key)
            return items

    items = run(ctx, body)

    def human(_: Any) -> None:
        from cflow.hlc import Timestamp

        for h in items:
            when = _when(Timestamp.parse(h.hlc).wall_ms)
            shown = json.dumps(h.value) if h.value is not None else "(deleted)"
            typer.echo(f"v{h.version}  {when}  {h.actor}  {h.operation}  {shown}")

    emit(ctx, [h.to_dict() for h in items], human)
