"""`cfctl agent register / list / show`: the swarm's agents."""

from __future__ import annotations

import sys
from typing import Any

import typer

from cflow.cli.app import app, console, emit, fields_summary, identity, run, state, utc_text

agent_app = typer.Typer(help="Agents: registry, presence, what they hold.", no_args_is_help=True)
app.add_typer(agent_app, name="agent")


def _when(ms: int | None) -> str:
    return utc_text(ms) if ms else "-"


@agent_app.command("register")
def register(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Agent name (letters, digits, - and _)."),
    capability: list[str] = typer.Option(
        [], "--capability", "-c", help="A capability (repeat or comma-separate)."),
    label: list[str] = typer.Option([], "--label", help="KEY=VALUE (repeatable)."),
) -> None:
    """Register an agent (no presence: a process keeps that alive, e.g. `cfctl worker`)."""
    from cflow.agents import capabilities_of
    from cflow.cli.app import EXIT_USAGE, fail

    c = state(ctx)
    labels: dict[str, str] = {}
    for item in label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--label wants KEY=VALUE, got {item!r}", EXIT_USAGE)
        labels[key] = value

    async def body() -> dict[str, Any]:
        from cflow.swarm import Swarm

        async with Swarm.connect(c.url, swarm=c.swarm, agent=name) as swarm:
            await swarm.agents.register(name, capabilities_of(capability), labels, runtime="cli")
            return (await swarm.agents.get(name)).to_dict()

    info = run(ctx, body)
    emit(ctx, info, f"registered {info['name']} "
                    f"(capabilities: {', '.join(info['capabilities']) or 'none'})")


@agent_app.command("list")
def list_agents(ctx: typer.Context) -> None:
    """Every agent of the swarm with its status and presence."""
    c = state(ctx)

    async def body() -> list[dict[str, Any]]:
        from cflow.swarm import Swarm

        async with Swarm.connect(c.url, swarm=c.swarm, agent=identity()) as swarm:
            return [a.to_dict() for a in await swarm.agents.list()]

    agents = run(ctx, body)

    def human(rows: list[dict[str, Any]]) -> None:
        from rich.table import Table

        table = Table("agent", "status", "present", "task", "capabilities", "runtime", "host",
                      "last change", box=None)
        for a in rows:
            table.add_row(a["name"], a["status"], "yes" if a["present"] else "no",
                          a["task_id"] or "-", ",".join(a["capabilities"]) or "-",
                          a["runtime"] or "-", a["host"] or "-", _when(a["changed_ms"]))
        if rows:
            console().print(table)
        else:
            sys.stderr.write("no agents\n")

    emit(ctx, agents, human)


@agent_app.command("show")
def show(ctx: typer.Context, name: str = typer.Argument(..., help="Agent name.")) -> None:
    """One agent: status, presence, current leases, history and stats."""
    c = state(ctx)

    async def body() -> dict[str, Any]:
        from cflow.streams import StoredEvent, names
        from cflow.swarm import Swarm

        async with Swarm.connect(c.url, swarm=c.swarm, agent=identity()) as swarm:
            info = (await swarm.agents.get(name)).to_dict()
            tasks = [t for t in await swarm.tasks.list() if t.owner == name]
            info["leases"] = [{"task_id": t.task_id, "title": t.title, "epoch": t.epoch,
                               "attempt": t.attempt} for t in tasks if t.status == "claimed"]
            finished = [t for t in tasks if t.status in ("completed", "failed")]
            cost = sum(t.cost_usd or 0.0 for t in finished)
            info["stats"] = {
                "completed": sum(t.status == "completed" for t in finished),
                "failed": sum(t.status == "failed" for t in finished),
                "cost_usd": round(cost, 6),
            }
            items = await swarm.log.read(names.event_subject(swarm.name, "agent", name))
            info["history"] = [
                {"seq": i.seq, "type": i.event.type, "actor": i.event.actor,
                 "data": {k: v for k, v in _fields(i.event.data).items() if v not in (None, "")}}
                for i in items if isinstance(i, StoredEvent)][-50:]
            return info

    info = run(ctx, body)

    def human(a: dict[str, Any]) -> None:
        where = ", ".join(part for part in (
            " on ".join(p for p in (a["runtime"], a["host"]) if p),
            f"pid {a['pid']}" if a["pid"] else "") if part)
        presence = "present" if a["present"] else "not present"
        lines = [
            ("name", a["name"]),
            ("status", a["status"] + (f" on {a['task_id']}" if a["task_id"] else "")),
            ("presence", presence + (f" ({where})" if where else "")),
            ("capabilities", ", ".join(a["capabilities"]) or "none"),
        ]
        if a["labels"]:
            lines.append(("labels", ", ".join(f"{k}={v}" for k, v in sorted(
                a["labels"].items()))))
        change = _when(a["changed_ms"]) + " UTC"
        lines.append(("last change", change + (f" ({a['reason']})" if a["reason"] else "")
                      if a["changed_ms"] else "never"))
        lines.append(("registered", _when(a["registered_ms"]) + " UTC" if a["registered_ms"]
                      else "never"))
        leases = [f"{lease['task_id']} (epoch {lease['epoch']}, attempt {lease['attempt']}):"
                  f" {lease['title']}" for lease in a["leases"]]
        lines.append(("leases", leases[0] if leases else "none"))
        lines.extend(("", more) for more in leases[1:])
        s = a["stats"]
        lines.append(("stats", f"{s['completed']} completed, {s['failed']} failed, "
                               f"cost ${s['cost_usd']:.4f}"))
        out = sys.stdout
        for label, value in lines:
            out.write(f"{label + ':' if label else '':<14}{value}\n")
        if a["history"]:
            out.write("history:\n")
        for h in a["history"]:
            line = f"  {h['seq']:>6}  {h['type']:<20}  by {h['actor']}  {fields_summary(h['data'])}"
            out.write(line.rstrip() + "\n")

    emit(ctx, info, human)


def _fields(data: Any) -> dict[str, Any]:
    import msgspec

    out: dict[str, Any] = msgspec.to_builtins(data)
    return out
