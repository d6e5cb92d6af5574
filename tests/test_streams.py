"""The JetStream adapter: pure builders (no server), then append/read/follow/KV on a real one."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

from cflow import events as ev
from cflow.errors import (
    CflowError,
    ConcurrencyConflict,
    InvalidInput,
    NotFound,
    Unavailable,
)
from cflow.hlc import Timestamp
from cflow.server import free_port
from cflow.streams import (
    BadMessage,
    EventLog,
    StoredEvent,
    build_append,
    build_kv_delete,
    build_kv_put,
    connect,
    ensure_swarm,
    names,
    swarm_resources,
)
from cflow.streams.client import (
    EXPECTED_LAST_SUBJECT_SEQ,
    KV_OPERATION,
    MARKER_REASON,
    MSG_ID,
    TTL,
    api_request,
    ensure_stream,
    satisfies,
    ttl_header,
)
from cflow.streams.definitions import ephemeral_bucket
from cflow.streams.errors import (
    CONSUMER_NOT_FOUND,
    MESSAGE_TOO_LARGE,
    MSG_TTL_INVALID,
    NO_MESSAGE_FOUND,
    STREAM_NOT_FOUND,
    WRONG_LAST_SEQUENCE,
    nats_errors,
    translate,
)

HLC = "0000000003e8000000000000000000aa"


def event(data: ev.EventData | None = None, entity_id: str = "t1", swarm: str = "s1"
          ) -> ev.Event:
    return ev.make_event(data or ev.TaskCreated(title="x"), swarm=swarm, entity_id=entity_id,
                         hlc=HLC, actor="a")


# ====================================================== pure builders (no server)


def test_build_append_subject_headers_payload() -> None:
    e = event(entity_id="task-9", swarm="blue")
    out = build_append(e)
    assert out.subject == "cf.blue.evt.task.task-9"
    assert out.subject == names.event_subject("blue", "task", "task-9")
    assert out.headers == {MSG_ID: e.id}
    assert ev.decode(out.payload) == e


def test_build_append_with_expected_sequence_and_msg_id() -> None:
    e = event()
    out = build_append(e, expected_last_seq=0, msg_id="create-t1")
    assert out.headers == {MSG_ID: "create-t1", EXPECTED_LAST_SUBJECT_SEQ: "0"}
    assert build_append(e, expected_last_seq=42).headers[EXPECTED_LAST_SUBJECT_SEQ] == "42"


def test_builders_return_a_fresh_headers_dict_each_call() -> None:
    # nats-py mutates the dict it is given; two messages must never share one.
    e = event()
    first, second = build_append(e), build_append(e)
    assert first.headers == second.headers
    assert first.headers is not second.headers
    first.headers["Nats-Expected-Stream"] = "mutated"
    assert "Nats-Expected-Stream" not in build_append(e).headers
    a, b = build_kv_put("bk", "k", b"v", ttl_s=5), build_kv_put("bk", "k", b"v", ttl_s=5)
    assert a.headers is not b.headers
    c, d = build_kv_delete("bk", "k"), build_kv_delete("bk", "k")
    assert c.headers is not d.headers


def test_build_kv_put_headers() -> None:
    out = build_kv_put("cf_s_leases", "task-1", b"{}", expected_revision=7, ttl_s=1.2,
                       msg_id="m1")
    assert out.subject == "$KV.cf_s_leases.task-1"
    assert out.payload == b"{}"
    assert out.headers == {EXPECTED_LAST_SUBJECT_SEQ: "7", TTL: "2s", MSG_ID: "m1"}
    assert build_kv_put("b", "k", b"").headers == {}


@pytest.mark.parametrize(("ttl", "header"), [(0.1, "1s"), (1, "1s"), (1.0001, "2s"), (30, "30s"),
                                             (0, "1s")])
def test_ttl_header_is_whole_seconds_at_least_one(ttl: float, header: str) -> None:
    assert ttl_header(ttl) == header


def test_build_kv_delete_and_purge() -> None:
    assert build_kv_delete("b", "k").headers == {KV_OPERATION: "DEL"}
    purge = build_kv_delete("b", "k", purge=True, expected_revision=3)
    assert purge.headers == {KV_OPERATION: "PURGE", "Nats-Rollup": "sub",
                             EXPECTED_LAST_SUBJECT_SEQ: "3"}
    assert purge.payload == b""


def test_swarm_resources_declare_every_stream_and_bucket() -> None:
    specs = {s.name: s for s in swarm_resources("sw", replicas=3)}
    assert set(specs) == {
        "CF_sw_EVENTS", "CF_sw_MSGS", "KV_cf_sw_leases", "KV_cf_sw_presence",
        "KV_cf_sw_memory", "KV_cf_sw_reservations", "KV_cf_sw_control", "CF_sw_OFFERS",
    }
    events_cfg = specs["CF_sw_EVENTS"].config()
    assert events_cfg["subjects"] == ["cf.sw.evt.>"]
    assert events_cfg["num_replicas"] == 3
    assert events_cfg["duplicate_window"] > 0
    assert events_cfg["storage"] == "file"
    leases = specs["KV_cf_sw_leases"].config()
    assert leases["allow_msg_ttl"] is True
    assert leases["subject_delete_marker_ttl"] > 0
    assert leases["max_msgs_per_subject"] == 1
    assert "allow_msg_ttl" not in specs["KV_cf_sw_control"].config()
    memory = {name for name, spec in specs.items() if spec.storage == "memory"}
    assert memory == {"KV_cf_sw_leases", "KV_cf_sw_presence"}


def test_only_memory_buckets_are_created_again_where_found_missing() -> None:
    spec = ephemeral_bucket("sw", "KV_cf_sw_leases", replicas=3)
    assert spec is not None and spec.storage == "memory" and spec.replicas == 3
    assert ephemeral_bucket("sw", "KV_cf_sw_presence") is not None
    for stream in ("CF_sw_EVENTS", "KV_cf_sw_memory", "KV_cf_sw_control", "KV_cf_other_leases"):
        assert ephemeral_bucket("sw", stream) is None, stream


@pytest.mark.parametrize("replicas", [0, 2, 5])
def test_swarm_resources_refuse_other_replica_counts(replicas: int) -> None:
    with pytest.raises(InvalidInput):
        swarm_resources("sw", replicas)


# ---------------------------------------------------------------- translation


def api_error(err_code: int, code: int = 400) -> nats.js.errors.APIError:
    return nats.js.errors.APIError(code=code, err_code=err_code, description="desc")


def test_translate_wrong_last_sequence_is_a_concurrency_conflict() -> None:
    err = translate(api_error(WRONG_LAST_SEQUENCE), subject="cf.s.evt.task.t", expected=4)
    assert isinstance(err, ConcurrencyConflict)
    assert (err.subject, err.expected) == ("cf.s.evt.task.t", 4)


@pytest.mark.parametrize("code", [STREAM_NOT_FOUND, NO_MESSAGE_FOUND, CONSUMER_NOT_FOUND])
def test_translate_not_found_codes(code: int) -> None:
    assert isinstance(translate(api_error(code, 404), subject="x"), NotFound)


@pytest.mark.parametrize("code", [MSG_TTL_INVALID, MESSAGE_TOO_LARGE])
def test_translate_refused_writes_are_invalid_input(code: int) -> None:
    assert isinstance(translate(api_error(code)), InvalidInput)


def test_translate_other_api_errors_keep_the_code() -> None:
    err = translate(api_error(10999))
    assert type(err) is CflowError
    assert "10999" in str(err)


@pytest.mark.parametrize(
    "exc",
    [nats.js.errors.ServiceUnavailableError(code=503, description="down"),
     nats.errors.NoRespondersError(), nats.errors.TimeoutError(), TimeoutError(),
     nats.errors.NoServersError(), nats.errors.ConnectionClosedError(),
     ConnectionRefusedError(), nats.errors.Error("odd")],
)
def test_translate_transport_failures_are_unavailable(exc: BaseException) -> None:
    err = translate(exc)
    assert isinstance(err, Unavailable)
    assert "\n" not in str(err)


def test_translate_keeps_our_errors_and_reraises_bugs() -> None:
    ours = NotFound("task", "t")
    assert translate(ours) is ours
    with pytest.raises(KeyError):
        translate(KeyError("a bug, not a NATS failure"))


def test_nats_errors_context_translates_and_chains() -> None:
    with pytest.raises(ConcurrencyConflict) as info, nats_errors("subj", 3):
        raise api_error(WRONG_LAST_SEQUENCE)
    assert info.value.expected == 3
    assert isinstance(info.value.__cause__, nats.js.errors.APIError)


async def test_unreachable_url_is_unavailable_in_one_line() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    async with asyncio.timeout(10):
        with pytest.raises(Unavailable) as info:
            await connect(url, connect_timeout=0.5)
    text = str(info.value)
    assert "\n" not in text
    assert url in text
    assert "cfctl up" in text
    assert isinstance(info.value, ConnectionError)


# ============================================================ real server

integration = pytest.mark.integration


@integration
async def test_append_returns_sequence_and_reads_back(log: EventLog) -> None:
    data = ev.TaskCreated(title="first", priority=2, capabilities=("py",))
    appended = await log.append(data, "task-1", expected=0)
    assert appended.seq >= 1
    assert not appended.duplicate
    stored = await log.get(appended.seq)
    assert isinstance(stored, StoredEvent)
    assert stored.event == appended.event
    assert stored.event.data == data
    assert stored.subject == names.event_subject(log.swarm, "task", "task-1")
    assert await log.last_seq("task", "task-1") == appended.seq
    assert await log.last_seq("task", "nope") == 0


@integration
async def test_same_event_id_appended_twice_is_stored_once(log: EventLog) -> None:
    e = log.event(ev.TaskCreated(title="once"), "task-dup")
    first = await log.append_event(e)
    second = await log.append_event(e)
    assert not first.duplicate
    assert second.duplicate
    assert second.seq == first.seq
    # Same Msg-Id with a different payload: still the original, never a second copy.
    third = await log.append(ev.TaskCreated(title="other"), "task-dup", event_id=e.id)
    assert (third.seq, third.duplicate) == (first.seq, True)
    stored = await log.entity_events("task", "task-dup")
    assert [s.seq for s in stored] == [first.seq]
    assert stored[0].event.data == ev.TaskCreated(title="once")
    assert await log.stream_last_seq() == first.seq


@integration
async def test_explicit_msg_id_deduplicates_a_retry_of_the_same_event(log: EventLog) -> None:
    e = log.event(ev.TaskReady(), "t")
    a = await log.append_event(e, msg_id="ready-t-1")
    b = await log.append_event(e, msg_id="ready-t-1")
    assert (b.seq, b.duplicate) == (a.seq, True)
    assert len(await log.entity_events("task", "t")) == 1


@integration
async def test_another_event_under_a_taken_msg_id_is_a_conflict(log: EventLog) -> None:
    """The server's "duplicate" ack names the holder of the Msg-Id; it must be us."""
    a = await log.append(ev.TaskReady(), "t", msg_id="ready-t-1")
    with pytest.raises(ConcurrencyConflict) as info:
        await log.append(ev.TaskReady(), "t", msg_id="ready-t-1")
    assert info.value.actual == a.seq
    assert info.value.held_by == a.event.id
    assert info.value.held_seq == a.seq
    assert "ready-t-1" in str(info.value)
    # With an expected sequence the server refuses before deduplicating (one
    # server); the read-back finds another event under the Msg-Id: a conflict too.
    with pytest.raises(ConcurrencyConflict) as info:
        await log.append(ev.TaskReady(), "t", msg_id="ready-t-1", expected=0)
    assert info.value.actual == a.seq
    assert info.value.held_by == a.event.id
    # Unless the Msg-Id names an intent that any event under it fulfils.
    c = await log.append(ev.TaskReady(), "t", msg_id="ready-t-1", dedupe_by_msg_id=True)
    assert (c.seq, c.duplicate) == (a.seq, True)
    d = await log.append(ev.TaskReady(), "t", msg_id="ready-t-1", expected=0,
                         dedupe_by_msg_id=True)
    assert (d.seq, d.duplicate) == (a.seq, True)
    assert len(await log.entity_events("task", "t")) == 1


