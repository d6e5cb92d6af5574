"""Path reservations: an agent reserves paths or globs before editing them.

Theory of operation
-------------------
A reservation is one key ``res-<id>`` in the swarm's ``reservations`` bucket,
with a server-side TTL (liveness, renewed like a task lease: compare-and-set on
the key's revision, which is the reservation's fencing token). Which
reservations are *of record* is decided by one ``index`` key, always written
with compare-and-set on its revision. Reserving is:

1. write my key (TTL, expected revision 0);
2. read the index; keep the entries whose key is still live (the server removes
   an expired key on its own clock); if one of another owner conflicts with
   mine, delete my key and refuse with who holds it until when;
3. compare-and-set the index to "live entries + mine"; if someone else moved
   the index meanwhile, go back to 2.

Two agents racing for overlapping paths both reach step 3 with the same index
revision; exactly one compare-and-set succeeds and the other, re-reading, sees
the winner's entry (whose key was written in step 1, before the index) and is
refused. A key that is not in the index yet is never counted, so a racer that
is about to lose never blocks anyone.

Patterns are repository-relative paths or globs as in ``.gitignore``: ``*``
and ``?`` stay within one path component, ``**`` crosses ``/``, ``[set]`` as in
``fnmatch``. A literal path also covers everything below it (a glob only the
paths it matches: ``build*/**`` for whole trees), and ``dir/`` means
``dir/**``. Whether two patterns overlap is decided conservatively
(:func:`patterns_overlap`): two literals by equality or containment; a literal
against a glob exactly (the glob matches the literal, or can match something
below it); two globs overlap unless their literal prefixes (before the first
wildcard) or literal suffixes (after the last one) rule it out. So an overlap
may be reported where no real path matches both, never the reverse.

Shared reservations conflict only with another owner's exclusive ones;
exclusive ones with any of another owner's. One owner never conflicts with
itself, except that reservations it took for two different tasks do (a worker
running several tasks at once must not run two on the same paths).

Release on task completion: a reservation may carry the ``task_id`` it was
taken for. Whoever finishes the task may call
``swarm.reservations.release(owner, task_id=...)``, and
:meth:`ReservationService.maintain` (a background loop for long-lived
processes) releases the reservations of every task that completes, fails for
good or is cancelled. Otherwise the TTL frees them.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fnmatch
import functools
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from cflow import events as ev
from cflow.errors import (
    CflowError,
    ConcurrencyConflict,
    ConflictError,
    InvalidInput,
    NotFound,
    ReservationConflict,
    ReservationLost,
)
from cflow.keepalive import Holding, kept_alive, renewal
from cflow.lease_policy import LeasePolicy
from cflow.streams import KvEntry, names
from cflow.streams.client import wall_ms
from cflow.tasks import declared_paths, ends_task

if TYPE_CHECKING:
    from cflow.feed import TaskFeed
    from cflow.swarm import Swarm

log = logging.getLogger("cflow.reservations")

INDEX_KEY = "index"
DEFAULT_TTL_S = 300.0
MAX_RACE_ROUNDS = 200
_WILDCARDS = re.compile(r"[*?\[]")


# ------------------------------------------------------------------ pure: paths


def normalize_pattern(pattern: str) -> str:
    """Repository-relative, ``/``-separated; ``dir/`` becomes ``dir/**``.

    Raises:
        InvalidInput: empty, absolute, or with a ``..`` component.
    """
    p = pattern.strip().replace("\\", "/")
    if not p:
        raise InvalidInput("empty path pattern")
    if p.startswith("/"):
        raise InvalidInput(f"path pattern {pattern!r} must be relative to the repository")
    directory = p.endswith("/")
    parts = [part for part in p.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise InvalidInput(f"path pattern {pattern!r} may not contain '..'")
    if not parts:
        return "**"
    out = "/".join(parts)
    return f"{out}/**" if directory else out


def is_glob(pattern: str) -> bool:
    return _WILDCARDS.search(pattern) is not None


def literal_prefix(pattern: str) -> str:
    m = _WILDCARDS.search(pattern)
    return pattern if m is None else pattern[: m.start()]


def literal_suffix(pattern: str) -> str:
    last = max(pattern.rfind("*"), pattern.rfind("?"), pattern.rfind("]"))
    return pattern[last + 1:]


def glob_match(path: str, pattern: str) -> bool:
    """Does the glob match ``path`` (``*``, ``?`` within a component, ``**`` across)?"""
    return _regex(pattern).fullmatch(path) is not None


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str]:
    parts = []
    tokens = _glob_tokens(pattern)
    for i, tok in enumerate(tokens):
        if tok == "/" and i > 0 and tokens[i - 1] == "**":
            continue  # emitted with the "**" before it
        if tok == "**":
            # "a/**/b" also matches "a/b", as in .gitignore
            parts.append("(?:.*/)?" if tokens[i + 1:i + 2] == ["/"] else ".*")
        elif tok == "*":
            parts.append("[^/]*")
        elif tok == "?":
            parts.append("[^/]")
        elif len(tok) > 1:  # [set], translated by fnmatch's rules
            parts.append(fnmatch.translate(tok)[4:-3])
        else:
            parts.append(re.escape(tok))
    return re.compile("".join(parts), re.DOTALL)


