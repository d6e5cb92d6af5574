"""Messages between agents: direct messages, topic broadcasts, threads, acks.

Theory of operation
-------------------
A message is one JetStream message on the swarm's messages stream, on
``cf.<swarm>.msg.to.<agent>.<id>`` (direct) or ``cf.<swarm>.msg.topic.<topic>.<id>``
(broadcast), with ``Nats-Msg-Id = id``; then a ``MessageSent`` event on the
events stream (Msg-Id ``msg-<id>``) for the projection's ``messages`` table and
the audit trail.

Each agent has one durable consumer, ``inbox-<agent>``, filtered on its direct
subject and the topics it joined, with explicit acks. Messages sent while the
agent is away wait in the stream; when it comes back the consumer hands them
over in stream order, and a message whose delivery was acknowledged is never
handed over again. Delivery is pushed by the server into a waiting pull request
(a long-lived ``fetch``), never a sleep-and-poll loop; a fetch that times out
just means "nothing new".

Two acknowledgements, on purpose:

* *delivery*: the JetStream ack on the inbox consumer; :meth:`MessageService.inbox`
  acks what it returns, :meth:`MessageService.subscribe` acks a message when the
  caller asks for the next one (at-least-once for a crashing subscriber);
* *receipt*: :meth:`MessageService.ack` appends ``MessageAcked``; a message sent
  with ``ack_required`` is **overdue** until its recipient (any agent, for a
  topic) acknowledges it (:func:`overdue_messages`, pure).

Joining a topic later delivers that topic's messages from the consumer's
current position on (not its whole past).
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast, get_args

import msgspec

from cflow import events as ev
from cflow.errors import InvalidInput, NotFound
from cflow.streams import StoredEvent, names
from cflow.streams.client import MSG_ID, Outgoing, api_request, wall_ms
from cflow.streams.errors import nats_errors, translate

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from cflow.swarm import Swarm

MAX_TEXT_BYTES = 256 * 1024
ACK_WAIT_S = 30.0
IMPORTANCE: tuple[str, ...] = get_args(ev.Importance)


class MessageRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The payload of a message on the messages stream."""

    id: str
    sender: str
    text: str
    to: str | None = None
    topic: str | None = None
    thread_id: str | None = None
    reply_to: str | None = None
    importance: ev.Importance = "normal"
    ack_required: bool = False
    sent_ms: int = 0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(MessageRecord)


@dataclass(frozen=True)
class InboxMessage:
    id: str
    sender: str
    text: str
    to: str | None
    topic: str | None
    thread_id: str | None
    reply_to: str | None
    importance: str
    ack_required: bool
    sent_ms: int
    seq: int  # stream sequence on the messages stream
    deliveries: int = 1

    @classmethod
    def from_record(cls, rec: MessageRecord, seq: int, deliveries: int = 1) -> InboxMessage:
        return cls(id=rec.id, sender=rec.sender, text=rec.text, to=rec.to, topic=rec.topic,
                   thread_id=rec.thread_id, reply_to=rec.reply_to, importance=rec.importance,
                   ack_required=rec.ack_required, sent_ms=rec.sent_ms, seq=seq,
                   deliveries=deliveries)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "sender": self.sender, "to": self.to, "topic": self.topic,
                "text": self.text, "thread_id": self.thread_id, "reply_to": self.reply_to,
                "importance": self.importance, "ack_required": self.ack_required,
                "sent_ms": self.sent_ms, "seq": self.seq, "deliveries": self.deliveries}


@dataclass(frozen=True)
class OverdueMessage:
    id: str
    sender: str
    to: str | None
    topic: str | None
    text: str
    sent_ms: int
    overdue_ms: int
    importance: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "sender": self.sender, "to": self.to, "topic": self.topic,
                "text": self.text, "sent_ms": self.sent_ms, "overdue_ms": self.overdue_ms,
                "importance": self.importance}


# ------------------------------------------------------------------ pure parts


def inbox_consumer(agent: str) -> str:
    return f"inbox-{ev.check_token(agent, 'agent')}"