@integration
async def test_a_retried_append_that_landed_is_found_by_its_identity(log: EventLog) -> None:
    """The retry of a write whose ack was lost: wrong last sequence, but the write is ours."""
    created = await log.append(ev.TaskCreated(title="x"), "rb", expected=0)
    claim = log.event(ev.TaskClaimed(owner="a", attempt=1, lease_ttl_s=5), "rb")
    first = await log.append_event(claim, expected=created.seq, msg_id=f"claim-rb-{created.seq}")
    # Someone else appends after our (lost-ack) write; the retry still finds ours
    # right after the expected sequence.
    await log.append(ev.TaskReady(), "rb", expected=first.seq)
    again = await log.append_event(claim, expected=created.seq,
                                   msg_id=f"claim-rb-{created.seq}")
    assert (again.seq, again.duplicate) == (first.seq, True)


@integration
async def test_stale_expected_sequence_raises_concurrency_conflict(log: EventLog) -> None:
    created = await log.append(ev.TaskCreated(title="x"), "task-c", expected=0)
    claimed = await log.append(ev.TaskClaimed(owner="a", attempt=1, lease_ttl_s=5), "task-c",
                               expected=created.seq)
    with pytest.raises(ConcurrencyConflict) as info:
        await log.append(ev.TaskClaimed(owner="b", attempt=1, lease_ttl_s=5), "task-c",
                         expected=created.seq)
    err = info.value
    assert err.subject == names.event_subject(log.swarm, "task", "task-c")
    assert err.expected == created.seq
    assert err.actual == claimed.seq
    assert "\n" not in str(err)
    # "Must not exist yet" is the same rule with expected 0.
    with pytest.raises(ConcurrencyConflict) as info:
        await log.append(ev.TaskCreated(title="again"), "task-c", expected=0)
    assert info.value.actual == claimed.seq
    assert [s.seq for s in await log.entity_events("task", "task-c")] == [created.seq, claimed.seq]


