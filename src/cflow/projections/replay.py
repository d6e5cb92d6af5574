"""A rebuild's replay in two processes: this one reads the stream, a child folds and writes.

Reading from JetStream (nats-py parses every message in Python) and folding into
DuckDB cost about the same, and one interpreter runs only one of them at a time.
So :func:`replay_into` keeps the NATS connection here and starts
``python -m cflow.projections.replay FILE MAX_EVENT_BYTES`` (no NATS connection,
no credentials): the messages go undecoded to its stdin as length-prefixed
msgpack frames of ``(seq, subject, data, time_ms)``; the child decodes, folds and
writes them in replay mode (:class:`ProjectionStore` with ``replay=True``),
answering one JSON line per batch on stdout (``{"seq": last applied}``), then
``{"done": true, "events", "quarantined"}`` after the empty frame that ends the
input; an error is ``{"error": "..."}`` and exit status 1.

The child's file is private and incomplete until it says done; a failed replay
leaves a file the caller deletes. The HLC receive rule is not applied to a
rebuild's historical events (the live projector and every writer apply it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import struct
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from cflow import events as ev
from cflow.errors import CflowError
from cflow.streams.client import BadMessage, StoredEvent, decode_delivery

if TYPE_CHECKING:
    from cflow.streams.client import EventLog

_HEADER = struct.Struct("!I")
REPLAY_BATCH_FACTOR = 4  # 20,000 events a frame (and a transaction) by default
_frames = msgspec.msgpack.Encoder()


# -- decoding a replay: one pass per message, the same result as decode_delivery
#
# ``ev.decode`` reads the envelope with ``data`` left raw, then the data, and
# msgspec checks the token and HLC patterns with a regex call each: 60% of a
# decode. A replay finds the type in the bytes, decodes envelope and data at
# once with that type's envelope (the same fields, no patterns), then checks the
# patterns itself, remembering the tokens it saw (a swarm, its kinds, a task's
# id recur). Anything unusual (type not found or not the decoded one, another
# version to upcast, another entity kind, a pattern not matched, a decode
# error) goes through decode_delivery, so events and errors are its own.

_TYPE_KEY = b'"type":"'
_TOKEN = re.compile(ev.TOKEN_PATTERN)
_HLC = re.compile(r"^[0-9a-f]{32}$")  # the pattern of ev.HlcText
_HEX = "0123456789abcdef"


def _replayed_envelope(name: str, cls: type[ev.EventData]) -> msgspec.json.Decoder[ev.Event]:
    struct_type = msgspec.defstruct(
        f"Replayed{name}", [("swarm", str), ("entity_kind", str), ("entity_id", str),
                            ("hlc", str), ("data", cls)],
        bases=(ev.Event,), frozen=True, kw_only=True)
    return msgspec.json.Decoder(struct_type)


_ENVELOPES = {name.encode(): (name, cls, _replayed_envelope(name, cls))
              for name, cls in ev.EVENT_TYPES.items()}
_seen_tokens: set[str] = set()


def _token(value: str) -> bool:
    if value in _seen_tokens:
        return True
    if _TOKEN.search(value) is None:
        return False
    if len(_seen_tokens) < 100_000:
        _seen_tokens.add(value)
    return True


def _hlc(value: str) -> bool:
    return (len(value) == 32 and not value.strip(_HEX)) or _HLC.search(value) is not None


def decode_replayed(seq: int, subject: str, data: bytes, time_ms: int = 0
                    ) -> StoredEvent | BadMessage:
    """:func:`cflow.streams.client.decode_delivery`, faster on the events cflow writes.

    The event is an instance of a subclass of :class:`cflow.events.Event` with
    the same fields and values (``ev.encode`` gives the same bytes).
    """
    start = data.find(_TYPE_KEY) + len(_TYPE_KEY)
    found = _ENVELOPES.get(data[start:data.find(b'"', start)]) if start >= len(_TYPE_KEY) else None
    if found is not None:
        name, cls, decoder = found
        try:
            event = decoder.decode(data)
        except (msgspec.MsgspecError, ValueError, TypeError, RecursionError):
            pass
        else:
            if (event.type == name and event.v == cls.V and event.entity_kind == cls.KIND
                    and _token(event.swarm) and _token(event.entity_id)
                    and _token(event.entity_kind) and _hlc(event.hlc)):
                return StoredEvent(seq, subject, event, time_ms)
    return decode_delivery(seq, subject, data, time_ms)


async def replay_into(log: EventLog, path: Path, target: int, *, batch_max: int,
                      max_event_bytes: int, reader: str = "raw",
                      progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Replay the stream from sequence 1 to ``target`` into a fresh file ``path``.

    Returns ``{"events", "quarantined", "last_seq"}`` once the child wrote and
    closed the file.

    Raises:
        CflowError: the child failed (its one-line error).
        Unavailable: NATS is unreachable.
    """
    from cflow.streams.raw import replay_source

    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cflow.projections.replay", str(path), str(max_event_bytes),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert child.stdin is not None
    assert child.stdout is not None
    stdout = child.stdout
    outcome: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def answers() -> None:
        while line := await stdout.readline():
            answer = json.loads(line)
            if "seq" in answer and progress is not None:
                progress(int(answer["seq"]))
            elif ("done" in answer or "error" in answer) and not outcome.done():
                outcome.set_result(answer)
        if not outcome.done():
            outcome.set_result({"error": f"replay process exited ({await child.wait()})"})

    answering = asyncio.create_task(answers())
    try:
        if target > 0:
            # Larger batches than live: a replay's cost per commit is spread wider.
            batches = replay_source(log, until_seq=target,
                                    max_batch=batch_max * REPLAY_BATCH_FACTOR, reader=reader)
            try:
                async for batch in batches:
                    if outcome.done():
                        break  # the child failed: stop reading
                    frame = _frames.encode(batch)
                    child.stdin.write(_HEADER.pack(len(frame)) + frame)
                    await child.stdin.drain()
            finally:
                await batches.aclose()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            child.stdin.write(_HEADER.pack(0))
            await child.stdin.drain()
            child.stdin.close()
        answer = await outcome
        if "error" in answer:
            raise CflowError(f"rebuild of {path} failed: {answer['error']}", path=str(path))
        await child.wait()
        return {"events": int(answer["events"]), "quarantined": int(answer["quarantined"]),
                "last_seq": int(answer["last_seq"])}
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        answering.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await answering


