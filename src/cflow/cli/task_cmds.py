"""`cfctl task ...`: the claim path from the shell. Plain output is the essential value."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cflow.cli.app import (
    EXIT_NOTHING,
    console,
    emit,
    exit_code_for,
    fail,
    group,
    human_time,
    identity,
    plural,
    run,
    say,
    state,
)

if TYPE_CHECKING:
    from cflow.tasks import TaskState

task_app = group("task", "Create, claim and finish tasks.")


def _swarm(ctx: typer.Context, agent: str | None = None) -> Any:
    from cflow.swarm import Swarm

    c = state(ctx)
    return Swarm.connect(c.url, swarm=c.swarm, agent=identity(agent or c.agent))


async def resolve(swarm: Any, ref: str, kind: str = "task") -> str:
    """The whole task id for ``ref``: a whole id, or a unique prefix of one (as git does).

    Raises:
        NotFound: no task id starts with ``ref``.
        InvalidInput: several do (they are named).
    """
    from cflow.cli.ids import WHOLE_ID_LENGTH, pick

    if len(ref) >= WHOLE_ID_LENGTH and kind == "task":
        return ref  # the command itself says "task not found"
    await swarm.tasks.ensure_board()
    return pick(kind, ref, swarm.tasks.board.tasks, noun="task")


def human_value(value: Any) -> str:
    """A field as a person reads it: lists joined, nothing shown as '-', no reprs."""
    if value is None or (isinstance(value, (str, list, tuple, dict)) and not value):
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _labels(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--label wants KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def _row(s: TaskState) -> dict[str, Any]:
    return s.to_dict()


def new_request_id() -> str:
    import uuid

    return f"cli-{uuid.uuid4().hex}"


@contextlib.contextmanager
def maybe_stored(what: str, request_id: str) -> Iterator[None]:
    """A write that timed out may still land once NATS is back: say so, with the request
    id whose retry cannot write twice."""
    from cflow.errors import Unavailable

    try:
        yield
    except Unavailable as err:
        cause = err.__cause__ if getattr(err, "maybe_stored", False) else None
        raise Unavailable(
            f"{cause or err}; the {what} may have been stored: run the same command again "
            f"with --request-id {request_id} (that retry never writes twice)",
            request_id=request_id, maybe_stored=True) from err


AGENT_OPTION = typer.Option(
    None, "--agent", envvar="CFLOW_AGENT",
    help="Act as this agent (the holder: only it may renew or finish its claim).")

REQUEST_ID_OPTION = typer.Option(
    None, "--request-id",
    help="Names this write: a retry with the same id never writes twice (default: a new id, "
         "shown if the backend does not answer).")


@task_app.command("add")
def add(
    ctx: typer.Context,
    title: str,
    body: str = typer.Option("", "--body", "-b", help="Task description (the prompt)."),
    priority: int = typer.Option(0, "--priority", "-p", help="Higher runs first."),
    needs: list[str] = typer.Option(
        [], "--needs", help="Required capability (repeat or comma-separate)."),
    after: list[str] = typer.Option([], "--after", help="Depends on TASK_ID (repeatable)."),
    parent: str | None = typer.Option(None, "--parent", help="Parent task id."),
    lease_ttl: float = typer.Option(30.0, "--lease-ttl", help="Lease TTL in seconds (>= 1)."),
    max_attempts: int = typer.Option(3, "--max-attempts", help="Attempts before 'failed'."),
    backoff: float = typer.Option(1.0, "--backoff", help="Initial retry backoff, seconds."),
    backoff_multiplier: float = typer.Option(2.0, "--backoff-multiplier"),
    backoff_max: float = typer.Option(60.0, "--backoff-max", help="Backoff cap, seconds."),
    timeout: float | None = typer.Option(None, "--timeout", help="Start-to-close timeout, s."),
    key: str | None = typer.Option(None, "--key", help="Idempotency key: same key, same task."),
    label: list[str] = typer.Option([], "--label", help="KEY=VALUE label (repeatable)."),
    gate: bool = typer.Option(False, "--gate", help="A human gate: approved, never claimed."),
    request_id: str | None = REQUEST_ID_OPTION,
) -> None:
    """Create a task; prints its id."""
    from cflow.agents import capabilities_of

    labels = _labels(label)
    # An idempotency key names the task already; else the request id does.
    rid = request_id or (None if key else new_request_id())

    async def body_() -> TaskState:
        async with _swarm(ctx) as swarm:
            deps = [await resolve(swarm, d, kind="dependency") for d in after]
            parent_id = await resolve(swarm, parent) if parent else None
            with maybe_stored("task", rid) if rid else contextlib.nullcontext():
                created: TaskState = await swarm.tasks.create(
                    title, body=body, priority=priority, capabilities=capabilities_of(needs),
                    depends_on=deps, parent_id=parent_id, lease_ttl_s=lease_ttl,
                    max_attempts=max_attempts, backoff_initial_s=backoff,
                    backoff_multiplier=backoff_multiplier,
                    backoff_max_s=backoff_max, start_to_close_s=timeout, idempotency_key=key,
                    labels=labels, kind="gate" if gate else "task", request_id=rid,
                )
            return created

    created = run(ctx, body_)
    emit(ctx, _row(created), created.task_id)


@task_app.command("import")
def import_(ctx: typer.Context, file: Path = typer.Argument(..., help="JSON Lines file.")) -> None:
    """Create tasks from a JSON Lines file; prints their ids (schema: README).

    Every line is checked first (unknown fields and wrong types are refused,
    nothing is created if any line is bad). Re-importing is idempotent per line.
    """
    from cflow.agents import capabilities_of
    from cflow.errors import CflowError
    from cflow.task_import import parse_task_lines

    try:
        text = file.read_text()
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}")
    try:
        lines = parse_task_lines(text, str(file))
    except CflowError as err:
        fail(str(err), exit_code_for(err))

    async def body_() -> tuple[list[str], int]:
        from cflow.errors import InvalidInput, NotFound
        from cflow.leases import task_id_for_key

        refs: dict[str, str] = {}
        async with _swarm(ctx) as swarm:
            # Dependencies on existing tasks are checked before anything is created.
            outside: dict[str, str] = {}
            local = {line.id for _, line, _ in lines if line.id is not None}
            for number, line, _ in lines:
                named = [*(("dependency", ref) for ref in line.after),
                         *([("parent task", line.parent)] if line.parent else [])]
                for kind, ref in named:
                    if ref in local or ref in outside:
                        continue
                    try:  # whole ids are looked up too (create would refuse them too late)
                        outside[ref] = await resolve(swarm, ref, kind=kind)
                    except NotFound:
                        raise NotFound(f"{file}:{number}: {kind}",
                                       f"{ref} (no task, nor an earlier line's id)") from None
                    except InvalidInput as exc:
                        raise InvalidInput(f"{file}:{number}: {exc}") from None
            earlier: set[str] = set()
            for number, line, _ in lines:
                for ref in line.after:
                    if ref in local and ref not in earlier:
                        raise InvalidInput(f"{file}:{number}: after {ref!r} names a later line")
                if line.id is not None:
                    earlier.add(line.id)
            ids: list[str] = []
            existing = 0  # lines whose task exists already (an earlier import made it)
            for number, line, key in lines:
                with contextlib.suppress(NotFound):
                    await swarm.tasks.get(task_id_for_key(swarm.name, key))
                    existing += 1
                deps = [refs.get(d) or outside[d] for d in line.after]
                parent = (refs.get(line.parent) or outside[line.parent]) if line.parent else None
                try:
                    made = await swarm.tasks.create(
                        line.title, body=line.body, priority=line.priority,
                        capabilities=capabilities_of(line.needs), depends_on=deps,
                        parent_id=parent, lease_ttl_s=line.lease_ttl,
                        max_attempts=line.max_attempts, start_to_close_s=line.timeout,
                        idempotency_key=key, labels=line.labels)
                except InvalidInput as exc:
                    raise InvalidInput(f"{file}:{number}: {exc}") from None
                if line.id is not None:
                    refs[line.id] = made.task_id
                ids.append(made.task_id)
        return ids, existing

    ids, existing = run(ctx, body_)
    new = len(ids) - existing
    if existing:
        say(ctx, f"imported {plural(new, 'new task')} from {file} ({existing} already there)")
    else:
        say(ctx, f"imported {plural(new, 'task')} from {file}")
    # "created": every line's task id, in file order, new or not.
    emit(ctx, {"created": ids, "new": new, "existing": existing}, "\n".join(ids))


@task_app.command("list")
def list_(
    ctx: typer.Context,
    status: str | None = typer.Option(None, "--status", "-s", help="Only this status."),
    limit: int = typer.Option(50, "--limit", "-n"),
) -> None:
    """List tasks (oldest first): from the DuckDB projection when a projector serves the
    swarm (read-your-writes), else folded from the event log."""

    async def body_() -> list[dict[str, Any]]:
        from cflow.errors import Unavailable

        async with _swarm(ctx) as swarm:
            try:
                return await _list_from_projection(swarm, status, limit)
            except Unavailable:
                found: list[TaskState] = await swarm.tasks.list(status=status, limit=limit)
                return [_row(s) for s in found]

    rows = run(ctx, body_)

    def human(_: Any) -> None:
        from rich.table import Table

        if not rows:
            say(ctx, f"no {status} tasks" if status else "no tasks")
            return
        table = Table("id", "status", "pri", "title", "owner", "attempt", box=None)
        for r in rows:
            table.add_row(r["task_id"], r["status"], str(r["priority"]), r["title"],
                          r["owner"] or "", f"{r['attempt']}/{r['max_attempts']}")
        console().print(table)

    emit(ctx, rows, human)


async def _list_from_projection(swarm: Any, status: str | None, limit: int
                                ) -> list[dict[str, Any]]:
    """Tasks from the projection, once it has applied everything stored now."""
    where = "WHERE status = ?" if status else ""
    params = [status] if status else []
    from cflow.projections.query import QueryClient

    result = await QueryClient(swarm.nc, swarm.name).query(
        f"SELECT * FROM tasks {where} ORDER BY created_seq LIMIT {int(limit)}",
        limit=limit, wait_for_seq=await swarm.log.stream_last_seq(), timeout_s=5.0,
        params=params, fallback=True)
    rows: list[dict[str, Any]] = result.dicts()
    for row in rows:
        if isinstance(row.get("labels"), str):
            row["labels"] = json.loads(row["labels"])
    return rows


@task_app.command("show")
def show(ctx: typer.Context, task_id: str) -> None:
    """A task's fields and the timeline of its events."""

    async def body_() -> tuple[TaskState, list[dict[str, Any]]]:
        from cflow.hlc import Timestamp

        async with _swarm(ctx) as swarm:
            whole = await resolve(swarm, task_id)
            task = await swarm.tasks.get(whole)
            timeline = [
                {"seq": item.seq, "type": item.event.type, "actor": item.event.actor,
                 "hlc": item.event.hlc, "at": Timestamp.parse(item.event.hlc).readable()}
                for item in await swarm.tasks.history(whole)
            ]
            return task, timeline

    task, timeline = run(ctx, body_)

    def human(_: Any) -> None:
        from rich.table import Table

        out = console()
        fields = Table(box=None, show_header=False)
        for name in ("task_id", "title", "status", "priority", "capabilities", "labels",
                     "depends_on", "owner", "epoch", "attempt", "max_attempts", "lease_ttl_s",
                     "result", "error", "reason"):
            fields.add_row(name.replace("_", " "), human_value(getattr(task, name)))
        out.print(fields)
        events = Table("seq", "event", "actor", "at", box=None)
        for row in timeline:
            events.add_row(str(row["seq"]), row["type"], row["actor"], human_time(row["hlc"]))
        out.print(events)

    emit(ctx, {**_row(task), "timeline": timeline}, human)