def path_covered(path: str, pattern: str) -> bool:
    """Does ``pattern`` cover the concrete ``path`` (a literal: also what is below it)?"""
    if is_glob(pattern):
        return glob_match(path, pattern)
    return path == pattern or path.startswith(pattern + "/")


def _glob_tokens(pattern: str) -> list[str]:
    """``**``, ``*``, ``?``, ``[set]`` or one literal character per token."""
    tokens, i, n = [], 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if pattern.startswith("**", i):
            tokens.append("**")
            i += 2
            while i < n and pattern[i] == "*":
                i += 1
            continue
        if ch == "[":
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j < n:
                tokens.append(pattern[i:j + 1])
                i = j + 1
                continue
        tokens.append(ch)
        i += 1
    return tokens


def glob_matches_below(pattern: str, directory: str) -> bool:
    """Can ``pattern`` match some path strictly below the literal ``directory``?

    Runs the glob as an automaton over ``directory + "/"``; if it is still alive
    with pattern left to match, some continuation matches.
    """
    tokens = _glob_tokens(pattern)

    def closure(states: set[int]) -> set[int]:
        out, todo = set(states), list(states)
        while todo:
            i = todo.pop()
            if i < len(tokens) and tokens[i] in ("*", "**") and i + 1 not in out:
                out.add(i + 1)
                todo.append(i + 1)
            if (i < len(tokens) and tokens[i] == "**" and tokens[i + 1:i + 2] == ["/"]
                    and i + 2 not in out):
                out.add(i + 2)  # "**/" may match nothing at all
                todo.append(i + 2)
        return out

    states = closure({0})
    for ch in directory + "/":
        nxt = set()
        for i in states:
            if i >= len(tokens):
                continue
            tok = tokens[i]
            if tok == "**" or (tok == "*" and ch != "/"):
                nxt.add(i)
            elif (tok == "?" and ch != "/") or (len(tok) > 1 and _regex(tok).fullmatch(ch)) \
                    or tok == ch:
                nxt.add(i + 1)
        states = closure(nxt)
        if not states:
            return False
    return any(i < len(tokens) for i in states)


def patterns_overlap(a: str, b: str) -> bool:
    """Could one path be covered by both patterns? Conservative: never a false "no"."""
    glob_a, glob_b = is_glob(a), is_glob(b)
    if not glob_a and not glob_b:
        return a == b or a.startswith(b + "/") or b.startswith(a + "/")
    if not glob_a:
        return glob_match(a, b) or glob_matches_below(b, a)
    if not glob_b:
        return glob_match(b, a) or glob_matches_below(a, b)
    if glob_match(a, b) or glob_match(b, a):
        return True
    pa, pb = literal_prefix(a), literal_prefix(b)
    sa, sb = literal_suffix(a), literal_suffix(b)
    return (pa.startswith(pb) or pb.startswith(pa)) and (sa.endswith(sb) or sb.endswith(sa))


# --------------------------------------------------------------- pure: records


class ReservationRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Value of a ``res-<id>`` key and of an index entry."""

    id: str
    owner: str
    patterns: tuple[str, ...]
    exclusive: bool = True
    task_id: str | None = None
    ttl_s: float = DEFAULT_TTL_S
    reserved_ms: int = 0
    renewed_ms: int = 0


class ReservationIndex(msgspec.Struct, frozen=True, kw_only=True):
    entries: tuple[ReservationRecord, ...] = ()


_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(ReservationRecord)
_index_decoder = msgspec.json.Decoder(ReservationIndex)


def reservation_key(reservation_id: str) -> str:
    return f"res-{reservation_id}"


class Overlap(msgspec.Struct, frozen=True):  # a Struct: cheaper to define (issue 18)
    """One of my patterns against one pattern of a reservation held by someone else."""

    pattern: str
    held_pattern: str
    held: ReservationRecord


def conflicts(mine: ReservationRecord, held: Iterable[ReservationRecord]) -> list[Overlap]:
    """Every overlap of ``mine`` with reservations of other owners it cannot share (and
    with the owner's own reservations for another task: one worker running two tasks
    must not run both on the same paths)."""
    out = []
    for other in held:
        if other.id == mine.id or (other.owner == mine.owner and (
                mine.task_id is None or other.task_id is None
                or other.task_id == mine.task_id)):
            continue
        if not (mine.exclusive or other.exclusive):
            continue
        for p in mine.patterns:
            for q in other.patterns:
                if patterns_overlap(p, q):
                    out.append(Overlap(p, q, other))
    return out


@dataclass(frozen=True)
class Reservation:
    """A live reservation; ``revision`` is its fencing token."""

    id: str
    owner: str
    patterns: tuple[str, ...]
    exclusive: bool
    task_id: str | None
    ttl_s: float
    reserved_ms: int
    expires_ms: int
    revision: int
    # When this process sent the write that stored this revision (monotonic clock;
    # None when read back): the start of the holder's deadline.
    sent_mono: float | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "owner": self.owner, "patterns": list(self.patterns),
                "exclusive": self.exclusive, "task_id": self.task_id, "ttl_s": self.ttl_s,
                "reserved_ms": self.reserved_ms, "expires_ms": self.expires_ms,
                "revision": self.revision}


def _reservation(rec: ReservationRecord, revision: int,
                 sent_mono: float | None = None) -> Reservation:
    base = rec.renewed_ms or rec.reserved_ms
    return Reservation(id=rec.id, owner=rec.owner, patterns=rec.patterns,
                       exclusive=rec.exclusive, task_id=rec.task_id, ttl_s=rec.ttl_s,
                       reserved_ms=rec.reserved_ms, expires_ms=base + int(rec.ttl_s * 1000),
                       revision=revision, sent_mono=sent_mono)


def _refuse_overlap(mine: ReservationRecord,
                    live: Sequence[tuple[ReservationRecord, KvEntry]]) -> None:
    """Raise ReservationConflict naming the first live reservation ``mine`` overlaps."""
    found = conflicts(mine, (rec for rec, _ in live))
    if not found:
        return
    first = found[0]
    held = first.held
    kv = next(kv for rec, kv in live if rec.id == held.id)
    raise ReservationConflict(
        holder=held.owner, reservation_id=held.id, pattern=first.pattern,
        held_pattern=first.held_pattern, exclusive=held.exclusive,
        expires_ms=_reservation(held, kv.revision).expires_ms, task_id=held.task_id)


# ---------------------------------------------------------------------- adapter


class ReservationService:
    """``swarm.reservations``: reserve, renew, release, list, check paths."""

    def __init__(self, swarm: Swarm, *, feed: TaskFeed) -> None:
        """Built by :class:`~cflow.swarm.Swarm`, which hands it the process's task feed."""
        self.swarm = swarm
        self.log = swarm.log
        self.feed = feed
        self.bucket = swarm.log.bucket(names.RESERVATIONS)
        # (monotonic time it was taken, live reservations): ensure_free's recent view
        self._snapshot: tuple[float, list[tuple[ReservationRecord, KvEntry]]] | None = None

    async def _live_record(self, reservation_id: str) -> tuple[ReservationRecord, KvEntry] | None:
        kv = await self.log.kv_last(self.bucket, reservation_key(reservation_id))
        if kv is None or not kv.live:
            return None
        try:
            rec = _record_decoder.decode(kv.value)
        except msgspec.DecodeError:
            return None
        return (rec, kv) if rec.id == reservation_id else None

    async def _index(self) -> tuple[list[ReservationRecord], int]:
        kv = await self.log.kv_last(self.bucket, INDEX_KEY)
        if kv is None:
            return [], 0
        if not kv.live:
            return [], kv.revision
        try:
            return list(_index_decoder.decode(kv.value).entries), kv.revision
        except msgspec.DecodeError:
            return [], kv.revision

    async def _live_entries(self, entries: Iterable[ReservationRecord]
                            ) -> list[tuple[ReservationRecord, KvEntry]]:
        found = await asyncio.gather(*(self._live_record(e.id) for e in entries))
        return [f for f in found if f is not None]

    async def reserve(
        self,
        patterns: Sequence[str],
        *,
        owner: str | None = None,
        exclusive: bool = True,
        ttl_s: float = DEFAULT_TTL_S,
        task_id: str | None = None,
    ) -> Reservation:
        """Reserve paths or globs for ``owner`` (default: this agent).

        Raises:
            InvalidInput: no patterns, a bad pattern, TTL < 1 s.
            ReservationConflict: another owner holds an overlapping reservation
                (its holder, patterns and expiry are in the error's attributes).
        """
        pats = tuple(dict.fromkeys(normalize_pattern(p) for p in patterns))
        if not pats:
            raise InvalidInput("reserve needs at least one path or glob")
        if ttl_s < 1:
            raise InvalidInput("reservation TTL must be at least 1 s")
        now = wall_ms()
        mine = ReservationRecord(id=ev.new_id(), owner=owner or self.swarm.agent,
                                 patterns=pats, exclusive=exclusive, task_id=task_id,
                                 ttl_s=ttl_s, reserved_ms=now, renewed_ms=now)
        key = reservation_key(mine.id)
        sent = time.monotonic()
        self._snapshot = None
        revision = await self.log.kv_put(self.bucket, key, _encoder.encode(mine),
                                         expected_revision=0, ttl_s=ttl_s)
        try:
            await self._enter_index(mine)
        except BaseException:
            with contextlib.suppress(CflowError):
                await self.log.kv_delete(self.bucket, key)
            raise
        await self.log.append(
            ev.PathsReserved(owner=mine.owner, paths=pats, exclusive=exclusive, ttl_s=ttl_s,
                             epoch=revision, task_id=task_id),
            mine.id, msg_id=f"reserve-{mine.id}", actor=mine.owner, dedupe_by_msg_id=True)
        return _reservation(mine, revision, sent)

    async def _enter_index(self, mine: ReservationRecord) -> None:
        for round_ in range(MAX_RACE_ROUNDS):
            entries, index_rev = await self._index()
            live = await self._live_entries(e for e in entries if e.id != mine.id)
            _refuse_overlap(mine, live)
            index = ReservationIndex(entries=(*(rec for rec, _ in live), mine))
            try:
                await self.log.kv_put(self.bucket, INDEX_KEY, _encoder.encode(index),
                                      expected_revision=index_rev)
                return
            except ConcurrencyConflict:
                # Someone else moved the index: re-read and decide again. A little
                # jitter keeps a crowd of racers from colliding in lockstep.
                await asyncio.sleep(random.uniform(0, 0.002 * min(round_ + 1, 10)))  # noqa: S311
        raise ConflictError("reservation index kept changing; try again")

    async def ensure_free(self, patterns: Iterable[str], *, owner: str | None = None,
                          task_id: str | None = None, max_age_s: float = 0.0) -> None:
        """Whether an exclusive reservation of ``patterns`` by ``owner`` would be granted now.

        Read-only (nothing is reserved): the claim path asks it before claiming a task
        whose declared paths (:func:`declared_paths`) another owner holds. ``max_age_s``:
        a view of the live reservations this process read that recently will do (a claimer
        going through many blocked offers reads them once; this process's own reserve and
        release drop the view).

        Raises:
            ReservationConflict: another owner holds an overlapping live reservation.
        """
        mine = ReservationRecord(id="", owner=owner or self.swarm.agent, task_id=task_id,
                                 patterns=tuple(normalize_pattern(p) for p in patterns))
        now = time.monotonic()
        if self._snapshot is None or now - self._snapshot[0] > max_age_s:
            entries, _ = await self._index()
            self._snapshot = (now, await self._live_entries(entries))
        _refuse_overlap(mine, self._snapshot[1])

    async def renew(self, reservation_id: str, revision: int,
                    ttl_s: float | None = None) -> Reservation:
        """Extend a reservation's TTL; ``revision`` is the fencing token it was given.

        Raises:
            ReservationLost: it expired, was released, or the token is stale.
        """
        found = await self._live_record(reservation_id)
        if found is None:
            raise ReservationLost(reservation_id, "expired or released")
        rec, kv = found
        if kv.revision != revision:
            raise ReservationLost(reservation_id, f"stale revision {revision} (now {kv.revision})")
        renewed = msgspec.structs.replace(rec, renewed_ms=wall_ms(),
                                          ttl_s=ttl_s if ttl_s is not None else rec.ttl_s)
        sent = time.monotonic()
        try:
            new_rev = await self.log.kv_put(self.bucket, reservation_key(reservation_id),
                                            _encoder.encode(renewed), expected_revision=revision,
                                            ttl_s=renewed.ttl_s)
        except ConcurrencyConflict:
            raise ReservationLost(reservation_id, "expired or taken over while renewing") from None
        return _reservation(renewed, new_rev, sent)

    @contextlib.asynccontextmanager
    async def keep_alive(self, reservation: Reservation, interval_s: float | None = None,
                         on_lost: Callable[[Reservation], None] | None = None
                         ) -> AsyncIterator[Holding]:
        """Renew every TTL/3 while the block runs; ``on_lost`` is called once if it is lost.

        Yields the holder's clock: :func:`cflow.keepalive.check_deadline` on it says
        whether the reservation may still be relied on (a merger checks it before a push).

        The shared keep-alive loop (:mod:`cflow.keepalive`): lost when a renewal is
        refused (expired, released, taken over) or when none succeeded for the TTL
        minus a margin (cut off from NATS), before the server can expire the key and
        another owner reserve the paths. ``on_lost`` gets the reservation as last renewed.
        """
        policy = LeasePolicy(reservation.ttl_s)
        held = Holding(policy, reservation.sent_mono or time.monotonic())
        current = reservation

        async def renew() -> None:
            nonlocal current
            current = await renewal(held, lambda: self.renew(current.id, current.revision),
                                    refused=(ReservationLost,))

        def lost() -> None:
            if on_lost is not None:
                on_lost(current)

        async with kept_alive(held, renew, name=f"reservation {reservation.id}",
                              interval_s=interval_s, on_lost=lost):
            yield held

    async def list(self, owner: str | None = None) -> builtins.list[Reservation]:
        """Live reservations of record, oldest first."""
        entries, _ = await self._index()
        live = await self._live_entries(entries)
        out = [_reservation(rec, kv.revision) for rec, kv in live
               if owner is None or rec.owner == owner]
        return sorted(out, key=lambda r: (r.reserved_ms, r.id))

    async def release(
        self,
        owner: str | None = None,
        *,
        reservation_id: str | None = None,
        task_id: str | None = None,
        reason: str = "released",
    ) -> builtins.list[str]:
        """Release the owner's reservations (all, one, or those of one task).

        Returns the released ids.

        Raises:
            NotFound: ``reservation_id`` is not a live reservation of the owner.
        """
        who = owner or self.swarm.agent
        held = [r for r in await self.list(owner=who)
                if (reservation_id is None or r.id == reservation_id)
                and (task_id is None or r.task_id == task_id)]
        if reservation_id is not None and not held:
            raise NotFound("reservation", reservation_id)
        return await self._release(held, reason)

    async def release_task(self, task_id: str, reason: str = "task finished"
                           ) -> builtins.list[str]:
        """Release every reservation taken for ``task_id``, whoever holds it."""
        return await self._release([r for r in await self.list() if r.task_id == task_id],
                                   reason)

    async def _release(self, held: Iterable[Reservation], reason: str) -> builtins.list[str]:
        self._snapshot = None
        released = []
        for r in held:
            if await self._delete(r.id, r.revision):
                released.append(r)
        if released:
            await self._drop_from_index({r.id for r in released})
        for r in released:
            await self.log.append(ev.PathsReleased(owner=r.owner, reason=reason), r.id,
                                  msg_id=f"release-{r.id}", dedupe_by_msg_id=True)
        return [r.id for r in released]

    async def _delete(self, reservation_id: str, revision: int) -> bool:
        """Delete a live reservation key; True for the one caller whose delete landed.

        The delete is fenced by the revision, so of several releasers (the holder,
        maintainers in other processes) exactly one records the release; a
        renewal in between only moves the revision on.
        """
        for _ in range(10):
            try:
                await self.log.kv_delete(self.bucket, reservation_key(reservation_id),
                                         expected_revision=revision)
                return True
            except ConcurrencyConflict:
                found = await self._live_record(reservation_id)
                if found is None:
                    return False  # expired, or another releaser won
                revision = found[1].revision
        return False

    async def maintain(self) -> None:
        """Release the reservations of tasks that finished, until cancelled.

        Sweeps once (reservations whose task already finished), then follows the
        process's task feed from where the sweep began: every event that ends a task
        (:func:`cflow.tasks.ends_task`: completed, failed for good, cancelled)
        releases the task's reservations. Safe to run in every long-lived process
        (see :meth:`_release`).
        """
        start = await self.log.stream_last_seq() + 1
        # Subscribed before the sweep, so no ending falls between the two.
        async with self.feed.subscribe("reservations", start_seq=start) as events:
            try:
                for r in await self.list():
                    if r.task_id is not None and await self._task_finished(r.task_id):
                        await self.release_task(r.task_id)
            except CflowError as exc:  # the TTL still frees them; do not stop the maintainer
                log.warning("reservation sweep failed: %s", exc)
            async for item in events:
                if not ends_task(item.event.data):
                    continue
                try:
                    await self.release_task(item.event.entity_id,
                                            f"task {item.event.type[4:].lower()}")
                except CflowError as exc:
                    log.warning("releasing reservations of %s failed: %s",
                                item.event.entity_id, exc)

    async def _task_finished(self, task_id: str) -> bool:
        try:
            state = await self.swarm.tasks.get(task_id)
        except (NotFound, InvalidInput):
            return False
        return state.terminal

    async def _drop_from_index(self, ids: set[str]) -> None:
        # Pruning is also done by every reserve; this only keeps the index small.
        for _ in range(20):
            entries, rev = await self._index()
            keep = tuple(e for e in entries if e.id not in ids)
            if len(keep) == len(entries):
                return
            try:
                await self.log.kv_put(self.bucket, INDEX_KEY,
                                      _encoder.encode(ReservationIndex(entries=keep)),
                                      expected_revision=rev)
                return
            except ConcurrencyConflict:
                continue

    async def check(self, paths: Iterable[str], *, owner: str | None = None
                    ) -> builtins.list[tuple[str, Reservation]]:
        """Concrete paths that another owner holds exclusively: (path, reservation)."""
        who = owner or self.swarm.agent
        held = [r for r in await self.list() if r.exclusive and r.owner != who]
        out = []
        for raw in paths:
            path = normalize_pattern(raw)
            for r in held:
                if any(path_covered(path, p) for p in r.patterns):
                    out.append((path, r))
                    break
        return out


__all__ = [
    "Overlap",
    "Reservation",
    "ReservationConflict",
    "ReservationLost",
    "ReservationRecord",
    "ReservationService",
    "conflicts",
    "declared_paths",
    "glob_match",
    "glob_matches_below",
    "is_glob",
    "literal_prefix",
    "literal_suffix",
    "normalize_pattern",
    "path_covered",
    "patterns_overlap",
]
