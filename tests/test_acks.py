"""Publish acks through the connection's one inbox (cflow.streams.acks): decoding
without a server, then concurrent writes, refusals and a lost answer on a real one."""

from __future__ import annotations

import asyncio

import nats.errors
import nats.js.errors
import pytest
from nats.aio.msg import Msg

from cflow import events as ev
from cflow.errors import ConcurrencyConflict, Unavailable
from cflow.streams import EventLog, build_append, names
from cflow.streams.acks import ack_mux, decode_ack
from cflow.streams.client import Outgoing, publish


def _reply(data: bytes, headers: dict[str, str] | None = None) -> Msg:
    return Msg(_client=None, subject="x", data=data, headers=headers)  # type: ignore[arg-type]


def test_an_ack_decodes_to_its_sequence_and_duplicate_flag() -> None:
    assert decode_ack(_reply(b'{"stream":"S","seq":42}')) == (42, False)
    assert decode_ack(_reply(b'{"stream":"S","seq":7,"duplicate":true}')) == (7, True)


def test_a_refusal_is_the_nats_py_error_with_its_code() -> None:
    body = b'{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 3"}}'
    with pytest.raises(nats.js.errors.APIError) as caught:
        decode_ack(_reply(body))
    assert caught.value.err_code == 10071
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        decode_ack(_reply(b"", {"Status": "503"}))
    with pytest.raises(nats.js.errors.APIError, match="bad publish answer"):
        decode_ack(_reply(b"not json"))


async def test_concurrent_writes_each_get_their_own_ack(log: EventLog) -> None:
    events = [log.event(ev.TaskNoted(task_id=f"t{i % 3}", text=str(i)), f"t{i % 3}")
              for i in range(60)]
    seqs = await asyncio.gather(*(publish(log.js, build_append(e)) for e in events))
    assert sorted(s for s, _ in seqs) == sorted({s for s, _ in seqs})  # all distinct
    again = await publish(log.js, build_append(events[0]))  # same Msg-Id: the same message
    assert again == (seqs[0][0], True)
    assert not ack_mux(log.nc).waiting  # nothing left behind


async def test_a_stale_expectation_is_a_conflict(log: EventLog) -> None:
    first = log.event(ev.TaskNoted(task_id="tc", text="a"), "t-conflict")
    await publish(log.js, build_append(first, expected_last_seq=0))
    second = log.event(ev.TaskNoted(task_id="tc", text="b"), "t-conflict")
    with pytest.raises(ConcurrencyConflict):
        await publish(log.js, build_append(second, expected_last_seq=0), expected=0)


async def test_an_answer_that_never_comes_times_out_as_unavailable(log: EventLog) -> None:
    subject = f"{names.PREFIX}.{log.swarm}.silent"
    sub = await log.nc.subscribe(subject)  # a responder that never answers
    try:
        with pytest.raises(Unavailable) as caught:
            await publish(log.js, Outgoing(subject, {}, b"x"), timeout=0.2)
        assert getattr(caught.value, "reason", None) == "timeout"
        assert not ack_mux(log.nc).waiting
    finally:
        await sub.unsubscribe()
    mux = ack_mux(log.nc)
    await log.nc.close()
    with pytest.raises(nats.errors.Error):  # a closed connection fails the publish itself
        await mux.request(subject, b"x", {}, 0.2)