@task_app.command("claim")
def claim(
    ctx: typer.Context,
    task_id: str | None = typer.Argument(None, help="Claim this task; else the best ready one."),
    agent: str | None = AGENT_OPTION,
    capability: list[str] = typer.Option(
        [], "--capability", "-c", help="What I can do (repeat or comma-separate)."),
    wait: float = typer.Option(0.0, "--wait", help="Wait up to S seconds for work."),
) -> None:
    """Claim a task; prints `TASK_ID EPOCH`, exit code 3 when nothing was claimed."""
    from cflow.agents import capabilities_of

    async def body_() -> dict[str, Any] | None:
        async with _swarm(ctx, agent) as swarm:
            wanted = await resolve(swarm, task_id) if task_id else None
            lease = await swarm.tasks.claim(wanted, agent=agent or swarm.agent,
                                            capabilities=capabilities_of(capability), wait=wait)
            if lease is None:
                return None
            return {**_row(lease.task), "epoch": lease.epoch, "attempt": lease.attempt}

    got = run(ctx, body_)
    if got is None:
        say(ctx, "nothing to claim" + (f" within {wait:g} s" if wait else ""))
        emit(ctx, {"claimed": None}, lambda _: None)
        raise typer.Exit(EXIT_NOTHING)
    emit(ctx, got, f"{got['task_id']} {got['epoch']}")


