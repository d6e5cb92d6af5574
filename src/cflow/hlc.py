"""Hybrid logical clock (Kulkarni, Demirbas et al., 2014).

Theory of operation
-------------------
A stamp is ``(wall_ms, logical, node)``. ``wall_ms`` tracks the largest physical
time this node has seen (its own wall clock or a remote stamp), ``logical``
orders events that share a ``wall_ms``, and ``node`` breaks the last tie so two
nodes never produce equal stamps.

* ``now(wall)``: local or send event. If the wall clock moved past ``wall_ms``
  adopt it with ``logical = 0``; otherwise (same millisecond, or the wall clock
  went backwards) keep ``wall_ms`` and bump ``logical``.
* ``observe(remote, wall)``: receive event. Take the max of our ``wall_ms``, the
  remote ``wall_ms`` and the wall clock; bump ``logical`` past whichever of the
  two stamps carried that maximum.

When ``logical`` would overflow its 16 bits we borrow one millisecond from the
future (``wall_ms + 1, logical = 0``), which keeps the stamp monotonic and
fixed-width. A remote stamp more than ``max_offset_ms`` ahead of our wall clock
is refused with ``ClockOffsetError`` and leaves the clock untouched
(CockroachDB's rule): one bad clock must not drag the whole swarm into the
future.

Encoding: 6 bytes wall_ms, 2 bytes logical, 8 bytes node id, all big-endian, so
byte order equals time order. ``str(stamp)`` is its 32-char hex form, which sorts
the same way and is what events and DuckDB store.

This module is pure: the wall clock is an argument, never read here.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import msgspec

from cflow.errors import ClockOffsetError, InvalidInput

WALL_BITS = 48
LOGICAL_MAX = 0xFFFF
WALL_MAX = (1 << WALL_BITS) - 1
NODE_MAX = (1 << 64) - 1
ENCODED_LEN = 16
HEX_LEN = 32
DEFAULT_MAX_OFFSET_MS = 500


def node_id(name: str) -> int:
    """A stable 64-bit node id derived from a node name."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


# msgspec Structs, not dataclasses: a dataclass costs some 3 ms of every cold start
# to define here (its methods are generated and compiled), a Struct a tenth (issue 18).
class Timestamp(msgspec.Struct, frozen=True, order=True):
    wall_ms: int
    logical: int
    node: int

    def __post_init__(self) -> None:
        if not 0 <= self.wall_ms <= WALL_MAX:
            raise InvalidInput(f"hlc wall_ms out of range: {self.wall_ms}")
        if not 0 <= self.logical <= LOGICAL_MAX:
            raise InvalidInput(f"hlc logical out of range: {self.logical}")
        if not 0 <= self.node <= NODE_MAX:
            raise InvalidInput(f"hlc node out of range: {self.node}")

    def encode(self) -> bytes:
        return (
            self.wall_ms.to_bytes(6, "big")
            + self.logical.to_bytes(2, "big")
            + self.node.to_bytes(8, "big")
        )

    @classmethod
    def decode(cls, raw: bytes) -> Timestamp:
        if len(raw) != ENCODED_LEN:
            raise InvalidInput(f"hlc stamp must be {ENCODED_LEN} bytes, got {len(raw)}")
        return cls(
            int.from_bytes(raw[:6], "big"),
            int.from_bytes(raw[6:8], "big"),
            int.from_bytes(raw[8:], "big"),
        )

    def __str__(self) -> str:
        return self.encode().hex()

    @classmethod
    def parse(cls, text: str) -> Timestamp:
        if len(text) != HEX_LEN:
            raise InvalidInput(f"hlc stamp must be {HEX_LEN} hex chars, got {text!r}")
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise InvalidInput(f"hlc stamp is not hex: {text!r}") from None
        return cls.decode(raw)

    def readable(self) -> str:
        """``2026-11-23T18:32:30.123Z+5@3fa2c1d09e4b7a11``: wall time, logical, node."""
        seconds, millis = divmod(self.wall_ms, 1000)
        try:
            at = datetime.fromtimestamp(seconds, tz=UTC)
        except (ValueError, OverflowError, OSError):
            # Past year 9999 (the 48-bit range reaches year 10889): no calendar form.
            wall = f"{self.wall_ms}ms"
        else:
            wall = at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{millis:03d}Z"
        return f"{wall}+{self.logical}@{self.node:016x}"


class HybridClock:
    """One node's clock. Not thread-safe; one per process (or per event loop)."""

    def __init__(self, node: str | int, *, max_offset_ms: int = DEFAULT_MAX_OFFSET_MS) -> None:
        if max_offset_ms < 0:
            raise InvalidInput("max_offset_ms must be >= 0")
        self.node = node if isinstance(node, int) else node_id(node)
        self.max_offset_ms = max_offset_ms
        self._wall = 0
        self._logical = 0

    @property
    def last(self) -> Timestamp:
        return Timestamp(self._wall, self._logical, self.node)

    def _set(self, wall: int, logical: int) -> Timestamp:
        if logical > LOGICAL_MAX:
            wall, logical = wall + 1, 0
        self._wall, self._logical = wall, logical
        return Timestamp(wall, logical, self.node)

    def now(self, wall_ms: int) -> Timestamp:
        """Stamp a local or send event, given the current wall clock in ms."""
        if wall_ms > self._wall:
            return self._set(wall_ms, 0)
        return self._set(self._wall, self._logical + 1)

    def observe(self, remote: Timestamp, wall_ms: int) -> Timestamp:
        """Merge a received stamp; refuse one too far ahead of ``wall_ms``."""
        if remote.wall_ms - wall_ms > self.max_offset_ms:
            raise ClockOffsetError(remote.wall_ms, wall_ms, self.max_offset_ms)
        wall = max(self._wall, remote.wall_ms, wall_ms)
        if wall == self._wall and wall == remote.wall_ms:
            logical = max(self._logical, remote.logical) + 1
        elif wall == self._wall:
            logical = self._logical + 1
        elif wall == remote.wall_ms:
            logical = remote.logical + 1
        else:
            logical = 0
        return self._set(wall, logical)


__all__ = ["DEFAULT_MAX_OFFSET_MS", "HybridClock", "Timestamp", "node_id"]
