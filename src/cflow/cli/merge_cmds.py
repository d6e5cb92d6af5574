"""`cfctl merge-queue` (run a merger), `cfctl merges` (the queue; remove, skip, requeue)
and `cfctl task checkpoint`. The ``merges`` kind of `cfctl report` is in projection_cmds."""

from __future__ import annotations

import sys
from typing import Any

import typer

from cflow.cli.app import (
    EXIT_USAGE,
    agent_name,
    app,
    emit,
    fail,
    group,
    identity,
    plural,
    run,
    state,
)


@app.command("merge-queue")
def merge_queue(
    ctx: typer.Context,
    repo: str = typer.Option(..., "--repo", help="The shared remote (a directory or a URL)."),
    target: str = typer.Option("main", "--target", help="The branch merged into."),
    check: str | None = typer.Option(
        None, "--check", help="Shell command that must pass on the merge result."),
    check_timeout: float = typer.Option(600.0, "--check-timeout", min=1.0),
    lease_ttl: float = typer.Option(
        10.0, "--lease-ttl", min=1.0, help="Seconds until another merger takes over a dead one."),
    name: str | None = typer.Option(None, "--name", help="Agent name (default: host-pid)."),
    until_idle: bool = typer.Option(
        False, "--until-idle", help="Exit when nothing is queued and no task is open."),
    max_rejections: int = typer.Option(
        3, "--max-rejections", min=1,
        help="Rejections of one task's chain before it fails instead of being retried."),
    mode: str = typer.Option(
        "merge", "--mode", help="merge: a --no-ff merge commit per task; rebase: the "
        "branch's commits replayed on the target (linear history; a branch with merge "
        "commits is squashed into one)."),
    delete_merged: bool = typer.Option(
        False, "--delete-merged", help="Delete a merged task branch from the remote "
        "(only if still at the merged commit)."),
) -> None:
    """Run the merge queue: merge finished task branches one at a time, check, push.

    One merger per target holds the queue (a swarm-wide lease); start several on
    different machines and the others wait, taking over within --lease-ttl when the
    holder dies.
    """
    c = state(ctx)
    who = agent_name(name)
    if mode not in ("merge", "rebase"):
        fail(f"--mode must be merge or rebase, not {mode!r}", EXIT_USAGE)

    def show(kind: str, text: str) -> None:
        if not c.json:
            sys.stderr.write(f"[{who}] {kind}: {text}\n")
            sys.stderr.flush()

    async def body() -> dict[str, Any]:
        from cflow.gitflow.merger import Merger
        from cflow.swarm import Swarm

        async with Swarm.connect(c.url, swarm=c.swarm, agent=who) as swarm:
            merger = Merger(swarm, repo, target=target, check=check,
                            check_timeout_s=check_timeout, lease_ttl_s=lease_ttl,
                            max_rejections=max_rejections, delete_merged=delete_merged,
                            mode="rebase" if mode == "rebase" else "merge",
                            on_event=show)
            merger.install_signal_handlers()
            stats = await merger.run(until_idle=until_idle)
            return {"agent": who, **stats.to_dict()}

    def human(d: dict[str, Any]) -> None:
        sys.stderr.write(f"[{who}] stopped: {d['merged']} merged, {d['rejected']} rejected, "
                         f"{d['recovered']} found merged already\n")

    emit(ctx, run(ctx, body), human)


def _summary_lines(d: dict[str, Any]) -> None:
    """``merges --summary`` for a person."""
    causes = ", ".join(f"{cause} {n}" for cause, n in d["causes"].items())
    lead = (f"median {d['lead_time_median_s']:g} s, max {d['lead_time_max_s']:g} s"
            if d["lead_time_median_s"] is not None else "nothing merged yet")
    sys.stdout.write(
        f"{plural(d['requests'], 'request')}: {d['queued']} queued, {d['merged']} merged, "
        f"{d['rejected']} rejected, {d['removed']} removed\n"
        f"rejection rate: {d['rejection_rate']:.0%}" + (f" ({causes})" if causes else "")
        + f"\nlead time: {lead}\n")


merges_app = typer.Typer(help="The merge queue: list it, remove, skip or requeue a request.",
                         invoke_without_command=True, no_args_is_help=False)
app.add_typer(merges_app, name="merges")


@merges_app.callback()
def merges(
    ctx: typer.Context,
    show_all: bool = typer.Option(False, "--all", help="Also merged, rejected, removed."),
    summary: bool = typer.Option(
        False, "--summary", help="Lead time, rejection rate and causes instead of the list."),
) -> None:
    """List the merge queue (priority, then arrival), or its summary."""
    if ctx.invoked_subcommand is not None:
        return
    c = state(ctx)

    async def body() -> list[Any]:
        from cflow.gitflow.merger import read_queue
        from cflow.swarm import Swarm

        async with Swarm.connect(c.url, swarm=c.swarm, agent=agent_name(None)) as swarm:
            return list((await read_queue(swarm)).values())

    requests = run(ctx, body)
    if summary:
        from cflow.gitflow.report import merge_summary

        emit(ctx, merge_summary(requests), _summary_lines)
        return
    rows = sorted((r for r in requests if show_all or r.status == "queued"),
                  key=lambda r: (r.status != "queued", -r.priority, r.seq))

    def human(items: list[dict[str, Any]]) -> None:
        if not items:
            sys.stderr.write("merge queue empty\n")
        for r in items:
            extra = r["commit"][:12] if r["commit"] else (r["cause"] or "")
            if r["removed_by"]:
                extra = f"removed by {r['removed_by']}"
            sys.stdout.write(f"{r['status']:<9} {r['task_id']}  {r['branch']} "
                             f"{r['head'][:12]} -> {r['target']}  {extra}  {r['title']}\n")

    emit(ctx, [r.to_dict() for r in rows], human)