@task_app.command("heartbeat")
def heartbeat(ctx: typer.Context, task_id: str,
              epoch: int = typer.Option(..., "--epoch", "-e", help="Epoch from claim."),
              agent: str | None = AGENT_OPTION) -> None:
    """Renew a lease; prints ok or cancelled (exit 4 when the lease is lost)."""

    async def body_() -> str:
        async with _swarm(ctx, agent) as swarm:
            status: str = await swarm.tasks.heartbeat(await resolve(swarm, task_id), epoch)
            return status

    status = run(ctx, body_)
    emit(ctx, {"task_id": task_id, "epoch": epoch, "status": status}, status)


@task_app.command("complete")
def complete(ctx: typer.Context, task_id: str,
             epoch: int = typer.Option(..., "--epoch", "-e"),
             result: str | None = typer.Option(None, "--result", "-r"),
             agent: str | None = AGENT_OPTION) -> None:
    """Complete a claimed task (fenced by epoch; exit 4 if the lease was lost)."""

    async def body_() -> TaskState:
        async with _swarm(ctx, agent) as swarm:
            # A CLI-only swarm may have no maintainer: fold the board so this process
            # makes the task's dependents ready itself.
            await swarm.tasks.ensure_board()
            done: TaskState = await swarm.tasks.complete(await resolve(swarm, task_id), epoch,
                                                         result)
            return done

    done = run(ctx, body_)
    emit(ctx, _row(done), done.status)


