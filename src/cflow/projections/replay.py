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
import struct
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from cflow.errors import CflowError

if TYPE_CHECKING:
    from cflow.streams.client import EventLog

_HEADER = struct.Struct("!I")
REPLAY_BATCH_FACTOR = 4  # 20,000 events a frame (and a transaction) by default
_frames = msgspec.msgpack.Encoder()


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
    from cflow.streams.client import decode_delivery

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
            changes = store.apply([decode_delivery(*item) for item in raw],
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


__all__ = ["replay_into"]
