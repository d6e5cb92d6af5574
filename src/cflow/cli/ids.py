"""Ids from the shell: a whole id or any unique prefix of one, as git takes them.

``pick`` is the one rule (pure); the resolvers only gather the candidates: the
task board for task ids, the event stream's subjects for any other entity
(``cf.<swarm>.evt.<kind>.<id>``: one ``STREAM.INFO`` request, no event bodies),
the projection's ``tasks`` table for commands that read the projection.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

WHOLE_ID_LENGTH = 36  # a UUIDv7; anything shorter is a prefix


def require_id(ref: str, noun: str) -> str:
    """``ref`` unless it is empty or blank: as a prefix it would match every id.

    Raises:
        UsageError: (click's) an empty or blank id; exit 2, as a missing argument.
    """
    if not ref.strip():
        from typer._click.exceptions import UsageError

        raise UsageError(f"an id is required (the {noun} id given is empty)")
    return ref


def pick(kind: str, ref: str, candidates: Iterable[str], noun: str | None = None) -> str:
    """The one candidate ``ref`` names: itself, or the only id starting with it.

    ``kind`` names what was not found (``dependency``); ``noun`` what the ids are
    (``task``, default ``kind``).

    Raises:
        UsageError: (click's) ``ref`` is empty or blank.
        NotFound: no candidate starts with ``ref``.
        InvalidInput: several do (the first three are named).
    """
    from cflow.errors import InvalidInput, NotFound

    require_id(ref, noun or kind)
    ids = set(candidates)
    if ref in ids:
        return ref
    matches = sorted(i for i in ids if i.startswith(ref))
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NotFound(kind, ref)
    shown = ", ".join(matches[:3]) + (", ..." if len(matches) > 3 else "")
    noun = noun or kind
    raise InvalidInput(f"{noun} id prefix {ref!r} is ambiguous: {len(matches)} {noun}s match "
                       f"({shown}); give more characters")


async def entity_ids(log: Any, kind: str, ref: str) -> list[str]:
    """Ids of ``kind`` entities in the event stream (from its subjects only)."""
    from cflow.events import check_token
    from cflow.streams import names
    from cflow.streams.client import api_request

    check_token(require_id(ref, kind), f"{kind} id")
    prefix = names.event_subject(log.swarm, kind, "")
    subjects: dict[str, int] = {}
    while True:
        info = await api_request(log.nc, f"$JS.API.STREAM.INFO.{log.stream}",
                                 {"subjects_filter": names.events_filter(log.swarm, kind),
                                  "offset": len(subjects)})
        page = info.get("state", {}).get("subjects") or {}
        subjects.update(page)
        if not page or len(subjects) >= int(info.get("total", 0)):
            break
    return [s.removeprefix(prefix) for s in subjects]


async def resolve_entity(log: Any, kind: str, ref: str) -> str:
    """The whole id of a ``kind`` entity (``message``, ...) for ``ref``; see ``pick``."""
    require_id(ref, kind)
    if len(ref) >= WHOLE_ID_LENGTH:
        return ref  # the command itself says "not found"
    return pick(kind, ref, await entity_ids(log, kind, ref))