@task_app.command("fail")
def fail_(ctx: typer.Context, task_id: str,
          epoch: int = typer.Option(..., "--epoch", "-e"),
          error: str = typer.Option("failed", "--error"),
          no_retry: bool = typer.Option(False, "--no-retry", help="Fail for good."),
          agent: str | None = AGENT_OPTION) -> None:
    """Fail the attempt: retried after backoff unless --no-retry or attempts are used up."""

    async def body_() -> TaskState:
        async with _swarm(ctx, agent) as swarm:
            await swarm.tasks.ensure_board()  # a final failure blocks dependents (see complete)
            out: TaskState = await swarm.tasks.fail(await resolve(swarm, task_id), epoch, error,
                                                    retry=not no_retry)
            return out

    out = run(ctx, body_)
    emit(ctx, _row(out), out.status)


@task_app.command("release")
def release(ctx: typer.Context, task_id: str,
            epoch: int = typer.Option(..., "--epoch", "-e"),
            reason: str = typer.Option("", "--reason"),
            agent: str | None = AGENT_OPTION) -> None:
    """Give a claimed task back (the attempt is not counted)."""

    async def body_() -> TaskState:
        async with _swarm(ctx, agent) as swarm:
            out: TaskState = await swarm.tasks.release(await resolve(swarm, task_id), epoch,
                                                       reason)
            return out

    out = run(ctx, body_)
    emit(ctx, _row(out), out.status)


@task_app.command("cancel")
def cancel(ctx: typer.Context, task_id: str,
           reason: str = typer.Option("", "--reason")) -> None:
    """Cancel a task; its holder learns it at the next heartbeat."""

    async def body_() -> TaskState:
        async with _swarm(ctx) as swarm:
            out: TaskState = await swarm.tasks.cancel(await resolve(swarm, task_id), reason)
            return out

    out = run(ctx, body_)
    emit(ctx, _row(out), out.status)


@task_app.command("note")
def note(ctx: typer.Context, task_id: str, text: str,
         path: list[str] = typer.Option([], "--path", help="A touched path (repeatable)."),
         agent: str | None = AGENT_OPTION) -> None:
    """Attach a progress note to a task (not on its ownership subject)."""

    async def body_() -> tuple[str, int]:
        async with _swarm(ctx, agent) as swarm:
            whole = await resolve(swarm, task_id)
            seq: int = await swarm.tasks.note(whole, text, paths=path)
            return whole, seq

    whole, seq = run(ctx, body_)
    say(ctx, f"noted on task {whole} (event {seq})")
    emit(ctx, {"task_id": whole, "seq": seq}, lambda _: None)