def _queue_op(ctx: typer.Context, verb: str, task_ref: str, reason: str,
              agent: str | None) -> None:
    c = state(ctx)
    who = identity(agent)

    async def body() -> dict[str, Any]:
        from cflow.cli.task_cmds import resolve
        from cflow.gitflow import queue_ops
        from cflow.swarm import Swarm

        operate = {"remove": queue_ops.remove_request, "skip": queue_ops.skip_request,
                   "requeue": queue_ops.requeue_request}[verb]
        async with Swarm.connect(c.url, swarm=c.swarm, agent=who) as swarm:
            task_id = await resolve(swarm, task_ref)
            return (await operate(swarm, task_id, reason)).to_dict()

    r = run(ctx, body)
    done = {"remove": "removed from", "skip": "sent to the back of",
            "requeue": "put back in"}[verb]
    emit(ctx, {**r, "by": who}, f"{r['task_id']} ({r['branch']}) {done} the merge queue "
         f"of {r['target']} by {who}")


REASON = typer.Option("", "--reason", help="Why (recorded with the event).")
AGENT = typer.Option(None, "--agent", help="Who acts (default $CFLOW_AGENT, else user-host).")
TASK = typer.Argument(..., help="The task whose merge request it is (id or unique prefix).")


@merges_app.command("remove")
def merges_remove(ctx: typer.Context, task_id: str = TASK, reason: str = REASON,
                  agent: str | None = AGENT) -> None:
    """Take a request out of the queue: it is not merged (unless requeued).

    Refused once a merger recorded its intent to push it (the push may have landed).
    A merger checking it when the removal is stored drops it.
    """
    _queue_op(ctx, "remove", task_id, reason, agent)


@merges_app.command("skip")
def merges_skip(ctx: typer.Context, task_id: str = TASK, reason: str = REASON,
                agent: str | None = AGENT) -> None:
    """Send a queued request behind the others of its priority (a merger checking it
    drops it and takes the next one first)."""
    _queue_op(ctx, "skip", task_id, reason, agent)


@merges_app.command("requeue")
def merges_requeue(ctx: typer.Context, task_id: str = TASK, reason: str = REASON,
                   agent: str | None = AGENT) -> None:
    """Put a removed request back at the end of the queue."""
    _queue_op(ctx, "requeue", task_id, reason, agent)


@app.command("merge-gate")
def merge_gate(
    ctx: typer.Context,
    task_id: str = typer.Argument(..., help="The task whose merge others wait for."),
) -> None:
    """Print the id of a gate the merger opens once TASK_ID's work is merged (made if needed).

    Dependents that must wait for the merge, not only the completion:
    cfctl task add "B" --after "$(cfctl merge-gate A)"
    """
    c = state(ctx)

    async def body() -> str:
        from cflow.cli.task_cmds import resolve
        from cflow.gitflow.merger import create_merge_gate
        from cflow.swarm import Swarm

        nonlocal task_id
        async with Swarm.connect(c.url, swarm=c.swarm, agent=agent_name(None)) as swarm:
            task_id = await resolve(swarm, task_id)  # a unique prefix will do
            return await create_merge_gate(swarm, task_id)

    gate = run(ctx, body)
    emit(ctx, {"gate": gate, "task_id": task_id}, gate)


task_app = group("task", "Create, claim and finish tasks.")


@task_app.command("checkpoint")
def task_checkpoint(
    ctx: typer.Context,
    task_id: str = typer.Argument(..., help="The task you hold."),
    data: str = typer.Argument(..., help="What the next attempt needs ('-': read stdin)."),
    epoch: int = typer.Option(..., "--epoch", help="Your claim's epoch ($CFLOW_EPOCH)."),
    agent: str | None = typer.Option(None, "--agent", help="The holder (default $CFLOW_AGENT)."),
) -> None:
    """Save a checkpoint for the next attempt (it gets it as $CFLOW_CHECKPOINT); holder only."""
    c = state(ctx)
    if epoch <= 0:
        fail("--epoch must be the positive epoch of your claim", EXIT_USAGE)
    text = sys.stdin.read() if data == "-" else data
    who = agent_name(agent)

    async def body() -> dict[str, Any]:
        from cflow.cli.task_cmds import resolve
        from cflow.swarm import Swarm

        nonlocal task_id
        async with Swarm.connect(c.url, swarm=c.swarm, agent=who) as swarm:
            task_id = await resolve(swarm, task_id)  # a unique prefix will do
            seq = await swarm.tasks.note(task_id, text, epoch=epoch, artifact="checkpoint")
            return {"task_id": task_id, "epoch": epoch, "seq": seq}

    result = run(ctx, body)
    emit(ctx, result, f"checkpoint of {task_id} stored (seq {result['seq']})")