@integration
async def test_expected_sequence_is_per_entity(log: EventLog) -> None:
    await log.append(ev.TaskCreated(title="a"), "a", expected=0)
    b = await log.append(ev.TaskCreated(title="b"), "b", expected=0)
    # Other entities' events do not move b's subject sequence.
    await log.append(ev.TaskCreated(title="c"), "c", expected=0)
    assert (await log.append(ev.TaskReady(), "b", expected=b.seq)).seq > b.seq


def one_node_script() -> list[tuple[ev.EventData, str]]:
    return [
        (ev.TaskCreated(title="a", labels={"k": "v"}), "t-a"),
        (ev.AgentRegistered(name="w1", capabilities=("py",)), "w1"),
        (ev.TaskClaimed(owner="w1", attempt=1, lease_ttl_s=10.0), "t-a"),
        (ev.MemoryStored(namespace="n", key="k", value="v", metadata={"x": [1, 2]}), "m-1"),
        (ev.TaskCompleted(epoch=3, result="ok", cost_usd=0.25), "t-a"),
        (ev.AgentStatusChanged(status="idle"), "w1"),
    ]


@integration
async def test_read_back_decodes_to_same_structs_in_hlc_order(log: EventLog) -> None:
    appended = [await log.append(data, ent) for data, ent in one_node_script()]
    items = await log.read()
    assert all(isinstance(i, StoredEvent) for i in items)
    stored = [i for i in items if isinstance(i, StoredEvent)]
    assert [s.seq for s in stored] == [a.seq for a in appended]
    assert [s.event for s in stored] == [a.event for a in appended]
    # One node: HLC order is stream order, as stamps, bytes and hex text.
    stamps = [Timestamp.parse(s.event.hlc) for s in stored]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == len(stamps)
    assert [s.event.hlc for s in stored] == sorted(s.event.hlc for s in stored)
    # Per entity, in order.
    task = await log.entity_events("task", "t-a")
    assert [type(s.event.data).__name__ for s in task] == [
        "TaskCreated", "TaskClaimed", "TaskCompleted"]
    # read() from a later sequence and with a filter.
    assert [i.seq for i in await log.read(start_seq=appended[3].seq)] == [
        a.seq for a in appended[3:]]
    agents = await log.read(names.events_filter(log.swarm, "agent"))
    assert [i.seq for i in agents] == [appended[1].seq, appended[5].seq]


