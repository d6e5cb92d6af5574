"""Claude Code channels: the swarm pushes into a running session, and relays its permission prompts.

The shapes are Claude Code's own (its bundled client, v2.1.x):

* the server declares the experimental capabilities ``claude/channel`` and
  ``claude/channel/permission`` (see :data:`cflow.mcp.front.CAPABILITIES`);
* a push is the notification ``notifications/claude/channel`` with params
  ``{"content": str, "meta": {str: str}}``; Claude Code queues ``content`` as the
  session's next prompt;
* a permission prompt arrives as ``notifications/claude/channel/permission_request``
  with ``{"request_id", "tool_name", "description", "input_preview"}`` and is
  answered with ``notifications/claude/channel/permission``
  ``{"request_id", "behavior": "allow" | "deny"}``.

What is pushed: a message for this agent (its inbox), a decision on a gate it
waits for (one it created, or one a task it holds depends on), a lease lost
because the task was cancelled or taken over, and ready work for its
capabilities while it holds nothing. A permission prompt becomes an ack-required message on the
``permissions`` topic; an operator answers it from any machine with
``cfctl permissions allow|deny ID`` (a direct message back, ``permission allow
<request_id>``), which this process turns into the answer notification.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from cflow.permissions import PERMISSION_TOPIC, decision_text, parse_request

if TYPE_CHECKING:
    from cflow.leases import Lease
    from cflow.mcp.adapter import Adapter
    from cflow.messages import InboxMessage

log = logging.getLogger("cflow.mcp")

CHANNEL = "notifications/claude/channel"
PERMISSION = "notifications/claude/channel/permission"
PERMISSION_REQUEST = "notifications/claude/channel/permission_request"
READY_REPEAT_S = 120.0  # the same ready work is announced again at most this often
READY_GAP_S = 30.0  # and any ready work at most this often (a busy swarm is not a chat)
READY_WAIT_S = 30.0
CONTENT_CAP = 2_000
INBOX_GAP_S = 2.0  # messages are pushed at most this often; more are summed up in one push
RESTART_MIN_S = 0.5  # a failed push loop is started again after this, doubling
RESTART_MAX_S = 10.0
_DECISION = re.compile(r"^permission (allow|deny) ([A-Za-z0-9_-]{1,64})$")

Push = Callable[[dict[str, Any]], object]


def notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


def channel_push(content: str, **meta: object) -> dict[str, Any]:
    """A ``notifications/claude/channel`` message (pure); meta values become strings."""
    text = content if len(content) <= CONTENT_CAP else content[: CONTENT_CAP - 1] + "…"
    return notification(CHANNEL, {"content": text,
                                  "meta": {k: str(v) for k, v in meta.items() if v is not None}})


def parse_decision(text: str) -> tuple[str, str] | None:
    """``("allow" | "deny", request_id)`` if ``text`` is an operator's answer (pure)."""
    match = _DECISION.match(text.strip())
    return (match.group(1), match.group(2)) if match else None


def request_text(agent: str, params: dict[str, Any]) -> str:
    """The permission request as the swarm stores it: one JSON object (pure)."""
    return json.dumps({"permission_request": str(params.get("request_id", "")),
                       "agent": agent,
                       "tool_name": str(params.get("tool_name", ""))[:200],
                       "description": str(params.get("description", ""))[:500],
                       "input_preview": str(params.get("input_preview", ""))[:500]},
                      ensure_ascii=False)


