"""Work offers: each ready task is offered to one claimer at a time.

Theory of operation
-------------------
A claimer must not fold the whole swarm to find work, and sixteen claimers
must not all race for the same best task. So every write that leaves a task
ready (creation, readiness, release, a failure that will be retried, a requeue
after expiry) also publishes an **offer**: the task's state at that sequence,
on the subject ``cf.<swarm>.offer.<band>.<caps>`` of a work-queue stream, with
the Msg-Id ``offer-<task>-<seq>``. ``band`` is the priority, ``caps`` the
capability set the task needs.

Each subject has one durable pull consumer shared by every claimer able to do
that work; the server hands a message to one fetcher at a time. A claimer asks
the stream which subjects hold offers, takes the best band among the capability
sets it covers, fetches one offer and compare-and-sets ``TaskClaimed`` on the
task's subject with the offer's sequence as the expectation. The offer never
decides ownership: a stale offer (the task moved on) fails the compare-and-set
and is dropped; a duplicate is harmless for the same reason. An offer whose
retry backoff has not passed is handed back with a delay (server time).

What may be lost is an offer, never a task: a writer that dies between its
event and its offer leaves a ready task unoffered; maintainers (who fold the
board) re-offer ready tasks they have not seen offered, and a claim by id never
needs an offer.

The pure part (subjects, bands, eligibility) sits at the top; :class:`OfferDesk`
is the thin adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import msgspec
import nats.errors

from cflow.errors import Unavailable
from cflow.streams import names
from cflow.streams.client import Outgoing, api_request
from cflow.streams.errors import nats_errors
from cflow.tasks import TaskState

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from cflow.streams import EventLog

log = logging.getLogger("cflow.offers")

# An offer fetched by a claimer that died (kill -9: nobody hands it back) is offered
# again after this. A claim settles its offer milliseconds after the fetch; a slower
# one only lets a second claimer try, and the compare-and-set decides.
ACK_WAIT_S = 5.0
REFRESH_S = 0.25  # how stale a claimer's view of which bands hold offers may get
IDLE_RECHECK_S = 2.0  # an idle claimer looks again this often (offers handed back with a delay,
                      # a subscription that missed offers while the connection was down)
CONSUMER_IDLE_S = 3600.0  # an offer consumer nobody fetched from for this long is removed
PULL_TIMEOUT_S = 2.0  # a no-wait pull is answered in one round trip; longer means lost
CLOSE_PULLS_S = 0.5  # a closing desk waits this long for answers to its pulls, to hand them back
PREFETCH_HOLD_S = 0.1  # a prefetched offer not claimed within this goes back to the queue
_SAFE_CAP = re.compile(r"[A-Za-z0-9_-]{1,40}")
_PULL_ONE = json.dumps({"batch": 1, "no_wait": True}).encode()

# ------------------------------------------------------------------------ pure


def offers_stream(swarm: str) -> str:
    return f"CF_{swarm}_OFFERS"


def offers_filter(swarm: str) -> str:
    return f"{names.PREFIX}.{swarm}.offer.>"


def cap_token(capability: str) -> str:
    """A capability as a subject token: itself when safe, else a stable hash."""
    if _SAFE_CAP.fullmatch(capability):
        return capability
    return "h" + hashlib.sha1(capability.encode()).hexdigest()[:12]  # noqa: S324 - a name


def caps_token(capabilities: Iterable[str]) -> str:
    tokens = sorted({cap_token(c) for c in capabilities})
    return "+".join(tokens) if tokens else "any"


def band_token(priority: int) -> str:
    return f"p{priority}" if priority >= 0 else f"m{-priority}"


def band_of(token: str) -> int:
    return int(token[1:]) if token[0] == "p" else -int(token[1:])


def offer_subject(swarm: str, state: TaskState) -> str:
    return (f"{names.PREFIX}.{swarm}.offer.{band_token(state.priority)}."
            f"{caps_token(state.capabilities)}")


def offer_msg_id(task_id: str, seq: int) -> str:
    return f"offer-{task_id}-{seq}"


def eligible(subjects: Iterable[str], capabilities: Iterable[str]) -> list[str]:
    """The offer subjects an agent with ``capabilities`` may take, best band first."""
    mine = {cap_token(c) for c in capabilities}
    out: list[tuple[int, str]] = []
    for subject in subjects:
        band, caps = subject.rsplit(".", 2)[-2:]
        needed = set() if caps == "any" else set(caps.split("+"))
        if needed <= mine:
            out.append((band_of(band), subject))
    return [s for _, s in sorted(out, key=lambda x: (-x[0], x[1]))]


@functools.lru_cache(maxsize=1024)
def consumer_name(subject: str) -> str:
    return "offer-" + hashlib.sha1(subject.encode()).hexdigest()[:20]  # noqa: S324 - a name


_offer_encoder = msgspec.json.Encoder()
_offer_decoder = msgspec.json.Decoder(TaskState)


def encode_offer(state: TaskState) -> bytes:
    return _offer_encoder.encode(state)


def decode_offer(data: bytes) -> TaskState | None:
    try:
        return _offer_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


# --------------------------------------------------------------------- adapter


class OfferDesk:
    """Publish, find and fetch offers of one swarm (one per process)."""

    def __init__(self, log_: EventLog) -> None:
        self.log = log_
        self.nc = log_.nc
        self.swarm = log_.swarm
        self.stream = offers_stream(self.swarm)
        self._consumers: set[str] = set()
        self._subjects: list[str] = []  # subjects holding offers, as last seen
        self._seen_at = 0.0
        self.refreshes = 0  # how many times the stream was asked (a fresh look)
        self.wake = asyncio.Event()  # set by pokes (resume) and by offers seen while idle
        self._pull_lock = asyncio.Lock()
        self._pulled: asyncio.Queue[Msg] = asyncio.Queue()
        self._inbox_subject: str | None = None
        self._outstanding = 0  # pulls sent and not answered yet
        self._handing_back: set[asyncio.Future[None]] = set()

    async def publish(self, state: TaskState) -> None:
        """Offer a ready task (idempotent per task and sequence), through an election.

        Raises:
            Unavailable: not stored; a maintainer's sweep offers it again.
        """
        headers = {"Nats-Msg-Id": offer_msg_id(state.task_id, state.seq)}
        out = Outgoing(offer_subject(self.swarm, state), headers, encode_offer(state))
        with nats_errors(self.stream):
            await self.log.send(out, stream=self.stream)

    async def subjects(self, *, fresh: bool = False) -> list[str]:
        """Offer subjects that hold messages (cached for ``REFRESH_S``)."""
        if fresh or time.monotonic() - self._seen_at > REFRESH_S:
            info = await api_request(self.nc, f"$JS.API.STREAM.INFO.{self.stream}",
                                     {"subjects_filter": offers_filter(self.swarm)})
            self._subjects = sorted((info.get("state") or {}).get("subjects") or {})
            self._seen_at = time.monotonic()
            self.refreshes += 1
        return self._subjects

    def forget(self, subject: str) -> None:
        """A fetch found ``subject`` empty: skip it until the next refresh."""
        if subject in self._subjects:
            self._subjects.remove(subject)

    async def _consumer(self, subject: str) -> str:
        name = consumer_name(subject)
        if name not in self._consumers:
            config = {"durable_name": name, "filter_subject": subject,
                      "ack_policy": "explicit", "deliver_policy": "all",
                      "ack_wait": int(ACK_WAIT_S * 1e9), "max_ack_pending": -1,
                      "max_waiting": 4096, "inactive_threshold": int(CONSUMER_IDLE_S * 1e9)}
            await api_request(self.nc, f"$JS.API.CONSUMER.CREATE.{self.stream}.{name}",
                              {"stream_name": self.stream, "config": config})
            self._consumers.add(name)
        return name

    async def fetch(self, subject: str) -> Msg | None:
        """One offer from ``subject``'s consumer, or None when it has none to hand out.

        JetStream delivers a pulled message under its own subject, so a reply
        cannot be matched to its request: this process keeps one inbox, pulls one
        message at a time through it, and takes whatever answer comes first (an
        offer from a prefetch is as good as one from this pull).
        """
        name = await self._consumer(subject)
        async with self._pull_lock:
            inbox = await self._inbox()
            msg = self._take_pulled()
            if msg is not None:
                return msg
            if self._outstanding == 0:
                await self._request(name, inbox, subject)
            try:
                async with asyncio.timeout(PULL_TIMEOUT_S):
                    while True:
                        answer = await self._pulled.get()
                        self._outstanding = max(0, self._outstanding - 1)
                        if self._settle_status(answer, name, subject):
                            return answer
                        if self._outstanding == 0:
                            return None
            except TimeoutError:
                self._outstanding = 0  # those answers are lost; late ones are handled
                raise Unavailable(f"no answer pulling an offer from {subject} "
                                  f"within {PULL_TIMEOUT_S:g} s") from None

    def reconnected(self) -> None:
        """The connection came back: pulls sent on the old one will not be answered."""
        self._outstanding = 0
        self._seen_at = 0.0
        self.wake.set()

    async def prefetch(self, subject: str) -> None:
        """Pull the next offer of ``subject`` now, while the caller finishes its task.

        A holder that completes a task usually claims the next one at once; the
        pull then travels with the completion instead of costing its own round
        trip. An offer nobody takes within ``PREFETCH_HOLD_S`` is handed back.
        """
        if self._outstanding or self._pull_lock.locked() or not self._pulled.empty():
            return
        name = consumer_name(subject)
        if name not in self._consumers or self._inbox_subject is None:
            return
        try:
            await self._request(name, self._inbox_subject, subject)
        except Unavailable:
            return
        loop = asyncio.get_running_loop()
        loop.call_later(PREFETCH_HOLD_S, self._hand_back_unused)

    async def _request(self, name: str, inbox: str, subject: str) -> None:
        with nats_errors(subject):
            await self.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{name}",
                                  _PULL_ONE, reply=inbox)
        self._outstanding += 1

    def _take_pulled(self) -> Msg | None:
        """An offer already received (a prefetch, a late answer), if any."""
        while not self._pulled.empty():
            answer = self._pulled.get_nowait()
            self._outstanding = max(0, self._outstanding - 1)
            if not (answer.headers or {}).get("Status"):
                return answer
        return None

    async def aclose(self) -> None:
        """Hand back the offers this process pulled and did not take (a holder's
        prefetch when it leaves after its last task), waiting up to ``CLOSE_PULLS_S``
        for pulls still unanswered. Left alone, such an offer is redelivered only
        after its ack wait (``ACK_WAIT_S``), even a retry due in a second."""
        loop = asyncio.get_running_loop()
        until = loop.time() + CLOSE_PULLS_S
        while self._outstanding or not self._pulled.empty():
            try:
                async with asyncio.timeout(max(0.0, until - loop.time())):
                    answer = await self._pulled.get()
            except TimeoutError:
                break
            self._outstanding = max(0, self._outstanding - 1)
            if not (answer.headers or {}).get("Status"):
                await settle(answer, "nak")
        if self._handing_back:
            await asyncio.gather(*self._handing_back, return_exceptions=True)

    def _hand_back_unused(self) -> None:
        if self._pull_lock.locked():
            return  # a fetch is taking it right now
        msg = self._take_pulled()
        if msg is not None:
            task = asyncio.ensure_future(settle(msg, "nak"))
            self._handing_back.add(task)
            task.add_done_callback(self._handing_back.discard)

    def _settle_status(self, msg: Msg, name: str, subject: str) -> bool:
        """True for an offer; a status answer (nothing to hand out, ...) is noted."""
        status = (msg.headers or {}).get("Status")
        if status is None:
            return True
        if status not in ("404", "408"):  # 404/408: nothing to hand out now
            description = (msg.headers or {}).get("Description", "")
            if "consumer" in description.lower() and "not found" in description.lower():
                self._consumers.discard(name)  # removed while idle: create it next time
            else:
                log.debug("pull from %s answered %s %s", subject, status, description)
        return False

    async def _inbox(self) -> str:
        if self._inbox_subject is None:
            inbox = self.nc.new_inbox()

            async def pulled(msg: Msg) -> None:
                self._pulled.put_nowait(msg)

            with nats_errors(inbox):
                await self.nc.subscribe(inbox, cb=pulled)
            self._inbox_subject = inbox
        return self._inbox_subject

    async def wait(self, capabilities: Iterable[str], timeout_s: float) -> None:
        """Until an offer this agent may take is published, a poke, or the timeout."""
        caps = tuple(capabilities)
        woken = asyncio.Event()

        async def seen(msg: Msg) -> None:
            if eligible([msg.subject], caps):
                woken.set()

        try:
            sub = await self.nc.subscribe(offers_filter(self.swarm), cb=seen)
        except (nats.errors.Error, OSError) as exc:
            raise Unavailable(f"cannot wait for offers: {exc}") from None
        try:
            waiters = [asyncio.ensure_future(woken.wait()), asyncio.ensure_future(self.wake.wait())]
            try:
                await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
        finally:
            self.wake.clear()
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()
        self._seen_at = 0.0  # look again at what holds offers


async def settle(msg: Msg, how: str, delay_s: float | None = None) -> None:
    """Ack, term or nak an offer; a core publish, nothing is waited for.

    A lost ack only means the offer is handed out again after its ack wait and
    refused by the compare-and-set as stale.
    """
    with contextlib.suppress(nats.errors.Error, OSError):
        if how == "ack":
            await msg.ack()
        elif how == "term":
            await msg.term()
        else:
            await msg.nak(delay=delay_s)


__all__ = [
    "OfferDesk",
    "band_of",
    "band_token",
    "cap_token",
    "caps_token",
    "consumer_name",
    "decode_offer",
    "eligible",
    "encode_offer",
    "offer_msg_id",
    "offer_subject",
    "offers_filter",
    "offers_stream",
    "settle",
]
