"""The JSON Lines schema of ``cfctl task import`` (pure: no NATS, no files).

One task per line, an object with these fields (only ``title`` is required;
any other field is refused, so a typo is an error, not a silently ignored key)::

    title         string            the task's title
    id            string            a name for this line; later lines' ``after`` may use it
    body          string            the task's body (a worker's command reads it on stdin)
    priority      integer           higher is claimed first (default 0)
    needs         list of strings   capabilities a claimer must have (a comma separates
                                    them, as on the command line)
    after         list of strings   ids of earlier lines, or existing task ids (or unique
                                    prefixes of them)
    parent        string            parent task id
    labels        object            string -> string
    lease_ttl     number            seconds (default 30)
    max_attempts  integer           default 3
    timeout       number            start-to-close seconds
    key           string            idempotency key (default: derived from the line)

Blank lines are skipped. Every line is checked before anything is created.
Re-importing is idempotent per line: a line's task is named by a key derived
from the line's own content (and how many identical lines came before it), so
adding a line to a file and importing it again creates only that line's task.
"""

from __future__ import annotations

import hashlib
import json

import msgspec

from cflow.errors import InvalidInput


class TaskLine(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    title: str
    id: str | None = None
    body: str = ""
    priority: int = 0
    needs: list[str] = msgspec.field(default_factory=list)
    after: list[str] = msgspec.field(default_factory=list)
    parent: str | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    lease_ttl: float = 30.0
    max_attempts: int = 3
    timeout: float | None = None
    key: str | None = None


_DECODER = msgspec.json.Decoder(TaskLine)


def parse_task_lines(text: str, source: str = "input") -> list[tuple[int, TaskLine, str]]:
    """Every task line of ``text`` as (line number, line, idempotency key).

    Raises:
        InvalidInput: the first bad line, named as ``source:N`` in one line.
    """
    out: list[tuple[int, TaskLine, str]] = []
    seen: dict[str, int] = {}
    ids: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{source}:{number}"
        try:
            json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{where}: not JSON ({exc.msg})") from None
        try:
            line = _DECODER.decode(raw)
        except msgspec.ValidationError as exc:
            raise InvalidInput(f"{where}: {_explain(exc)}") from None
        if not line.title.strip():
            raise InvalidInput(f"{where}: title is empty")
        if line.id is not None:
            if line.id in ids:
                raise InvalidInput(f"{where}: id {line.id!r} is used by an earlier line")
            ids.add(line.id)
        if line.lease_ttl < 1:
            raise InvalidInput(f"{where}: lease_ttl must be at least 1 s")
        if line.max_attempts < 1:
            raise InvalidInput(f"{where}: max_attempts must be at least 1")
        canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:24]
        seen[digest] = seen.get(digest, 0) + 1
        key = line.key or f"import-{digest}-{seen[digest]}"
        out.append((number, line, key))
    return out


def _explain(exc: msgspec.ValidationError) -> str:
    """msgspec's message in our words: 'labels: expected an object, got an array'."""
    text = str(exc)
    path = ""
    if " - at `$." in text:
        text, _, path = text.partition(" - at `$.")
        path = path.rstrip("`")
    text = text.replace("Object contains unknown field", "unknown field")
    text = text.replace("Object missing required field", "missing required field")
    text = text.replace("Expected", "expected")
    return f"{path}: {text}" if path else text