@integration
async def test_read_with_a_filter_that_matches_nothing_returns_empty(log: EventLog) -> None:
    await log.append(ev.TaskCreated(title="a"), "t")
    async with asyncio.timeout(10):
        assert await log.read(names.events_filter(log.swarm, "memory")) == []
        assert await log.read(start_seq=99) == []


@integration
async def test_read_of_an_empty_swarm_is_empty(log: EventLog) -> None:
    async with asyncio.timeout(10):
        assert await log.read() == []


@integration
async def test_follow_yields_history_then_live_events(log: EventLog) -> None:
    before = [await log.append(data, ent) for data, ent in one_node_script()[:3]]
    caught_up = asyncio.Event()
    seen: list[StoredEvent | BadMessage] = []
    later: list[int] = []
    agen = log.follow(caught_up=caught_up)
    try:
        async with asyncio.timeout(15):
            async for item in agen:
                seen.append(item)
                if len(seen) == len(before):
                    await asyncio.wait_for(caught_up.wait(), 5)
                    # Events appended after catching up arrive on the same iterator.
                    for data, ent in one_node_script()[3:]:
                        later.append((await log.append(data, ent)).seq)
                if len(seen) == len(before) + 3:
                    break
    finally:
        await agen.aclose()
    assert [s.seq for s in seen] == [a.seq for a in before] + later
    assert all(isinstance(s, StoredEvent) for s in seen)
    hlcs = [s.event.hlc for s in seen if isinstance(s, StoredEvent)]
    assert hlcs == sorted(hlcs)


@integration
async def test_follow_from_a_sequence_and_caught_up_on_empty(log: EventLog) -> None:
    seqs = [(await log.append(ev.TaskReady(), f"t{i}")).seq for i in range(4)]
    got: list[int] = []
    agen = log.follow(start_seq=seqs[2])
    try:
        async with asyncio.timeout(10):
            async for item in agen:
                got.append(item.seq)
                if len(got) == 2:
                    break
    finally:
        await agen.aclose()
    assert got == seqs[2:]


@integration
async def test_garbage_on_an_event_subject_is_a_bad_message(log: EventLog, nc: NATS) -> None:
    good = await log.append(ev.TaskCreated(title="ok"), "t-g")
    subject = names.event_subject(log.swarm, "task", "t-g")
    js = nc.jetstream()
    bad_seqs = []
    for raw in (b"\xff\xfe garbage", b"{}", b'{"type": "TaskCreated"}', b""):
        bad_seqs.append(int((await js.publish(subject, raw)).seq))
    after = await log.append(ev.TaskReady(), "t-g")

    items = await log.read()
    assert [i.seq for i in items] == [good.seq, *bad_seqs, after.seq]
    bad = [i for i in items if isinstance(i, BadMessage)]
    assert [b.seq for b in bad] == bad_seqs
    assert bad[0].raw == b"\xff\xfe garbage"
    assert all(b.subject == subject and b.error.startswith("malformed event") for b in bad)

    fetched = await log.get(bad_seqs[0])
    assert isinstance(fetched, BadMessage)

    followed: list[StoredEvent | BadMessage] = []
    agen = log.follow()
    try:
        async with asyncio.timeout(10):
            async for item in agen:
                followed.append(item)
                if item.seq == after.seq:
                    break
    finally:
        await agen.aclose()
    assert [type(i).__name__ for i in followed] == [
        "StoredEvent", "BadMessage", "BadMessage", "BadMessage", "BadMessage", "StoredEvent"]
    # entity_events skips what it cannot decode and keeps going.
    assert [s.seq for s in await log.entity_events("task", "t-g")] == [good.seq, after.seq]


@integration
async def test_a_stamp_far_ahead_is_counted_not_adopted(log: EventLog, nc: NATS) -> None:
    future = Timestamp(2**47, 0, 1)
    e = ev.make_event(ev.TaskReady(), swarm=log.swarm, entity_id="t-f", hlc=str(future),
                      actor="skewed")
    appended = await log.append_event(e)
    item = await log.get(appended.seq)
    assert isinstance(item, StoredEvent)
    assert log.clock_refusals == 1
    assert log.clock.last < future


