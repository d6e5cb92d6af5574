"""Messages: offline delivery once, order, topics, threads, receipts and overdue."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cflow import events as ev
from cflow.errors import InvalidInput, NotFound
from cflow.messages import (
    MessageRecord,
    build_message,
    consumer_config,
    overdue_messages,
)
from cflow.swarm import Swarm

# ------------------------------------------------------------------------- pure


def test_build_message_subjects() -> None:
    direct = MessageRecord(id="m1", sender="a", text="hi", to="bob")
    out = build_message("s", direct)
    assert out.subject == "cf.s.msg.to.bob.m1"
    assert out.headers == {"Nats-Msg-Id": "m1"}
    topic = MessageRecord(id="m2", sender="a", text="hi", topic="deploys")
    assert build_message("s", topic).subject == "cf.s.msg.topic.deploys.m2"


def test_consumer_config_filters() -> None:
    cfg = consumer_config("s", "bob", ["ops", "dev", "ops"])
    assert cfg["durable_name"] == "inbox-bob"
    assert cfg["filter_subjects"] == ["cf.s.msg.to.bob.*", "cf.s.msg.topic.dev.*",
                                      "cf.s.msg.topic.ops.*"]
    assert cfg["ack_policy"] == "explicit"


def _event(data: ev.EventData, entity: str, actor: str = "alice") -> ev.Event:
    return ev.make_event(data, swarm="s", entity_id=entity, hlc="0" * 32, actor=actor)


def test_overdue_fold() -> None:
    items = [
        (_event(ev.MessageSent(to="bob", text="please ack", ack_required=True), "m1"), 1_000),
        (_event(ev.MessageSent(to="bob", text="fyi"), "m2"), 1_000),
        (_event(ev.MessageSent(to="carol", text="ack me", ack_required=True), "m3"), 1_000),
        (_event(ev.MessageAcked(message_id="m3", by="carol"), "m3", "carol"), 2_000),
        (_event(ev.MessageSent(topic="ops", text="all hands", ack_required=True), "m4"), 1_000),
        (_event(ev.MessageSent(to="bob", text="fresh", ack_required=True), "m5"), 9_500),
        # an ack by someone who is not the recipient does not count
        (_event(ev.MessageAcked(message_id="m1", by="mallory"), "m1", "mallory"), 2_000),
    ]
    late = overdue_messages(items, now_ms=10_000, older_than_s=5)
    assert [(m.id, m.overdue_ms) for m in late] == [("m1", 4_000), ("m4", 4_000)]
    assert [m.id for m in overdue_messages(items, now_ms=10_000, older_than_s=5, to="bob")] == [
        "m1"]
    items.append((_event(ev.MessageAcked(message_id="m4", by="dave"), "m4", "dave"), 3_000))
    assert [m.id for m in overdue_messages(items, now_ms=10_000, older_than_s=5)] == ["m1"]


# ------------------------------------------------------------------ integration


@pytest.fixture
async def alice(nats_url: str, swarm_name: str) -> AsyncIterator[Swarm]:
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="alice") as s:
        yield s


@pytest.mark.integration
async def test_offline_agent_receives_once_in_order(alice: Swarm, nats_url: str,
                                                    swarm_name: str) -> None:
    # bob has never been online: no consumer exists yet.
    sent = [await alice.messages.send("bob", f"message {i}") for i in range(5)]
    await alice.messages.send("carol", "not for bob")
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="bob") as bob:
        got = await bob.messages.inbox("bob")
        assert [m.id for m in got] == sent
        assert [m.text for m in got] == [f"message {i}" for i in range(5)]
        assert all(m.sender == "alice" and m.to == "bob" for m in got)
        assert await bob.messages.inbox("bob") == []
    # bob goes away again; two more arrive meanwhile
    later = [await alice.messages.send("bob", "while away 1"),
             await alice.messages.send("bob", "while away 2")]
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="bob") as bob:
        got = await bob.messages.inbox("bob", limit=10)
        assert [m.id for m in got] == later
        assert await bob.messages.inbox("bob") == []


@pytest.mark.integration
async def test_subscribe_is_pushed_and_resumes_after_a_crash(alice: Swarm, nats_url: str,
                                                             swarm_name: str) -> None:
    first = await alice.messages.send("bob", "one")
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="bob") as bob:
        stream = bob.messages.subscribe("bob")
        got = await asyncio.wait_for(anext(stream), 5)
        assert got.id == first
        # a live one is pushed while the subscriber waits
        waiter = asyncio.ensure_future(asyncio.wait_for(anext(stream), 5))
        await asyncio.sleep(0)
        second = await alice.messages.send("bob", "two")
        assert (await waiter).id == second
        # dies while handling "two": it was never acked by asking for the next
        await stream.aclose()
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="bob") as bob:
        # closing the subscription handed "two" back: delivered again, once
        again = await bob.messages.inbox("bob", wait_s=5)
        assert [(m.id, m.deliveries) for m in again] == [(second, 2)]
        assert await bob.messages.inbox("bob") == []


@pytest.mark.integration
async def test_topics_threads_and_receipts(alice: Swarm, nats_url: str, swarm_name: str) -> None:
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="bob") as bob:
        assert await bob.messages.join("bob", "deploys") == ["deploys"]
        q = await alice.messages.send(None, "deploying v2", topic="deploys", ack_required=True,
                                      importance="high")
        got = await bob.messages.inbox("bob")
        assert [(m.id, m.topic, m.importance) for m in got] == [(q, "deploys", "high")]
        reply = await bob.messages.send("alice", "ok", reply_to=q)
        again = await alice.messages.send("bob", "thanks", reply_to=reply)
        assert (await alice.messages.get(reply)).thread_id == q
        assert (await alice.messages.get(again)).thread_id == q
        assert await bob.messages.leave("bob", "deploys") == []
        await alice.messages.send(None, "nobody listens", topic="deploys")
        assert [m.text for m in await bob.messages.inbox("bob")] == ["thanks"]
        with pytest.raises(NotFound):
            await bob.messages.ack("bob", ev.new_id())
        with pytest.raises(InvalidInput):
            await alice.messages.send("bob", "x", topic="deploys")
        with pytest.raises(InvalidInput):
            await alice.messages.send("bad name!", "x")


@pytest.mark.integration
async def test_ack_required_shows_as_overdue_until_acked(alice: Swarm, nats_url: str,
                                                         swarm_name: str) -> None:
    mid = await alice.messages.send("bob", "review my patch", ack_required=True)
    await alice.messages.send("bob", "no ack needed")
    late = await alice.messages.overdue(older_than_s=0)
    assert [(m.id, m.to) for m in late] == [(mid, "bob")]
    assert await alice.messages.overdue(older_than_s=3600) == []
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="bob") as bob:
        await bob.messages.ack("bob", mid)
        await bob.messages.ack("bob", mid)  # idempotent
    assert await alice.messages.overdue(older_than_s=0) == []
    types = [s.event.type for s in await alice.log.entity_events("message", mid)]
    assert types == ["MessageSent", "MessageAcked"]


def _cfctl(env: dict[str, str], *args: str, agent: str) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).parent / "cfctl")
    return subprocess.run([exe, *args], env={**env, "CFLOW_AGENT": agent}, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.integration
def test_cli_send_inbox_ack_overdue(cli_env: dict[str, str]) -> None:
    sent = _cfctl(cli_env, "msg", "send", "bob", "please review", "--ack-required",
                  agent="alice")
    assert sent.returncode == 0, sent.stderr
    mid = sent.stdout.strip()
    late = _cfctl(cli_env, "--json", "msg", "overdue", "--older-than", "0", agent="alice")
    assert [m["id"] for m in json.loads(late.stdout)] == [mid]
    box = _cfctl(cli_env, "--json", "msg", "inbox", agent="bob")
    assert [(m["id"], m["text"]) for m in json.loads(box.stdout)] == [(mid, "please review")]
    assert "no new messages" in _cfctl(cli_env, "msg", "inbox", agent="bob").stderr
    assert _cfctl(cli_env, "msg", "ack", mid, agent="bob").returncode == 0
    assert "nothing overdue" in _cfctl(cli_env, "msg", "overdue", "--older-than", "0",
                                       agent="alice").stderr
    bad = _cfctl(cli_env, "msg", "send", "bob", agent="alice")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error:")
