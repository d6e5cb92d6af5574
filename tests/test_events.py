"""Event envelope and types: round trips, upcasting, and the decoder's contract.

The contract (cflow/events.py): for any input ``decode`` returns an ``Event`` or
raises ``MalformedEvent``; nothing else escapes. It is checked on arbitrary
bytes, arbitrary JSON, and mutations of valid events.
"""

from __future__ import annotations

import inspect
import json
import re
import uuid
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cflow import events as ev
from cflow.errors import InvalidInput, MalformedEvent
from cflow.hlc import HybridClock

HLC = str(HybridClock("test").now(1_795_458_750_123))
UUID7_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

tokens = st.from_regex(r"\A[A-Za-z0-9_\-]{1,40}\Z")
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)


def strategy_for(info: mi.Type) -> st.SearchStrategy[Any]:
    """A hypothesis strategy for one msgspec field type (the shapes events use)."""
    if isinstance(info, mi.StrType):
        return st.text(max_size=30)
    if isinstance(info, mi.BoolType):
        return st.booleans()
    if isinstance(info, mi.IntType):
        return st.integers(min_value=-(2**63), max_value=2**63 - 1)
    if isinstance(info, mi.FloatType):
        # NaN/inf have no JSON form (msgspec writes null); events never carry them.
        return st.floats(allow_nan=False, allow_infinity=False)
    if isinstance(info, mi.NoneType):
        return st.none()
    if isinstance(info, mi.LiteralType):
        return st.sampled_from(info.values)
    if isinstance(info, mi.VarTupleType):
        return st.lists(strategy_for(info.item_type), max_size=4).map(tuple)
    if isinstance(info, mi.DictType):
        return st.dictionaries(strategy_for(info.key_type), strategy_for(info.value_type),
                               max_size=4)
    if isinstance(info, mi.AnyType):
        return json_values
    if isinstance(info, mi.UnionType):
        return st.one_of(*(strategy_for(t) for t in info.types))
    raise AssertionError(f"no strategy for {info!r}: extend strategy_for")


def data_strategy(cls: type[ev.EventData]) -> st.SearchStrategy[ev.EventData]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    required = {f.name: strategy_for(f.type) for f in info.fields if f.required}
    optional = {f.name: strategy_for(f.type) for f in info.fields if not f.required}
    return st.fixed_dictionaries(required, optional=optional).map(lambda kw: cls(**kw))


any_data = st.sampled_from(sorted(ev.EVENT_TYPES)).flatmap(
    lambda name: data_strategy(ev.EVENT_TYPES[name])
)


def wrap(data: ev.EventData, entity_id: str = "e1", swarm: str = "s1") -> ev.Event:
    return ev.make_event(data, swarm=swarm, entity_id=entity_id, hlc=HLC, actor="agent-a")


events_strategy = st.builds(
    wrap, any_data, entity_id=tokens, swarm=tokens
)


def as_dict(event: ev.Event) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(ev.encode(event))
    return out


def decode_json(obj: Any) -> ev.Event:
    return ev.decode(json.dumps(obj).encode())


def valid_task_created() -> dict[str, Any]:
    return as_dict(wrap(ev.TaskCreated(title="t"), entity_id="task-1"))


# ----------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted(ev.EVENT_TYPES))
@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_event_type_round_trips(name: str, data: st.DataObject) -> None:
    cls = ev.EVENT_TYPES[name]
    payload = data.draw(data_strategy(cls))
    event = wrap(payload, entity_id=data.draw(tokens))
    decoded = ev.decode(ev.encode(event))
    assert decoded == event
    assert type(decoded.data) is cls
    assert decoded.type == name
    assert decoded.v == cls.V
    assert decoded.entity_kind == cls.KIND


def test_every_event_type_is_registered_under_its_name_with_a_kind() -> None:
    assert len(ev.EVENT_TYPES) >= 20
    for name, cls in ev.EVENT_TYPES.items():
        assert cls.__name__ == name
        assert cls.KIND, name
        assert cls.V >= 1
        assert cls.__struct_config__.frozen, name
        params = inspect.signature(cls).parameters.values()
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params), name
    required = {
        "TaskCreated", "TaskClaimed", "TaskLeaseExpired", "TaskRequeued", "TaskCompleted",
        "TaskFailed", "TaskReleased", "TaskCancelled", "TaskReady", "AgentRegistered",
        "AgentStatusChanged", "AgentDeregistered", "MemoryStored", "MemoryDeleted",
    }
    assert required <= set(ev.EVENT_TYPES)