class Channel:
    """The pushes of one ``cfctl mcp`` process to its Claude Code session."""

    def __init__(self, adapter: Adapter, push: Push) -> None:
        self.a = adapter
        self.push = push
        self.pushed: list[dict[str, Any]] = []
        self._announced: tuple[tuple[str, ...], float] | None = None
        self._requests: dict[str, str] = {}  # Claude Code request id -> swarm message id
        self._gates_next: int | None = None  # the first task event the gate loop has not seen
        self._held: list[InboxMessage] = []  # messages waiting for the next inbox push
        self._held_flush: asyncio.TimerHandle | None = None
        self._last_message = float("-inf")
        self.restarts: dict[str, int] = {}  # push loop -> times restarted after a failure

    def send(self, message: dict[str, Any]) -> None:
        self.pushed.append(message)
        self.push(message)

    # ----------------------------------------------------------------- events

    def lease_lost(self, lease: Lease) -> None:
        """Our lease is gone (cancelled, expired, taken over): tell the session to stop."""
        reason = lease.lost_reason or "lost"
        self.send(channel_push(
            f"cflow: your lease on task {lease.task_id} \"{lease.task.title}\" is gone "
            f"({reason}). Stop working on it; call swarm_status or task_claim.",
            kind="lease_lost", task_id=lease.task_id, reason=reason))

    async def relay_permission(self, params: dict[str, Any]) -> str:
        """A permission prompt of the session, as an ack-required message for operators."""
        request_id = str(params.get("request_id", ""))
        try:
            await self.a.engage()  # a live session: `cfctl permissions list` shows only those
        except Exception as exc:  # the relay itself may still get through
            log.info("not registered before relaying %s: %s", request_id, exc)
        message_id: str = await self.a.swarm.messages.send(
            None, request_text(self.a.agent, params), topic=PERMISSION_TOPIC,
            importance="high", ack_required=True)
        self._requests[request_id] = message_id
        log.info("permission request %s relayed as message %s", request_id, message_id)
        return message_id

    def answer(self, sender: str, reply_to: str | None, behavior: str,
               request_id: str) -> bool:
        """Pass an operator's decision to Claude Code, once, if it answers our relayed prompt.

        A decision counts only as a reply to the message this process relayed
        for that request id; anything else (a forged text, a second answer, an
        answer meant for an earlier session) is dropped without acting.
        """
        relayed = self._requests.get(request_id)
        if relayed is None or reply_to != relayed:
            log.warning("ignored permission %s for %s from %s: not an open request of "
                        "this session", behavior, request_id, sender)
            return False
        del self._requests[request_id]
        self.send(notification(PERMISSION, {"request_id": request_id, "behavior": behavior}))
        log.info("permission %s for %s by %s", behavior, request_id, sender)
        return True

    async def close(self) -> None:
        """The session ends: its open prompts can no longer be answered, so ack them."""
        for request_id, message_id in list(self._requests.items()):
            try:
                await asyncio.wait_for(self.a.swarm.messages.ack(self.a.agent, message_id), 1.0)
            except Exception as exc:  # best effort: `permissions list` hides gone agents too
                log.info("permission request %s left open: %s", request_id, exc)
            self._requests.pop(request_id, None)

    # ----------------------------------------------------------------- loops

    async def run(self) -> None:
        """Run the three push loops, each restarted on its own after a failure."""
        await asyncio.gather(self._supervised("inbox", self._inbox),
                             self._supervised("ready work", self._ready_work),
                             self._supervised("gates", self._gates))

    async def _supervised(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one push loop forever: an outage or a bad event restarts it, with backoff."""
        backoff = RESTART_MIN_S
        while True:
            started = time.monotonic()
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one loop's failure must not end the others
                self.restarts[name] = self.restarts.get(name, 0) + 1
                log.warning("channel %s stopped (%s); restarting in %.1f s", name, exc, backoff)
            if time.monotonic() - started > RESTART_MAX_S:
                backoff = RESTART_MIN_S
            await asyncio.sleep(backoff)  # a restart backoff is a timer by nature
            backoff = min(RESTART_MAX_S, backoff * 2)

    def waits_for(self, gate: Any) -> bool:
        """Whether this agent waits for ``gate``: it created it, or holds a task needing it."""
        if gate.created_by == self.a.agent:
            return True
        return any(gate.task_id in lease.task.depends_on for lease in self.a.leases.values())

    async def _gates(self) -> None:
        from cflow import events as ev
        from cflow.errors import NotFound

        feed = self.a.swarm.feed
        tasks = self.a.swarm.tasks
        if self._gates_next is None:  # a restart goes on where the last run stopped
            self._gates_next = (await tasks.ensure_board()).last_seq + 1
        async with feed.subscribe(f"mcp-gates-{self.a.agent}",
                                  start_seq=self._gates_next) as events:
            async for item in events:
                self._gates_next = item.seq + 1
                data = item.event.data
                if not isinstance(data, ev.TaskCompleted | ev.TaskFailed):
                    continue
                gate = (await tasks.ensure_board()).tasks.get(item.event.entity_id)
                if gate is None:  # the board has not folded its creation yet
                    try:
                        gate = await tasks.get(item.event.entity_id)
                    except NotFound:
                        continue
                if gate.kind != "gate" or not self.waits_for(gate):
                    continue
                approved = isinstance(data, ev.TaskCompleted)
                why = (data.result if isinstance(data, ev.TaskCompleted) else data.error) or ""
                self.send(channel_push(
                    f"cflow: gate {gate.task_id} \"{gate.title}\" was "
                    f"{'approved' if approved else 'rejected'} by {item.event.actor}"
                    + (f": {why}" if why else "") + ".",
                    kind="gate_decision", task_id=gate.task_id,
                    decision="approved" if approved else "rejected", by=item.event.actor))

    async def _inbox(self) -> None:
        messages = self.a.swarm.messages
        async for item in messages.subscribe(self.a.agent):
            decision = parse_decision(item.text)
            if decision is not None:
                self.answer(item.sender, item.reply_to, *decision)
                continue
            self._message(item)

    def _message(self, item: InboxMessage) -> None:
        """Push a message at once, or hold it: at most one push per :data:`INBOX_GAP_S`."""
        now = time.monotonic()
        if self._held_flush is None and now - self._last_message >= INBOX_GAP_S:
            self._last_message = now
            self._push_message(item)
            return
        self._held.append(item)
        if self._held_flush is None:
            wait = max(0.0, INBOX_GAP_S - (now - self._last_message))
            self._held_flush = asyncio.get_running_loop().call_later(wait, self._flush)

    def _flush(self) -> None:
        held, self._held, self._held_flush = self._held, [], None
        self._last_message = time.monotonic()
        if len(held) == 1:
            self._push_message(held[0])
        elif held:
            lines = [f"- {m.sender} [{m.id}]: {m.text[:300]}" for m in held]
            self.send(channel_push(
                f"cflow: {len(held)} new messages for you:\n" + "\n".join(lines),
                kind="messages", count=len(held)))

    def _push_message(self, item: InboxMessage) -> None:
        self.send(channel_push(
            f"cflow message from {item.sender}: {item.text}",
            kind="message", message_id=item.id, sender=item.sender,
            importance=item.importance,
            ack="call query or reply with the id" if item.ack_required else None))

    async def _ready_work(self) -> None:
        from cflow.streams.client import wall_ms

        tasks = self.a.swarm.tasks
        while True:
            if not self.a.leases:
                board = await tasks.ensure_board()
                ready = tuple(s.task_id for s in board.candidates(self.a.capabilities,
                                                                  wall_ms()))
                now = time.monotonic()
                last = self._announced
                if ready and (last is None or (now - last[1] > READY_GAP_S and (
                        last[0] != ready or now - last[1] > READY_REPEAT_S))):
                    self._announced = (ready, now)
                    self.send(channel_push(
                        f"cflow: {len(ready)} task(s) ready for your capabilities "
                        f"{self.a.capabilities or '(none)'}; call task_claim to take one.",
                        kind="ready_work", count=len(ready)))
            await tasks.offers.wait(self.a.capabilities, READY_WAIT_S)


__all__ = [
    "CHANNEL",
    "PERMISSION",
    "PERMISSION_REQUEST",
    "PERMISSION_TOPIC",
    "Channel",
    "channel_push",
    "decision_text",
    "parse_decision",
    "parse_request",
    "request_text",
]