@integration
async def test_append_many(log: EventLog) -> None:
    batch = [(log.event(ev.TaskCreated(title=f"t{i}"), f"bulk-{i}"), 0) for i in range(50)]
    seqs = await log.append_many(batch)
    assert len(seqs) == 50
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 50
    stored = await log.read()
    assert [s.event for s in stored if isinstance(s, StoredEvent)] == [e for e, _ in batch]
    # Replaying the batch is deduplicated by Msg-Id: nothing new is stored.
    again = await log.append_many([(e, None) for e, _ in batch])
    assert again == seqs
    assert await log.stream_last_seq() == seqs[-1]


@integration
async def test_append_many_surfaces_a_conflict(log: EventLog) -> None:
    first = await log.append(ev.TaskCreated(title="x"), "bm", expected=0)
    with pytest.raises(ConcurrencyConflict):
        await log.append_many([(log.event(ev.TaskReady(), "bm"), first.seq + 100)])


@integration
async def test_ensure_swarm_is_idempotent(nc: NATS, swarm_name: str) -> None:
    expected = [s.name for s in swarm_resources(swarm_name)]
    assert await ensure_swarm(nc, swarm_name) == expected
    assert await ensure_swarm(nc, swarm_name) == expected
    assert await ensure_swarm(nc, swarm_name, replicas=1) == expected
    log = EventLog(nc, swarm_name)
    await log.append(ev.TaskCreated(title="kept"), "t")
    # Re-ensuring never loses data.
    await ensure_swarm(nc, swarm_name)
    assert len(await log.entity_events("task", "t")) == 1
    for name in expected:
        info = await api_request(nc, f"$JS.API.STREAM.INFO.{name}")
        assert info["config"]["num_replicas"] == 1


def test_a_stream_as_specified_satisfies_and_more_replicas_still_do() -> None:
    spec = swarm_resources("s1")[3]  # a bucket: TTLs and markers set
    current = {**spec.config(), "metadata": {"_nats.req.level": "0"}, "max_bytes": -1}
    assert satisfies(current, spec)
    assert satisfies({**current, "num_replicas": 3}, spec)  # R3 is never shrunk
    assert satisfies({**current, "storage": "memory"}, spec)  # storage is kept as it is
    assert not satisfies(current, dataclasses.replace(spec, replicas=3))
    assert not satisfies({**current, "description": "other"}, spec)
    assert not satisfies({**current, "allow_msg_ttl": False}, spec)
    events = swarm_resources("s1")[0]  # no TTLs: the server's false/absent match
    assert satisfies({**events.config(), "allow_msg_ttl": False}, events)


@integration
async def test_ensure_swarm_looks_once_and_repairs_only_what_differs(
        nc: NATS, swarm_name: str) -> None:
    specs = swarm_resources(swarm_name)
    await ensure_swarm(nc, swarm_name)  # fresh: creates everything
    seen: list[str] = []

    async def note(msg: Any) -> None:
        seen.append(msg.subject)

    sub = await nc.subscribe("$JS.API.STREAM.>", cb=note)
    try:
        await ensure_swarm(nc, swarm_name)
        await nc.flush()
        # All there, as specified: only the looks (sent together), no writes.
        assert sorted(seen) == sorted(f"$JS.API.STREAM.INFO.{s.name}" for s in specs), seen
        seen.clear()
        # A deleted bucket and a changed stream are put back; nothing else is touched.
        await api_request(nc, f"$JS.API.STREAM.DELETE.{specs[4].name}")
        await api_request(nc, f"$JS.API.STREAM.UPDATE.{specs[0].name}",
                          {**specs[0].config(), "description": "changed"})
        seen.clear()
        await ensure_swarm(nc, swarm_name)
        await nc.flush()
        looks = {f"$JS.API.STREAM.INFO.{s.name}" for s in specs}
        writes = sorted(seen)
        for look in looks:
            writes.remove(look)
        assert writes == sorted([f"$JS.API.STREAM.CREATE.{specs[0].name}",
                                 f"$JS.API.STREAM.INFO.{specs[0].name}",
                                 f"$JS.API.STREAM.UPDATE.{specs[0].name}",
                                 f"$JS.API.STREAM.CREATE.{specs[4].name}"]), writes
    finally:
        await sub.unsubscribe()
    for spec in specs:
        info = await api_request(nc, f"$JS.API.STREAM.INFO.{spec.name}")
        assert satisfies(info["config"], spec)


@integration
async def test_ensure_stream_updates_a_changed_definition(nc: NATS, swarm_name: str) -> None:
    spec = swarm_resources(swarm_name)[0]
    await ensure_stream(nc, spec)
    changed = dataclasses.replace(spec, description="changed", duplicate_window_s=30.0)
    info = await ensure_stream(nc, changed)
    assert info["config"]["description"] == "changed"
    again = await api_request(nc, f"$JS.API.STREAM.INFO.{spec.name}")
    assert again["config"]["duplicate_window"] == 30 * 10**9


@integration
async def test_three_replicas_on_one_server_is_a_clear_error(nc: NATS, swarm_name: str) -> None:
    with pytest.raises(CflowError) as info:
        await ensure_swarm(nc, swarm_name, replicas=3)
    assert "\n" not in str(info.value)