def direct_filter(swarm: str, agent: str) -> str:
    return names.message_subject(swarm, f"to.{ev.check_token(agent, 'agent')}", "*")


def topic_filter(swarm: str, topic: str) -> str:
    return names.message_subject(swarm, f"topic.{ev.check_token(topic, 'topic')}", "*")


def build_message(swarm: str, rec: MessageRecord) -> Outgoing:
    """Subject, headers and payload of one message (pure)."""
    channel = f"to.{rec.to}" if rec.to is not None else f"topic.{rec.topic}"
    return Outgoing(names.message_subject(swarm, channel, rec.id), {MSG_ID: rec.id},
                    _encoder.encode(rec))


def consumer_config(swarm: str, agent: str, topics: Iterable[str]) -> dict[str, Any]:
    """The inbox consumer of ``agent`` as the JetStream API spells it (pure)."""
    filters = [direct_filter(swarm, agent), *sorted({topic_filter(swarm, t) for t in topics})]
    return {
        "durable_name": inbox_consumer(agent),
        "description": f"cflow inbox of {agent}",
        "deliver_policy": "all",
        "ack_policy": "explicit",
        "ack_wait": int(ACK_WAIT_S * 1e9),
        "max_deliver": -1,
        "filter_subjects": filters,
        "replay_policy": "instant",
        "max_ack_pending": 1000,
    }


def topics_of(swarm: str, filters: Iterable[str]) -> list[str]:
    prefix = f"{names.PREFIX}.{swarm}.msg.topic."
    return sorted(f[len(prefix):].rsplit(".", 1)[0] for f in filters if f.startswith(prefix))


def overdue_messages(
    items: Iterable[tuple[ev.Event, int]],
    *,
    now_ms: int,
    older_than_s: float = 300.0,
    to: str | None = None,
    sender: str | None = None,
) -> list[OverdueMessage]:
    """Ack-required messages not acknowledged ``older_than_s`` after sending (pure).

    ``items`` are ``(event, wall ms)`` pairs of the swarm's message events. A
    direct message needs its recipient's ack; a topic message anyone's.
    """
    sent: dict[str, tuple[ev.Event, ev.MessageSent, int]] = {}
    acks: dict[str, set[str]] = {}
    for event, at in items:
        match event.data:
            case ev.MessageSent() as d if d.ack_required:
                sent[event.entity_id] = (event, d, at)
            case ev.MessageAcked() as d:
                acks.setdefault(d.message_id, set()).add(d.by)
    out = []
    for mid, (event, d, at) in sent.items():
        by = acks.get(mid, set())
        done = (d.to in by) if d.to is not None else bool(by)
        late = now_ms - at - int(older_than_s * 1000)
        if done or late < 0:
            continue
        if to is not None and d.to != to:
            continue
        if sender is not None and event.actor != sender:
            continue
        out.append(OverdueMessage(id=mid, sender=event.actor, to=d.to, topic=d.topic,
                                  text=d.text, sent_ms=at, overdue_ms=late,
                                  importance=d.importance))
    return sorted(out, key=lambda m: (m.sent_ms, m.id))


# ---------------------------------------------------------------------- adapter


