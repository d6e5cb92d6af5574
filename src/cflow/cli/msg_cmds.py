"""`cfctl msg send / inbox / ack / overdue / join / leave`: agent messages from the shell."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import typer

from cflow.cli.app import EXIT_USAGE, app, emit, fail, identity, run, state

if TYPE_CHECKING:
    from cflow.messages import InboxMessage, OverdueMessage

msg_app = typer.Typer(help="Messages between agents: direct, topics, threads, receipts.",
                      no_args_is_help=True)
app.add_typer(msg_app, name="msg")

AGENT_OPTION = typer.Option(None, "--agent", help="Who I am (default: $CFLOW_AGENT).")


def me(explicit: str | None) -> str:
    return identity(explicit)


def _swarm(ctx: typer.Context, agent: str) -> Any:
    from cflow.swarm import Swarm

    c = state(ctx)
    return Swarm.connect(c.url, swarm=c.swarm, agent=agent)


def _line(m: InboxMessage) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(m.sent_ms / 1000))
    where = f"#{m.topic}" if m.topic else "direct"
    flags = "".join([f" !{m.importance}" if m.importance != "normal" else "",
                     " [ack required]" if m.ack_required else "",
                     f" (thread {m.thread_id})" if m.thread_id else ""])
    return f"{m.id}  {when}  {m.sender} -> {where}{flags}: {m.text}"


@msg_app.command("send")
def send(
    ctx: typer.Context,
    args: list[str] = typer.Argument(..., help="TO TEXT, or just TEXT with --topic."),
    topic: str | None = typer.Option(None, "--topic", help="Broadcast to this topic."),
    thread: str | None = typer.Option(None, "--thread", help="Thread id."),
    reply_to: str | None = typer.Option(None, "--reply-to",
                                        help="Answer this message id (or a unique prefix)."),
    importance: str = typer.Option("normal", "--importance", help="low|normal|high|urgent."),
    ack_required: bool = typer.Option(False, "--ack-required", help="Recipient must ack."),
    agent: str | None = AGENT_OPTION,
) -> None:
    """Send a message to an agent (TO TEXT) or a topic (--topic T TEXT); prints its id."""
    if topic is not None:
        if len(args) != 1:
            fail("with --topic give only TEXT", EXIT_USAGE)
        to, text = None, args[0]
    else:
        if len(args) != 2:
            fail("give TO and TEXT (or --topic T TEXT)", EXIT_USAGE)
        to, text = args
    sender = me(agent)

    async def body() -> str:
        from cflow.cli.ids import resolve_entity

        async with _swarm(ctx, sender) as swarm:
            answered = (await resolve_entity(swarm.log, "message", reply_to)
                        if reply_to else None)
            mid: str = await swarm.messages.send(
                to, text, topic=topic, thread_id=thread, reply_to=answered,
                importance=importance, ack_required=ack_required)
            return mid

    mid = run(ctx, body)
    emit(ctx, {"id": mid}, mid)


@msg_app.command("inbox")
def inbox(
    ctx: typer.Context,
    limit: int = typer.Option(50, "--limit", help="At most this many."),
    wait: float = typer.Option(0.0, "--wait", help="Wait up to S seconds for the first one."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new messages."),
    agent: str | None = AGENT_OPTION,
) -> None:
    """Messages that arrived for me (each shown once), oldest first."""
    who = me(agent)
    c = state(ctx)

    if follow:
        async def following() -> None:
            import json

            async with _swarm(ctx, who) as swarm:
                async for m in swarm.messages.subscribe(who):
                    typer.echo(json.dumps(m.to_dict()) if c.json else _line(m))

        run(ctx, following)
        return

    async def body() -> list[InboxMessage]:
        async with _swarm(ctx, who) as swarm:
            got: list[InboxMessage] = await swarm.messages.inbox(who, limit, wait_s=wait)
            return got

    got = run(ctx, body)

    def human(_: Any) -> None:
        if not got:
            typer.echo("no new messages", err=True)
        for m in got:
            typer.echo(_line(m))

    emit(ctx, [m.to_dict() for m in got], human)


@msg_app.command("ack")
def ack(ctx: typer.Context, message_id: str, agent: str | None = AGENT_OPTION) -> None:
    """Acknowledge a message (ends its ack-required overdue clock); a unique id prefix will do."""
    who = me(agent)

    async def body() -> int:
        from cflow.cli.ids import resolve_entity

        nonlocal message_id
        async with _swarm(ctx, who) as swarm:
            message_id = await resolve_entity(swarm.log, "message", message_id)
            seq: int = await swarm.messages.ack(who, message_id)
            return seq

    seq = run(ctx, body)
    emit(ctx, {"id": message_id, "by": who, "seq": seq}, f"acked {message_id}")


@msg_app.command("overdue")
def overdue(
    ctx: typer.Context,
    older_than: float = typer.Option(300.0, "--older-than", help="Seconds since sending."),
    to: str | None = typer.Option(None, "--to", help="Only messages to this agent."),
) -> None:
    """Ack-required messages nobody acknowledged in time."""

    async def body() -> list[OverdueMessage]:
        async with _swarm(ctx, me(None)) as swarm:
            late: list[OverdueMessage] = await swarm.messages.overdue(older_than_s=older_than,
                                                                      to=to)
            return late

    late = run(ctx, body)

    def human(_: Any) -> None:
        if not late:
            typer.echo("nothing overdue", err=True)
        for m in late:
            where = m.to or f"#{m.topic}"
            typer.echo(f"{m.id}  {m.sender} -> {where}  overdue {m.overdue_ms / 1000:.0f}s: "
                       f"{m.text}")

    emit(ctx, [m.to_dict() for m in late], human)


@msg_app.command("join")
def join(ctx: typer.Context, topic: str, agent: str | None = AGENT_OPTION) -> None:
    """Follow a topic from now on."""
    who = me(agent)

    async def body() -> list[str]:
        async with _swarm(ctx, who) as swarm:
            topics: list[str] = await swarm.messages.join(who, topic)
            return topics

    topics = run(ctx, body)
    emit(ctx, {"agent": who, "topics": topics}, f"{who} follows: {', '.join(topics)}")


@msg_app.command("leave")
def leave(ctx: typer.Context, topic: str, agent: str | None = AGENT_OPTION) -> None:
    """Stop following a topic."""
    who = me(agent)

    async def body() -> list[str]:
        async with _swarm(ctx, who) as swarm:
            topics: list[str] = await swarm.messages.leave(who, topic)
            return topics

    topics = run(ctx, body)
    emit(ctx, {"agent": who, "topics": topics},
         f"{who} follows: {', '.join(topics) or 'no topics'}")