@integration
async def test_missing_stream_is_not_found(nc: NATS, swarm_name: str) -> None:
    log = EventLog(nc, swarm_name)  # never ensured
    with pytest.raises(NotFound):
        await api_request(nc, f"$JS.API.STREAM.INFO.{log.stream}")
    with pytest.raises((NotFound, Unavailable)):
        await log.get(1)


# ------------------------------------------------------------------ raw KV


@integration
async def test_kv_put_get_cas_delete(log: EventLog) -> None:
    bucket = log.bucket(names.CONTROL)
    assert await log.kv_last(bucket, "paused") is None
    r1 = await log.kv_put(bucket, "paused", b"yes", expected_revision=0)
    entry = await log.kv_last(bucket, "paused")
    assert entry is not None
    assert (entry.key, entry.revision, entry.value, entry.operation) == ("paused", r1, b"yes",
                                                                           "PUT")
    assert entry.live
    with pytest.raises(ConcurrencyConflict):
        await log.kv_put(bucket, "paused", b"no", expected_revision=0)
    r2 = await log.kv_put(bucket, "paused", b"no", expected_revision=r1)
    await log.kv_delete(bucket, "paused", expected_revision=r2)
    gone = await log.kv_last(bucket, "paused")
    assert gone is not None
    assert gone.operation == "DEL"
    assert not gone.live
    keys = await log.kv_keys(bucket)
    assert [(k.key, k.operation) for k in keys] == [("paused", "DEL")]
    assert await log.kv_keys(log.bucket(names.PRESENCE)) == []


@integration
async def test_kv_ttl_expiry_leaves_a_marker(log: EventLog, nc: NATS) -> None:
    bucket = log.bucket(names.LEASES)
    subject = names.kv_subject(bucket, "task-ttl")
    js = nc.jetstream()
    # Follow the key's subject, so the marker is awaited rather than polled for.
    sub = await js.subscribe(subject, stream=names.kv_stream(bucket), ordered_consumer=True)
    try:
        revision = await log.kv_put(bucket, "task-ttl", b'{"owner":"a"}', ttl_s=1)
        async with asyncio.timeout(20):
            put = await sub.next_msg(timeout=10)
            assert int(put.metadata.sequence.stream) == revision
            marker = await sub.next_msg(timeout=15)
    finally:
        await sub.unsubscribe()
    assert MARKER_REASON in (marker.headers or {})
    entry = await log.kv_last(bucket, "task-ttl")
    assert entry is not None
    assert entry.operation == "MARKER"
    assert entry.revision == int(marker.metadata.sequence.stream) > revision
    assert not entry.live
    # A new claim can be made with the marker's revision as the expected one.
    again = await log.kv_put(bucket, "task-ttl", b'{"owner":"b"}', expected_revision=entry.revision)
    assert again > entry.revision


@integration
async def test_kv_ttl_on_a_bucket_without_ttl_is_refused(log: EventLog) -> None:
    with pytest.raises(InvalidInput):
        await log.kv_put(log.bucket(names.CONTROL), "k", b"v", ttl_s=5)


# ------------------------------------------------------------------ server time


@integration
async def test_stored_events_and_kv_entries_carry_the_server_timestamp(log: EventLog) -> None:
    appended = await log.append(ev.TaskCreated(title="t"), "ts", expected=0)
    got = await log.get(appended.seq)
    assert got.time_ms > 0
    [stored] = await log.entity_events("task", "ts")
    assert stored.time_ms == got.time_ms
    [read] = await log.read()
    assert read.time_ms == got.time_ms
    followed = log.follow()
    try:
        async with asyncio.timeout(10):
            item = await anext(followed)
    finally:
        await followed.aclose()
    assert item.time_ms == got.time_ms
    bucket = log.bucket(names.CONTROL)
    revision = await log.kv_put(bucket, "k", b"v")
    entry = await log.kv_last(bucket, "k")
    assert entry is not None
    assert entry.revision == revision
    assert entry.time_ms >= got.time_ms
    [listed] = await log.kv_keys(bucket)
    assert listed.time_ms == entry.time_ms


@integration
async def test_kv_entries_are_typed_and_include_markers(log: EventLog) -> None:
    bucket = log.bucket(names.LEASES)
    seen = []
    async with log.kv_entries(bucket) as entries:
        revision = await log.kv_put(bucket, "task-m", b"{}", ttl_s=1)
        async with asyncio.timeout(20):
            async for entry in entries:
                seen.append(entry)
                if entry.operation == "MARKER":
                    break
    put, marker = seen
    assert (put.key, put.revision, put.operation, put.live) == ("task-m", revision, "PUT", True)
    assert (marker.key, marker.operation, marker.live) == ("task-m", "MARKER", False)
    assert marker.time_ms - put.time_ms >= 900  # removed by the server one TTL later