class MessageService:
    """``swarm.messages``: send, inbox, subscribe, ack, overdue, topics."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.log = swarm.log
        self.stream = names.messages_stream(swarm.name)
        self._subs: list[Any] = []

    # -- send

    async def send(
        self,
        to: str | None,
        text: str,
        *,
        topic: str | None = None,
        thread_id: str | None = None,
        reply_to: str | None = None,
        importance: str = "normal",
        ack_required: bool = False,
        sender: str | None = None,
    ) -> str:
        """Send a direct message (``to``) or a topic broadcast (``topic``); returns its id.

        A reply (``reply_to``) joins the thread of the message it answers.

        Raises:
            InvalidInput: neither or both of ``to``/``topic``, a bad name, bad importance.
            NotFound: ``reply_to`` names no message.
        """
        if (to is None) == (topic is None):
            raise InvalidInput("a message goes either to an agent or to a topic")
        if to is not None:
            ev.check_token(to, "agent")
        if topic is not None:
            ev.check_token(topic, "topic")
        if importance not in IMPORTANCE:
            raise InvalidInput(f"importance must be one of {', '.join(IMPORTANCE)}")
        level = cast(ev.Importance, importance)
        if len(text.encode()) > MAX_TEXT_BYTES:
            raise InvalidInput(f"message larger than {MAX_TEXT_BYTES} bytes")
        if reply_to is not None and thread_id is None:
            original = await self.get(reply_to)
            thread_id = original.thread_id or original.id
        mid = ev.new_id()
        rec = MessageRecord(id=mid, sender=sender or self.swarm.agent, text=text, to=to,
                            topic=topic, thread_id=thread_id, reply_to=reply_to,
                            importance=level, ack_required=ack_required,
                            sent_ms=wall_ms())
        await self.log.send(build_message(self.swarm.name, rec),
                            stream=names.messages_stream(self.swarm.name))
        await self.log.append(
            ev.MessageSent(to=to, topic=topic, text=text, thread_id=thread_id,
                           reply_to=reply_to, importance=level, ack_required=ack_required),
            mid, msg_id=f"msg-{mid}", actor=rec.sender,
            event_id=ev.intent_id(self.swarm.name, f"msg-{mid}"))
        return mid

    async def get(self, message_id: str) -> MessageSentView:
        """The ``MessageSent`` facts of one message.

        Raises:
            NotFound: no such message.
        """
        ev.check_token(message_id, "message id")
        for stored in await self.log.entity_events("message", message_id):
            if isinstance(stored.event.data, ev.MessageSent):
                return MessageSentView.of(stored)
        raise NotFound("message", message_id)

    # -- the inbox consumer

    async def _consumer_info(self, agent: str) -> dict[str, Any] | None:
        try:
            return await api_request(
                self.log.nc, f"$JS.API.CONSUMER.INFO.{self.stream}.{inbox_consumer(agent)}")
        except NotFound:
            return None

    async def _put_consumer(self, agent: str, topics: Iterable[str]) -> None:
        name = inbox_consumer(agent)
        await api_request(self.log.nc, f"$JS.API.CONSUMER.CREATE.{self.stream}.{name}",
                          {"stream_name": self.stream,
                           "config": consumer_config(self.swarm.name, agent, topics)})

    async def ensure_inbox(self, agent: str) -> list[str]:
        """Create the agent's inbox consumer if needed; returns the topics it follows."""
        info = await self._consumer_info(agent)
        if info is None:
            await self._put_consumer(agent, ())
            return []
        return topics_of(self.swarm.name, info.get("config", {}).get("filter_subjects") or [])

    async def join(self, agent: str, topic: str) -> list[str]:
        """Follow a topic from now on; returns the agent's topics."""
        ev.check_token(topic, "topic")
        topics = set(await self.ensure_inbox(agent)) | {topic}
        await self._put_consumer(agent, topics)
        return sorted(topics)

    async def leave(self, agent: str, topic: str) -> list[str]:
        topics = set(await self.ensure_inbox(agent)) - {topic}
        await self._put_consumer(agent, topics)
        return sorted(topics)

    async def _pull(self, agent: str) -> Any:
        await self.ensure_inbox(agent)
        with nats_errors(self.stream):
            return await self.log.js.pull_subscribe_bind(durable=inbox_consumer(agent),
                                                         stream=self.stream)

    @staticmethod
    async def _fetch(psub: Any, batch: int, wait_s: float) -> list[Msg]:
        import nats.errors

        try:
            msgs: list[Msg] = await psub.fetch(batch, timeout=max(wait_s, 0.05))
        except (nats.errors.TimeoutError, TimeoutError):
            return []  # nothing new: not an error
        except nats.errors.Error as exc:
            raise translate(exc, subject="inbox fetch") from exc
        return msgs

    @staticmethod
    def _decode(msg: Msg) -> InboxMessage | None:
        try:
            rec = _decoder.decode(msg.data)
        except msgspec.DecodeError:
            return None
        meta = msg.metadata
        return InboxMessage.from_record(rec, int(meta.sequence.stream),
                                        int(meta.num_delivered or 1))

    async def inbox(self, agent: str, limit: int = 50, *, wait_s: float = 0.0
                    ) -> builtins.list[InboxMessage]:
        """Messages for ``agent`` not delivered yet, oldest first; they count as delivered.

        With ``wait_s`` > 0 and nothing waiting, waits that long for the first one.
        """
        if limit < 1:
            raise InvalidInput("inbox limit must be at least 1")
        psub = await self._pull(agent)
        try:
            out = []
            for msg in await self._fetch(psub, limit, wait_s):
                item = self._decode(msg)
                with nats_errors("inbox ack"):
                    await msg.ack_sync()
                if item is not None:
                    out.append(item)
            return out
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def subscribe(self, agent: str, *, batch: int = 16) -> AsyncIterator[InboxMessage]:
        """Every message for ``agent``, first those that waited, then live ones, forever.

        A message's delivery is acknowledged when the caller asks for the next
        one. Closing the iterator hands the message being handled back at once;
        a subscriber that dies gets it again after the ack wait (30 s).
        """
        psub = await self._pull(agent)
        self._subs.append(psub)
        try:
            while True:
                msgs = await self._fetch(psub, batch, 5.0)
                for i, msg in enumerate(msgs):
                    item = self._decode(msg)
                    if item is not None:
                        try:
                            yield item
                        except BaseException:
                            # Closed while handling it: hand this one and the
                            # rest of the batch back for immediate redelivery.
                            for rest in msgs[i:]:
                                with contextlib.suppress(Exception):
                                    await rest.nak()
                            raise
                    with nats_errors("inbox ack"):
                        await msg.ack_sync()
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
            with contextlib.suppress(ValueError):
                self._subs.remove(psub)

    # -- receipts

    async def ack(self, agent: str, message_id: str) -> int:
        """Acknowledge receipt of a message (ends its ``ack_required`` overdue clock).

        Raises:
            NotFound: no such message.
        """
        await self.get(message_id)
        ev.check_token(agent, "agent")
        appended = await self.log.append(ev.MessageAcked(message_id=message_id, by=agent),
                                         message_id, msg_id=f"ack-{message_id}-{agent}",
                                         actor=agent, event_id=ev.intent_id(
                                             self.swarm.name, f"ack-{message_id}-{agent}"))
        return appended.seq

    async def overdue(self, *, older_than_s: float = 300.0, to: str | None = None,
                      sender: str | None = None) -> builtins.list[OverdueMessage]:
        """Ack-required messages still unacknowledged ``older_than_s`` after sending."""
        from cflow.hlc import Timestamp

        items = [(s.event, Timestamp.parse(s.event.hlc).wall_ms)
                 for s in await self.log.read(names.events_filter(self.swarm.name, "message"))
                 if isinstance(s, StoredEvent)]
        return overdue_messages(items, now_ms=wall_ms(), older_than_s=older_than_s, to=to,
                                sender=sender)

    async def aclose(self) -> None:
        for psub in list(self._subs):
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
        self._subs.clear()


@dataclass(frozen=True)
class MessageSentView:
    id: str
    sender: str
    to: str | None
    topic: str | None
    text: str
    thread_id: str | None
    reply_to: str | None
    importance: str
    ack_required: bool

    @classmethod
    def of(cls, stored: StoredEvent) -> MessageSentView:
        d = stored.event.data
        assert isinstance(d, ev.MessageSent)
        return cls(id=stored.event.entity_id, sender=stored.event.actor, to=d.to, topic=d.topic,
                   text=d.text, thread_id=d.thread_id, reply_to=d.reply_to,
                   importance=d.importance, ack_required=d.ack_required)


__all__ = [
    "InboxMessage",
    "MessageRecord",
    "MessageSentView",
    "MessageService",
    "OverdueMessage",
    "build_message",
    "consumer_config",
    "inbox_consumer",
    "overdue_messages",
]
