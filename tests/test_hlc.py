"""Hybrid logical clock: property tests for the rules in cflow/hlc.py."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cflow.errors import ClockOffsetError, InvalidInput
from cflow.hlc import (
    DEFAULT_MAX_OFFSET_MS,
    ENCODED_LEN,
    HEX_LEN,
    LOGICAL_MAX,
    NODE_MAX,
    WALL_MAX,
    HybridClock,
    Timestamp,
    node_id,
)

# Wall clocks well inside the 48-bit range, so "borrowing" a millisecond never overflows.
walls = st.integers(min_value=0, max_value=WALL_MAX // 2)
local_walls = st.integers(min_value=1, max_value=WALL_MAX // 2)  # a fresh clock sits at 0
logicals = st.integers(min_value=0, max_value=LOGICAL_MAX)
nodes = st.integers(min_value=0, max_value=NODE_MAX)
stamps = st.builds(Timestamp, walls, logicals, nodes)
full_stamps = st.builds(
    Timestamp,
    st.integers(min_value=0, max_value=WALL_MAX),
    logicals,
    nodes,
)


def clock_at(wall: int, logical: int, node: int = 1, max_offset_ms: int = 500) -> HybridClock:
    """A clock whose last stamp is (wall, logical): drive it there through its own API."""
    assert wall >= 1
    clock = HybridClock(node, max_offset_ms=max_offset_ms)
    clock.now(wall)
    if logical:
        clock.observe(Timestamp(wall, logical - 1, node), wall)
    assert clock.last == Timestamp(wall, logical, node)
    return clock


# ---------------------------------------------------------------- now()


@given(st.lists(walls, min_size=1, max_size=200))
def test_now_is_strictly_monotonic_for_any_wall_clock(wall_readings: list[int]) -> None:
    # The wall clock jumps around, including backwards and standing still.
    clock = HybridClock("node-a")
    previous = clock.last
    for wall in wall_readings:
        stamp = clock.now(wall)
        assert stamp > previous
        assert stamp.node == clock.node
        previous = stamp


@given(walls, st.integers(min_value=1, max_value=10_000))
def test_now_keeps_wall_and_bumps_logical_when_wall_clock_goes_back(wall: int, back: int) -> None:
    clock = HybridClock(7)
    first = clock.now(wall)
    second = clock.now(max(0, wall - back))
    assert (second.wall_ms, second.logical) == (first.wall_ms, first.logical + 1)


@given(walls, st.integers(min_value=1, max_value=10_000))
def test_now_adopts_a_wall_clock_that_moved_forward(wall: int, ahead: int) -> None:
    clock = HybridClock(7)
    clock.now(wall)
    clock.now(wall)
    stamp = clock.now(wall + ahead)
    assert (stamp.wall_ms, stamp.logical) == (wall + ahead, 0)


@given(walls)
def test_now_never_runs_ahead_of_wall_clock_without_overflow(wall: int) -> None:
    clock = HybridClock(3)
    for _ in range(50):
        assert clock.now(wall).wall_ms == wall


def test_logical_overflow_borrows_a_millisecond_and_stays_monotonic() -> None:
    clock = clock_at(1_000, LOGICAL_MAX)
    before = clock.last
    after = clock.now(1_000)
    assert after > before
    assert (after.wall_ms, after.logical) == (1_001, 0)
    # The same holds when a receive pushes the counter past its range.
    clock = clock_at(2_000, LOGICAL_MAX - 1)
    merged = clock.observe(Timestamp(2_000, LOGICAL_MAX, 99), 2_000)
    assert merged > Timestamp(2_000, LOGICAL_MAX, NODE_MAX)
    assert (merged.wall_ms, merged.logical) == (2_001, 0)


@given(local_walls, st.integers(min_value=LOGICAL_MAX - 3, max_value=LOGICAL_MAX),
       st.integers(min_value=1, max_value=20))
def test_counter_overflow_sequence_is_monotonic(wall: int, logical: int, steps: int) -> None:
    clock = clock_at(wall, logical)
    previous = clock.last
    for _ in range(steps):
        stamp = clock.now(wall)  # the wall clock is stuck: only the counter can move
        assert stamp > previous
        assert 0 <= stamp.logical <= LOGICAL_MAX
        previous = stamp


# ------------------------------------------------------------ observe()


@given(local_walls, logicals, stamps, st.integers(min_value=-5_000, max_value=5_000))
def test_observe_result_exceeds_local_last_and_remote(
    local_wall: int, local_logical: int, remote: Timestamp, skew: int
) -> None:
    clock = clock_at(local_wall, local_logical, node=1, max_offset_ms=10**15)
    before = clock.last
    wall = max(0, remote.wall_ms + skew)
    merged = clock.observe(remote, wall)
    assert merged > before
    assert merged > remote
    assert merged.node == clock.node
    assert clock.last == merged


@given(local_walls, logicals, walls, logicals, walls)
def test_observe_follows_kulkarni_receive_rule(
    lw: int, lc: int, rw: int, rc: int, pt: int
) -> None:
    clock = clock_at(lw, lc, node=5, max_offset_ms=10**15)
    merged = clock.observe(Timestamp(rw, rc, 9), pt)
    wall = max(lw, rw, pt)
    if wall == lw == rw:
        logical = max(lc, rc) + 1
    elif wall == lw:
        logical = lc + 1
    elif wall == rw:
        logical = rc + 1
    else:
        logical = 0
    if logical > LOGICAL_MAX:
        wall, logical = wall + 1, 0
    assert (merged.wall_ms, merged.logical) == (wall, logical)


@given(st.lists(st.tuples(st.booleans(), walls, logicals, walls), min_size=1, max_size=100))
def test_mixed_sends_and_receives_stay_monotonic(
    steps: list[tuple[bool, int, int, int]],
) -> None:
    clock = HybridClock("mixed", max_offset_ms=10**15)
    previous = clock.last
    for is_receive, remote_wall, remote_logical, wall in steps:
        if is_receive:
            stamp = clock.observe(Timestamp(remote_wall, remote_logical, 42), wall)
        else:
            stamp = clock.now(wall)
        assert stamp > previous
        previous = stamp


@given(local_walls, logicals, walls, st.integers(min_value=0, max_value=5_000))
def test_remote_beyond_max_offset_is_refused_and_clock_unchanged(
    lw: int, lc: int, wall: int, offset: int
) -> None:
    clock = clock_at(lw, lc, max_offset_ms=offset)
    before = clock.last
    remote = Timestamp(wall + offset + 1, 0, 77)
    with pytest.raises(ClockOffsetError) as info:
        clock.observe(remote, wall)
    err = info.value
    assert (err.remote_ms, err.local_ms, err.max_offset_ms) == (wall + offset + 1, wall, offset)
    assert "\n" not in str(err)
    assert clock.last == before
    # The clock still works normally afterwards.
    assert clock.now(wall) > before


@given(walls, st.integers(min_value=0, max_value=5_000))
def test_remote_exactly_at_max_offset_is_accepted(wall: int, offset: int) -> None:
    clock = HybridClock(1, max_offset_ms=offset)
    merged = clock.observe(Timestamp(wall + offset, 3, 2), wall)
    assert (merged.wall_ms, merged.logical) == (wall + offset, 4)


def test_default_max_offset_is_500_ms() -> None:
    assert DEFAULT_MAX_OFFSET_MS == 500
    clock = HybridClock("n")
    clock.observe(Timestamp(10_500, 0, 2), 10_000)
    with pytest.raises(ClockOffsetError):
        clock.observe(Timestamp(11_001, 0, 2), 10_000)


def test_negative_max_offset_is_invalid() -> None:
    with pytest.raises(InvalidInput):
        HybridClock("n", max_offset_ms=-1)


# ------------------------------------------------------------- ordering


@given(local_walls, logicals, st.integers(min_value=0, max_value=NODE_MAX - 1))
def test_node_is_the_final_tie_break(wall: int, logical: int, node: int) -> None:
    a, b = HybridClock(node), HybridClock(node + 1)
    sa = a.now(wall) if logical == 0 else clock_at(wall, logical, node).last
    sb = b.now(wall) if logical == 0 else clock_at(wall, logical, node + 1).last
    assert sa != sb
    assert sa < sb
    assert sa.encode() < sb.encode()


@given(full_stamps, full_stamps)
def test_byte_and_hex_order_equal_time_order(a: Timestamp, b: Timestamp) -> None:
    key = (a.wall_ms, a.logical, a.node) < (b.wall_ms, b.logical, b.node)
    assert (a < b) == key
    assert (a.encode() < b.encode()) == key
    assert (str(a) < str(b)) == key
    assert (a == b) == (a.encode() == b.encode()) == (str(a) == str(b))


@given(full_stamps)
def test_encoding_is_fixed_width_and_round_trips(stamp: Timestamp) -> None:
    raw = stamp.encode()
    text = str(stamp)
    assert len(raw) == ENCODED_LEN
    assert len(text) == HEX_LEN
    assert re.fullmatch(r"[0-9a-f]{32}", text)
    assert Timestamp.decode(raw) == stamp
    assert Timestamp.parse(text) == stamp


@given(st.binary().filter(lambda b: len(b) != ENCODED_LEN))
def test_decode_refuses_wrong_length(raw: bytes) -> None:
    with pytest.raises(InvalidInput):
        Timestamp.decode(raw)


@given(st.text(max_size=40))
def test_parse_returns_a_stamp_or_raises_invalid_input(text: str) -> None:
    try:
        stamp = Timestamp.parse(text)
    except InvalidInput:
        return
    assert str(stamp) == text.lower()


@pytest.mark.parametrize(
    ("wall", "logical", "node"),
    [(-1, 0, 0), (WALL_MAX + 1, 0, 0), (0, -1, 0), (0, LOGICAL_MAX + 1, 0), (0, 0, -1),
     (0, 0, NODE_MAX + 1)],
)
def test_out_of_range_fields_are_refused(wall: int, logical: int, node: int) -> None:
    with pytest.raises(InvalidInput):
        Timestamp(wall, logical, node)


def test_readable_form() -> None:
    stamp = Timestamp(1_795_458_750_123, 5, 0x3FA2C1D09E4B7A11)
    assert stamp.readable() == "2026-11-23T18:32:30.123Z+5@3fa2c1d09e4b7a11"
    assert str(stamp) == "01a209ae56ab00053fa2c1d09e4b7a11"


@given(full_stamps)
def test_readable_form_shows_every_part(stamp: Timestamp) -> None:
    text = stamp.readable()
    match = re.fullmatch(
        r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.(\d{3})Z|(\d+)ms)\+(\d+)@([0-9a-f]{16})", text
    )
    assert match is not None, text
    if match.group(2) is not None:
        assert int(match.group(2)) == stamp.wall_ms % 1000
    else:  # beyond year 9999 there is no calendar form
        assert int(match.group(3)) == stamp.wall_ms > 253_402_300_799_999
    assert int(match.group(4)) == stamp.logical
    assert int(match.group(5), 16) == stamp.node


def test_node_id_is_stable_and_64_bit() -> None:
    assert node_id("host-a") == node_id("host-a")
    assert node_id("host-a") != node_id("host-b")
    assert 0 <= node_id("host-a") <= NODE_MAX
    assert HybridClock("host-a").node == node_id("host-a")