def _serve(path: str, max_event_bytes: int) -> None:
    """The child: frames on stdin -> replayed file; JSON lines on stdout."""
    from cflow.projections.store import ProjectionStore

    decoder = msgspec.msgpack.Decoder(list[tuple[int, str, bytes, int]])
    source, out = sys.stdin.buffer, sys.stdout
    store = ProjectionStore(path, max_event_bytes=max_event_bytes, replay=True)
    events = quarantined = 0
    try:
        while True:
            header = source.read(_HEADER.size)
            if len(header) < _HEADER.size:
                raise CflowError("the reading process went away before the end")
            (size,) = _HEADER.unpack(header)
            if size == 0:
                break
            raw = decoder.decode(source.read(size))
            changes = store.apply([decode_replayed(*item) for item in raw],
                                  datetime.now(UTC).replace(tzinfo=None))
            events += changes.count
            quarantined += changes.quarantined
            out.write(json.dumps({"seq": store.last_seq}) + "\n")
            out.flush()
        store.finish()
        last_seq = store.last_seq
    finally:
        store.close()
    out.write(json.dumps({"done": True, "events": events, "quarantined": quarantined,
                          "last_seq": last_seq}) + "\n")
    out.flush()


def main() -> None:
    try:
        _serve(sys.argv[1], int(sys.argv[2]))
    except Exception as exc:  # one line for the reading process, never a traceback
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not isinstance(exc, CflowError):
            text = f"{type(exc).__name__}: {text}"
        print(json.dumps({"error": text}), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()


__all__ = ["decode_replayed", "replay_into"]
