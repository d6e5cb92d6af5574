"""The claim path's messages on nats-py's connection without its task hops
(cflow.streams.fastpath): the bytes, the order on the wire, nats-py's own errors,
a reconnect, and that the bypass still applies to the nats-py installed."""

from __future__ import annotations

import asyncio

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.protocol import command as nats_command

from cflow import events as ev
from cflow.streams import EventLog, fastpath
from cflow.streams.acks import ack_mux
from cflow.streams.client import connect
from faults import Proxy


def test_commands_are_the_bytes_nats_py_sends() -> None:
    assert fastpath.command("a.b", b"hi", "_INBOX.x") == nats_command.pub_cmd(
        "a.b", "_INBOX.x", b"hi")
    headers = {"Nats-Msg-Id": "m-1", "Nats-Expected-Last-Subject-Sequence": "42"}
    head = b"NATS/1.0\r\nNats-Msg-Id: m-1\r\nNats-Expected-Last-Subject-Sequence: 42\r\n\r\n"
    assert fastpath.command("a.b", b"{}", "r", headers) == nats_command.hpub_cmd(
        "a.b", "r", head, b"{}")
    # What nats-py would rewrite or refuse is left to nats-py.
    assert fastpath.command("a", b"", "", {"bad key": "v"}) is None
    assert fastpath.command("a", b"", "", {"K": "two\r\nlines"}) is None
    assert fastpath.command("a", b"", "", {"K": " padded"}) is None


async def test_the_bypass_applies_to_the_installed_nats_py(log: EventLog) -> None:
    """If a nats-py upgrade renames what the fast path uses, this fails (the claim
    path would silently fall back to the slower public API)."""
    nc = log.nc
    assert fastpath.available(nc)
    await log.append(ev.MemoryStored(namespace="kb", key="k", value="v"), "mem")
    mux = ack_mux(nc)
    subs = [s for s in nc._subs.values() if s.subject == f"{mux.prefix}*"]
    assert len(subs) == 1
    assert not isinstance(subs[0]._pending_queue, asyncio.Queue)  # delivered directly
    sent = nc.stats["out_msgs"]
    assert fastpath.publish_now(nc, "cflow.test.fastpath", b"x")
    assert nc.stats["out_msgs"] == sent + 1


async def _collect(nc: NATS, subject: str, n: int) -> tuple[asyncio.Future[list[bytes]], object]:
    got: list[bytes] = []
    done: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()

    async def seen(msg: object) -> None:
        got.append(msg.data)  # type: ignore[attr-defined]
        if len(got) == n and not done.done():
            done.set_result(got)

    sub = await nc.subscribe(subject, cb=seen)
    await nc.flush()
    return done, sub


async def test_the_wire_keeps_the_order_of_the_calls_mixed_with_nats_py(
        nc: NATS, nats_url: str) -> None:
    """Fast and ordinary publishes interleaved, some in one iteration, some with
    nats-py's buffer already holding commands: received in call order."""
    listener = await connect(nats_url)
    try:
        done, _ = await _collect(listener, "cflow.test.order", 300)
        for i in range(300):
            data = str(i).encode()
            if i % 3 == 0:
                await nc.publish("cflow.test.order", data)
            else:
                await fastpath.publish(nc, "cflow.test.order", data)
            if i % 7 == 0:
                await asyncio.sleep(0)  # let a write go out between some of them
        got = await asyncio.wait_for(done, 10)
        assert got == [str(i).encode() for i in range(300)]
    finally:
        await listener.close()


async def test_nats_py_errors_stay_nats_py_errors(nc: NATS) -> None:
    with pytest.raises(nats.errors.BadHeaderError):
        await fastpath.publish(nc, "cflow.test.x", b"", headers={"bad key": "v"})
    with pytest.raises(nats.errors.MaxPayloadError):
        await fastpath.publish(nc, "cflow.test.x", b"x" * (nc.max_payload + 1))
    with pytest.raises(nats.errors.BadSubjectError):
        await fastpath.publish(nc, "", b"x")


async def test_a_handler_that_raises_does_not_stop_the_connection(nc: NATS) -> None:
    seen: list[bytes] = []

    def handle(msg: object) -> None:
        seen.append(msg.data)  # type: ignore[attr-defined]
        raise RuntimeError("handler bug")

    async def unused(msg: object) -> None:
        raise AssertionError("the queue was bypassed")

    sub = await nc.subscribe("cflow.test.direct", cb=unused)
    assert fastpath.deliver_directly(sub, handle)
    for i in range(200):
        await nc.publish("cflow.test.direct", b"%d" % i)
    reply = await nc.request("$JS.API.INFO", b"", timeout=5)  # the reader is still alive
    assert reply.data
    assert seen == [b"%d" % i for i in range(200)]
    assert sub._pending_size == 0  # never counted as queued: no slow-consumer drops


async def test_publishes_during_a_reconnect_go_out_once_reconnected(nats_url: str) -> None:
    with Proxy(nats_url) as proxy:
        nc = await nats.connect(proxy.url, max_reconnect_attempts=-1, reconnect_time_wait=0.05,
                                ping_interval=1)
        listener = await nats.connect(nats_url)
        try:
            got: asyncio.Queue[bytes] = asyncio.Queue()

            async def seen(msg: object) -> None:
                got.put_nowait(msg.data)  # type: ignore[attr-defined]

            await listener.subscribe("cflow.test.reconnect", cb=seen)
            await listener.flush()
            await fastpath.publish(nc, "cflow.test.reconnect", b"0")
            assert await asyncio.wait_for(got.get(), 10) == b"0"
            proxy.down()
            while nc.is_connected:
                await asyncio.sleep(0.01)
            await fastpath.publish(nc, "cflow.test.reconnect", b"1")  # nats-py buffers it
            proxy.heal()
            await fastpath.publish(nc, "cflow.test.reconnect", b"2")
            assert [await asyncio.wait_for(got.get(), 15) for _ in range(2)] == [b"1", b"2"]
        finally:
            await nc.close()
            await listener.close()