@integration
async def test_server_time_ignores_a_wrong_local_wall_clock(
    log: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The estimate is the server's clock; this host's wall clock may be minutes off."""
    import time

    import cflow.streams.client as client

    assert log.server_now_ms() == 0  # nothing seen yet
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() - 600 * 10**9)
    monkeypatch.setattr(client, "wall_ms", lambda: real() // 10**6 - 600_000)
    monkeypatch.setattr(time, "time", lambda: real() / 1e9 - 600)
    now = await log.server_time_ms()  # probes: nothing fresh seen
    appended = await log.append(ev.TaskCreated(title="t"), "clock", expected=0)
    stored = await log.get(appended.seq)
    # A lower bound: never ahead of a timestamp the server stored after it was taken.
    assert now <= stored.time_ms
    assert stored.time_ms - now < 1000
    assert abs(log.server_now_ms() - stored.time_ms) < 1000
    assert log.server_now_ms() >= stored.time_ms  # the later stamp raised it
    assert abs(await log.server_time_ms() - real() // 10**6) < 1000


def test_server_clock_is_the_largest_lower_bound() -> None:
    from cflow.streams.server_clock import ServerClock

    mono = [100.0]
    clock = ServerClock(lambda: mono[0])
    assert clock.now_ms() == 0
    assert not clock.fresh(10)
    clock.observe(5_000)  # an old message: a bound, but not fresh evidence
    assert not clock.fresh(10)
    mono[0] += 2
    assert clock.now_ms() == 7_000
    clock.observe(6_000)  # older than what we know: ignored
    assert clock.now_ms() == 7_000
    clock.observe(9_000, probe=True)
    assert clock.fresh(10)
    assert clock.now_ms() == 9_000
    mono[0] += 11
    assert not clock.fresh(10)
    clock.observe(20_500)  # a stamp that beats the estimate after a probe: fresh
    assert clock.fresh(10)
    assert clock.now_ms() == 20_500


# ------------------------------------------------------------------ HLC order


def test_stamp_after_a_far_ahead_stamp_is_later_without_moving_the_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node 120 s behind must not stamp a claim before the creation it follows."""
    import cflow.streams.client as client

    log = EventLog.__new__(EventLog)
    from cflow.hlc import HybridClock

    log.clock = HybridClock("lagging", max_offset_ms=500)
    now = 1_800_000_000_000
    monkeypatch.setattr(client, "wall_ms", lambda: now - 120_000)
    created = Timestamp(now, 7, 99)
    stamp = Timestamp.parse(log.stamp(after_hlc=str(created)))
    assert stamp > created
    assert (stamp.wall_ms, stamp.logical) == (now, 8)
    assert log.clock.last.wall_ms == now - 120_000  # not adopted into the clock
    # Within the max offset it is merged (receive rule): later stamps follow it.
    near = Timestamp(now - 120_000 + 300, 3, 99)
    merged = Timestamp.parse(log.stamp(after_hlc=str(near)))
    assert merged > near
    assert Timestamp.parse(log.stamp()) > merged
    # Already later: unchanged rule.
    old = Timestamp(1, 0, 1)
    assert Timestamp.parse(log.stamp(after_hlc=str(old))) > merged


def test_stamp_after_borrows_a_millisecond_at_the_logical_limit() -> None:
    from cflow.hlc import LOGICAL_MAX
    from cflow.streams.client import stamp_after

    after = Timestamp(10, LOGICAL_MAX, 5)
    assert stamp_after(Timestamp(3, 0, 1), after) == Timestamp(11, 0, 1)
    assert stamp_after(Timestamp(12, 0, 1), after) == Timestamp(12, 0, 1)


@integration
async def test_append_after_hlc_orders_the_entity(log: EventLog,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import cflow.streams.client as client

    created = await log.append(ev.TaskCreated(title="x"), "hlc", expected=0)
    real = client.wall_ms
    monkeypatch.setattr(client, "wall_ms", lambda: real() - 120_000)
    fresh = EventLog(log.nc, log.swarm, node="behind")
    claimed = await fresh.append(ev.TaskClaimed(owner="a", attempt=1, lease_ttl_s=5), "hlc",
                                 expected=created.seq, after_hlc=created.event.hlc)
    assert claimed.event.hlc > created.event.hlc


@integration
async def test_send_publishes_a_built_message_with_a_msg_id(log: EventLog) -> None:
    from cflow.streams.client import Outgoing

    stream = names.messages_stream(log.swarm)
    subject = names.message_subject(log.swarm, "to.bob", "m1")
    first = await log.send(Outgoing(subject, {}, b"hello"), stream=stream, expected=0)
    raw = await log.last_message(stream, subject)
    assert raw is not None
    assert raw.seq == first
    assert raw.headers.get(MSG_ID)  # given one, so a retry is deduplicated
    with pytest.raises(ConcurrencyConflict):
        await log.send(Outgoing(subject, {}, b"again"), stream=stream, expected=0)
    with pytest.raises(NotFound) as info:  # at once, not after retrying
        async with asyncio.timeout(3):
            await log.send(Outgoing(names.message_subject("nope", "to.bob", "m"), {}, b"x"),
                           stream=names.messages_stream("nope"))
    assert "cfctl init" in str(info.value)


@integration
async def test_kv_writes_carry_a_msg_id_and_a_retry_is_deduplicated(log: EventLog) -> None:
    bucket = log.bucket(names.CONTROL)
    r1 = await log.kv_put(bucket, "k", b"v", msg_id="put-k-1")
    assert await log.kv_put(bucket, "k", b"v", msg_id="put-k-1") == r1
    entry = await log.kv_last(bucket, "k")
    assert entry is not None
    assert entry.headers[MSG_ID] == "put-k-1"
    r2 = await log.kv_put(bucket, "k", b"w", expected_revision=r1)
    assert r2 > r1
    deleted = await log.kv_delete(bucket, "k", expected_revision=r2)
    gone = await log.kv_last(bucket, "k")
    assert gone is not None
    assert (gone.revision, gone.operation) == (deleted, "DEL")


# ------------------------------------------------------------------ cancellation


async def test_a_cancel_landing_with_the_awaited_result_is_not_swallowed() -> None:
    # Python 3.11's own wait_for returned the result here and dropped the cancel
    # (gh-86296); cflow.streams installs 3.12's, which raises CancelledError.
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[int] = loop.create_future()
    waiting = asyncio.create_task(asyncio.wait_for(reply, 10))
    await asyncio.sleep(0)  # now waiting for the reply
    reply.set_result(1)  # the reply arrives ...
    waiting.cancel()  # ... and the cancel in the same loop iteration
    with pytest.raises(asyncio.CancelledError):
        await waiting


@integration
@pytest.mark.parametrize("replies", [1, 2], ids=["consumer-create", "consumer-info"])
async def test_a_follower_cancelled_as_its_consumer_is_made_stops_and_unsubscribes(
        log: EventLog, nats_url: str, replies: int) -> None:
    # A follower on a fresh swarm is cancelled in the loop iteration its consumer's
    # create (or info) reply arrives in: it stops at once and leaves no subscription.
    # The cancel was lost before (the follower hung in its read loop, subscribed).
    conn = await connect(nats_url)
    follower: asyncio.Task[None] | None = None
    try:
        answered = 0
        reply_handler = conn._request_sub_callback

        async def cancel_on_reply(msg: object) -> None:
            nonlocal answered
            await reply_handler(msg)  # type: ignore[arg-type]
            answered += 1
            if answered == replies and follower is not None:
                follower.cancel()

        conn._request_sub_callback = cancel_on_reply  # type: ignore[method-assign]
        own = EventLog(conn, log.swarm, actor="test")

        async def follow() -> None:
            async for _ in own.follow(caught_up=asyncio.Event()):
                pass

        follower = asyncio.create_task(follow())
        done, _ = await asyncio.wait({follower}, timeout=5)
        assert follower in done and follower.cancelled()
        assert answered == replies
        assert len(conn._subs) == 1  # only nats-py's reply subscription
    finally:
        if follower is not None and not follower.done():
            follower.cancel()
        await conn.close()


async def _pushed_then_cut(proxy: Any, log: EventLog, stream: str, seq: int) -> None:
    """Once the server has pushed ``seq`` into the (held) connection, cut it and heal."""
    async with asyncio.timeout(10):
        while not any(c.delivered.stream_seq >= seq
                      for c in await log.nc.jsm().consumers_info(stream)):
            await asyncio.sleep(0.05)
    proxy.cut()
    proxy.heal()


@integration
async def test_a_follower_gets_the_event_pushed_as_its_connection_dropped(
        log: EventLog, nats_url: str) -> None:
    # The server pushes an event into a connection that then drops (the proxy holds
    # the bytes, then cuts): to the ordered consumer it was delivered. The follower
    # had seen nothing yet, so nats-py's checks (next event, heartbeat's last
    # delivered) never noticed; it now resumes after its last event on reconnect.
    from faults import Proxy

    with Proxy(nats_url, name="follow-drop") as proxy:
        conn = await connect(proxy.url)
        follower: asyncio.Task[int] | None = None
        try:
            caught_up = asyncio.Event()

            async def first() -> int:
                async for item in EventLog(conn, log.swarm, actor="f").follow(
                        caught_up=caught_up):
                    return item.seq
                raise AssertionError("follow ended")

            follower = asyncio.create_task(first())
            await asyncio.wait_for(caught_up.wait(), 10)
            await conn.flush()  # its subscription has reached the server
            proxy.blackhole()
            seq = (await log.append(ev.TaskReady(), "t-drop")).seq
            await _pushed_then_cut(proxy, log, log.stream, seq)
            assert await asyncio.wait_for(follower, 10) == seq
        finally:
            if follower is not None and not follower.done():
                follower.cancel()
            await conn.close()


@integration
async def test_a_kv_watch_gets_the_entry_pushed_as_its_connection_dropped(
        log: EventLog, nats_url: str) -> None:
    # The same for a KV watch (the control cache, presence, leases): a put pushed into
    # a dropping connection reaches the watcher once it is back, exactly once.
    from faults import Proxy

    bucket = log.bucket(names.CONTROL)
    with Proxy(nats_url, name="kv-drop") as proxy:
        conn = await connect(proxy.url)
        try:
            async with EventLog(conn, log.swarm, actor="f").kv_entries(bucket) as entries:
                await conn.flush()  # its subscription has reached the server
                proxy.blackhole()
                revision = await log.kv_put(bucket, "k", b"v1")
                await _pushed_then_cut(proxy, log, names.kv_stream(bucket), revision)
                entry = await asyncio.wait_for(anext(entries), 10)
                assert (entry.key, entry.value, entry.revision) == ("k", b"v1", revision)
                second = await log.kv_put(bucket, "k", b"v2")
                entry = await asyncio.wait_for(anext(entries), 10)
                assert (entry.value, entry.revision) == (b"v2", second)  # no repeat
        finally:
            await conn.close()
