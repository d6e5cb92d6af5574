"""A replay's one-pass decoder gives what ``decode_delivery`` gives, for any bytes:
the same event (same fields, same encoding) or the same bad message and error."""

from __future__ import annotations

import json
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cflow import events as ev
from cflow.projections.replay import decode_replayed
from cflow.streams.client import BadMessage, StoredEvent, decode_delivery
from test_events import HLC, as_dict, events_strategy, json_values, mutate, mutations

SUBJECT = "cf.s1.evt.task.e1"


def assert_same(raw: bytes) -> None:
    expected = decode_delivery(7, SUBJECT, raw, 99)
    got = decode_replayed(7, SUBJECT, raw, 99)
    if isinstance(expected, BadMessage):
        assert got == expected
        return
    assert isinstance(got, StoredEvent)
    assert (got.seq, got.subject, got.time_ms) == (7, SUBJECT, 99)
    assert isinstance(got.event, ev.Event)
    assert msgspec.structs.asdict(got.event) == msgspec.structs.asdict(expected.event)
    assert ev.encode(got.event) == ev.encode(expected.event)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events_strategy)
def test_valid_events_decode_alike(event: ev.Event) -> None:
    assert_same(ev.encode(event))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events_strategy, mutations, st.booleans(), st.data())
def test_mutated_events_decode_alike(event: ev.Event, steps: list[Any], as_v1: bool,
                                     pick: st.DataObject) -> None:
    wire = as_dict(event)
    if as_v1:  # the upcaster path
        wire["v"] = 1
    assert_same(json.dumps(mutate(wire, steps, pick)).encode())


@settings(max_examples=200, deadline=None)
@given(events_strategy, st.integers(min_value=0, max_value=10_000), st.binary(max_size=3))
def test_corrupted_bytes_decode_alike(event: ev.Event, at: int, junk: bytes) -> None:
    raw = ev.encode(event)
    at %= len(raw)
    assert_same(raw[:at] + junk + raw[at + len(junk):])
    assert_same(raw[:at])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_input_decodes_alike(raw: bytes) -> None:
    assert_same(raw)


def test_edge_cases_decode_alike() -> None:
    """Where a cheaper check could differ from msgspec's patterns or the two-step decode."""
    wire = as_dict(ev.make_event(ev.TaskCreated(title="t"), swarm="s1", entity_id="t1",
                                 hlc=HLC, actor="a"))
    raw = json.dumps(wire, separators=(",", ":")).encode()
    cases = [
        raw,
        raw.replace(b'"t1"', b'"t1\\n"'),  # a pattern's $ matches before a final newline
        raw.replace(b'"s1"', b'"s1\\n"'),
        raw.replace(HLC.encode(), HLC.encode() + b"\\n"),
        raw.replace(HLC.encode(), HLC.upper().encode()),
        raw.replace(HLC.encode(), HLC[:-1].encode()),
        raw.replace(b'"t1"', b'"t 1"'),
        raw.replace(b'"t1"', b'"' + b"x" * 129 + b'"'),
        raw.replace(b'"v":2', b'"v":1'),  # upcast
        raw.replace(b'"v":2', b'"v":3'),
        raw.replace(b'"entity_kind":"task"', b'"entity_kind":"agent"'),
        raw.replace(b'"type":"TaskCreated"', b'"type":"TaskClaimed"'),
        raw.replace(b'"type":"TaskCreated"', b'"type":"Task\\u0043reated"'),
        raw.replace(b'"type":"TaskCreated"', b'"type":"TaskCreated","type":"TaskReady"'),
        raw.replace(b'"type":"TaskCreated"', b'"type":"TaskReady","type":"TaskCreated"'),
        raw.replace(b'"id":"', b'"id":"\\"type\\":\\"TaskReady'),
        raw.replace(b'"data":{', b'"data":{"type":"TaskReady",'),
        raw.replace(b'"title":"t"', b'"title":7'),
        b'{"type":"TaskCreated"',
        b'"type":"',
    ]
    for case in cases:
        assert_same(case)