def test_envelope_shape_on_the_wire() -> None:
    event = ev.make_event(
        ev.TaskClaimed(owner="a", attempt=1, lease_ttl_s=30.0), swarm="s", entity_id="t1",
        hlc=HLC, actor="a", causation_id="c", correlation_id="r",
    )
    wire = as_dict(event)
    assert set(wire) == {
        "id", "type", "v", "swarm", "entity_kind", "entity_id", "hlc", "actor",
        "causation_id", "correlation_id", "data",
    }
    assert wire["type"] == "TaskClaimed"
    assert wire["entity_kind"] == "task"
    assert wire["data"] == {"owner": "a", "attempt": 1, "lease_ttl_s": 30.0, "deadline_ms": None,
                            "lease": ""}
    assert UUID7_RE.match(wire["id"])


def test_events_are_frozen() -> None:
    data = ev.TaskReady()
    with pytest.raises(AttributeError):
        data.reason = "x"  # type: ignore[misc]


@pytest.mark.parametrize(("field", "value"), [("swarm", "a.b"), ("entity_id", "x y"),
                                              ("swarm", ""), ("entity_id", "*")])
def test_make_event_refuses_unsafe_subject_tokens(field: str, value: str) -> None:
    kwargs = {"swarm": "s", "entity_id": "e"} | {field: value}
    with pytest.raises(InvalidInput):
        ev.make_event(ev.TaskReady(), hlc=HLC, actor="a", **kwargs)


# ------------------------------------------------------------- upcasting


def test_task_created_v1_shape_is_upcast_to_v2() -> None:
    wire = valid_task_created()
    wire["v"] = 1
    wire["data"] = {"title": "build", "needs": ["python", "gpu"], "after": ["task-0"],
                    "priority": 3}
    event = decode_json(wire)
    assert event.v == 2
    assert event.data == ev.TaskCreated(
        title="build", capabilities=("python", "gpu"), depends_on=("task-0",), priority=3
    )


def test_upcast_v1_without_renamed_fields_keeps_defaults() -> None:
    wire = valid_task_created()
    wire["v"] = 1
    wire["data"] = {"title": "plain"}
    assert decode_json(wire).data == ev.TaskCreated(title="plain")


def test_upcaster_is_pure() -> None:
    old = {"title": "x", "needs": ["a"], "after": ["b"]}
    new = ev.upcast_task_created_v1_v2(old)
    assert old == {"title": "x", "needs": ["a"], "after": ["b"]}
    assert new == {"title": "x", "capabilities": ["a"], "depends_on": ["b"]}


def test_every_older_version_has_an_upcaster_chain() -> None:
    for name, cls in ev.EVENT_TYPES.items():
        for version in range(1, cls.V):
            assert (name, version) in ev.UPCASTERS, (name, version)


# ------------------------------------------------- refusals -> MalformedEvent


def test_unknown_type_is_malformed() -> None:
    wire = valid_task_created()
    wire["type"] = "TaskTeleported"
    with pytest.raises(MalformedEvent, match="unknown event type"):
        decode_json(wire)


def test_wrong_entity_kind_is_malformed() -> None:
    wire = valid_task_created()
    wire["entity_kind"] = "agent"
    with pytest.raises(MalformedEvent, match="entity kind"):
        decode_json(wire)


@pytest.mark.parametrize("version", [0, -1, 3, 99])
def test_unsupported_version_is_malformed(version: int) -> None:
    wire = valid_task_created()
    wire["v"] = version
    with pytest.raises(MalformedEvent, match="unsupported version"):
        decode_json(wire)


def test_missing_upcaster_is_malformed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ev, "UPCASTERS", {})
    wire = valid_task_created()
    wire["v"] = 1
    with pytest.raises(MalformedEvent, match="no upcaster"):
        decode_json(wire)


@pytest.mark.parametrize(
    ("field", "value"),
    [("hlc", "not-a-stamp"), ("hlc", "A" * 32), ("swarm", "a.b"), ("entity_id", ""),
     ("v", "2"), ("data", [1, 2]), ("data", None), ("id", 5)],
)
def test_bad_envelope_fields_are_malformed(field: str, value: Any) -> None:
    wire = valid_task_created()
    wire[field] = value
    with pytest.raises(MalformedEvent):
        decode_json(wire)


def test_malformed_event_keeps_subject_and_prints_one_line() -> None:
    with pytest.raises(MalformedEvent) as info:
        ev.decode(b"{\n\n not json", subject="cf.s.evt.task.x")
    assert info.value.subject == "cf.s.evt.task.x"
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_extra_fields_are_ignored() -> None:
    wire = valid_task_created()
    wire["added_later"] = {"nested": [1, 2]}
    wire["data"]["new_option"] = True
    event = decode_json(wire)
    assert event.data == ev.TaskCreated(title="t")


# ----------------------------------------------------- the decoder contract


def assert_contract(raw: bytes) -> None:
    try:
        event = ev.decode(raw)
    except MalformedEvent:
        return
    assert isinstance(event, ev.Event)
    assert isinstance(event.data, ev.EVENT_TYPES[event.type])


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_decoder_contract_on_arbitrary_bytes(raw: bytes) -> None:
    assert_contract(raw)


@settings(max_examples=300)
@given(json_values)
def test_decoder_contract_on_arbitrary_json(value: Any) -> None:
    assert_contract(json.dumps(value).encode())


@settings(max_examples=300)
@given(st.dictionaries(
    st.sampled_from(["id", "type", "v", "swarm", "entity_kind", "entity_id", "hlc", "actor",
                     "causation_id", "correlation_id", "data", "x"]),
    json_values | st.sampled_from(sorted(ev.EVENT_TYPES)) | st.just(HLC),
))
def test_decoder_contract_on_envelope_shaped_objects(value: dict[str, Any]) -> None:
    assert_contract(json.dumps(value).encode())


Mutation = tuple[str, str, Any]
mutations = st.lists(
    st.tuples(st.sampled_from(["set", "delete", "set_data", "delete_data"]),
              st.text(max_size=12), json_values),
    min_size=1, max_size=4,
)


def mutate(wire: dict[str, Any], steps: list[Mutation], pick: st.DataObject) -> dict[str, Any]:
    for action, key, value in steps:
        keys = sorted(wire)
        data = wire.get("data")
        if action == "set":
            wire[pick.draw(st.sampled_from([*keys, key]))] = value
        elif action == "delete" and keys:
            wire.pop(pick.draw(st.sampled_from(keys)))
        elif action == "set_data" and isinstance(data, dict):
            data[pick.draw(st.sampled_from([*sorted(data), key]))] = value
        elif action == "delete_data" and isinstance(data, dict) and data:
            data.pop(pick.draw(st.sampled_from(sorted(data))))
    return wire


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(events_strategy, mutations, st.booleans(), st.data())
def test_decoder_contract_on_mutated_valid_events(
    event: ev.Event, steps: list[Mutation], as_v1: bool, pick: st.DataObject
) -> None:
    wire = as_dict(event)
    if as_v1:  # also drive the upcaster path with mutated data
        wire["v"] = 1
    assert_contract(json.dumps(mutate(wire, steps, pick)).encode())


@settings(max_examples=200)
@given(events_strategy, st.integers(min_value=0, max_value=10_000), st.binary(max_size=3))
def test_decoder_contract_on_corrupted_bytes(event: ev.Event, at: int, junk: bytes) -> None:
    raw = ev.encode(event)
    at %= len(raw)
    assert_contract(raw[:at] + junk + raw[at + len(junk):])
    assert_contract(raw[:at])


def test_deeply_nested_json_is_malformed_not_a_crash() -> None:
    wire = valid_task_created()
    wire["data"]["labels"] = "x"
    deep = b'{"data":' * 5000 + b"1" + b"}" * 5000
    for raw in (json.dumps(wire).encode(), deep, b"[" * 100_000):
        with pytest.raises(MalformedEvent):
            ev.decode(raw)


# ----------------------------------------------------------------- uuid7


@given(st.integers(min_value=0, max_value=2**48 - 1), st.binary(min_size=10, max_size=10))
def test_uuid7_format(unix_ms: int, rand: bytes) -> None:
    text = ev.uuid7(unix_ms, rand)
    assert UUID7_RE.match(text), text
    parsed = uuid.UUID(text)
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert int(text.replace("-", "")[:12], 16) == unix_ms


@given(st.integers(min_value=0, max_value=2**48 - 2), st.integers(min_value=1, max_value=10**6),
       st.binary(min_size=10, max_size=10), st.binary(min_size=10, max_size=10))
def test_uuid7_sorts_by_time(unix_ms: int, later: int, ra: bytes, rb: bytes) -> None:
    assert ev.uuid7(unix_ms, ra) < ev.uuid7(min(unix_ms + later, 2**48 - 1), rb)


def test_uuid7_needs_ten_random_bytes() -> None:
    with pytest.raises(InvalidInput):
        ev.uuid7(0, b"short")


def test_new_id_is_a_fresh_uuid7() -> None:
    ids = [ev.new_id() for _ in range(100)]
    assert len(set(ids)) == 100
    assert all(UUID7_RE.match(i) for i in ids)


def test_encode_is_msgspec_json() -> None:
    event = wrap(ev.TaskReady())
    assert msgspec.json.decode(ev.encode(event))["data"] == {"reason": "dependencies complete"}
    assert json.loads(ev.encode_data(ev.TaskReady(reason="r"))) == {"reason": "r"}
