"""Shared memory: namespaced key/value entries with tags, TTL, history and search.

Theory of operation
-------------------
An entry lives under one key of the swarm's ``memory`` KV bucket. KV keys and
subject tokens cannot hold arbitrary characters, so the key is a *token*:
``"k" + base64url(namespace NUL key)`` without padding, or ``"h" + sha256`` when
that would exceed 128 characters (the record itself always carries the real
namespace and key). The entry's **version** is its KV revision, which makes
compare-and-set on version a plain ``Nats-Expected-Last-Subject-Sequence``.

Every put and delete is written to KV first and then appended as a
``MemoryStored`` / ``MemoryDeleted`` event on ``cf.<swarm>.evt.memory.<token>``
with Msg-Id ``mem-<token>-<revision>``, so a retried append is deduplicated and
the projection's ``memory`` table and the audit trail see every change. The
event stream is also where :meth:`MemoryService.history` reads from: it keeps
every version, while the bucket keeps the last 64.

A write that times out may still land (nats-py sends what it buffered once it
reconnects). A put made under a client **request id** is safe to retry: the id is
kept in the record and becomes the put's Msg-Id (the server drops a second copy
within its duplicate window), and its event gets an id derived from it. A retry
first looks at the key: if the latest version carries the same request id, that
version is the answer and its event is appended again (deduplicated), which also
completes a first try that stopped between the value and its event.

A TTL is a server-side per-message TTL: the server removes the entry on its own
clock and leaves an expiry marker. A put with a TTL also rolls up the key's older
revisions, so an older value without a TTL can never resurface once the marker
itself is gone.

Search is BM25 (Robertson/Sparck Jones, Lucene's idf) in plain DuckDB SQL over
key, value and tags (:func:`bm25_search`), with ``k1 = 1.2`` and ``b = 0.75``;
no ``fts`` extension. The projector runs it on its ``memory`` table; the facade
runs the same SQL on an in-memory DuckDB loaded from the live KV entries, so
search works without a projector.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from cflow import events as ev
from cflow.errors import (
    ConflictError,
    InvalidInput,
    LimitExceeded,
    MemoryConflict,
    NotFound,
    Unavailable,
)
from cflow.streams import names
from cflow.streams.client import (
    EXPECTED_LAST_SUBJECT_SEQ,
    MSG_ID,
    TTL,
    KvEntry,
    Outgoing,
    StoredEvent,
    publish,
    ttl_header,
    wall_ms,
)

if TYPE_CHECKING:
    import duckdb

    from cflow.swarm import Swarm

ContentType = Literal["text", "json"]
SearchSource = Literal["auto", "projection", "kv"]

MAX_VALUE_BYTES = 512 * 1024
K1 = 1.2
PROJECTION_WAIT_S = 2.0
B = 0.75
_EPOCH = datetime(1970, 1, 1)
_EVENT_NAMESPACE = uuid.UUID("0b5e6f64-3f0c-4d9e-8c55-6a1f2b7d9e01")


# --------------------------------------------------------------------- pure parts


def key_token(namespace: str, key: str) -> str:
    """The KV key / entity id of ``(namespace, key)``: token-safe, deterministic."""
    if not namespace or not key:
        raise InvalidInput("memory needs a non-empty namespace and key")
    if "\x00" in namespace:
        raise InvalidInput("a namespace cannot contain NUL")
    raw = f"{namespace}\x00{key}".encode()
    token = "k" + base64.urlsafe_b64encode(raw).decode().rstrip("=")
    if len(token) <= 128:
        return token
    return "h" + hashlib.sha256(raw).hexdigest()


def token_parts(token: str) -> tuple[str, str] | None:
    """Namespace and key back from a ``k`` token (``None`` for hashed tokens)."""
    if not token.startswith("k"):
        return None
    body = token[1:]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    namespace, _, key = raw.decode().partition("\x00")
    return namespace, key


class MemoryRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The value stored under a memory key."""

    namespace: str
    key: str
    value: str
    content_type: ContentType = "text"
    tags: tuple[str, ...] = ()
    author: str = ""
    ttl_s: float | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    updated_ms: int = 0
    request_id: str | None = None  # the writer's intent: a retry with it is not a new write


_record_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(MemoryRecord)


@dataclass(frozen=True)
class MemoryEntry:
    namespace: str
    key: str
    value: str
    content_type: ContentType
    tags: tuple[str, ...]
    version: int
    author: str
    updated_ms: int
    ttl_s: float | None = None
    expires_ms: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def json_value(self) -> Any:
        """The value parsed, for ``content_type == "json"``."""
        return json.loads(self.value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace, "key": self.key, "value": self.value,
            "content_type": self.content_type, "tags": list(self.tags),
            "version": self.version, "author": self.author, "updated_ms": self.updated_ms,
            "ttl_s": self.ttl_s, "expires_ms": self.expires_ms, "metadata": self.metadata,
        }


@dataclass(frozen=True)
class HistoryItem:
    """One change of an entry, from the event stream."""

    seq: int
    operation: Literal["put", "delete"]
    version: int
    value: str | None
    tags: tuple[str, ...]
    actor: str
    hlc: str
    ttl_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "operation": self.operation, "version": self.version,
                "value": self.value, "tags": list(self.tags), "actor": self.actor,
                "hlc": self.hlc, "ttl_s": self.ttl_s}


@dataclass(frozen=True)
class SearchHit:
    namespace: str
    key: str
    score: float
    snippet: str
    tags: tuple[str, ...]
    version: int
    value: str

    def to_dict(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "key": self.key, "score": round(self.score, 6),
                "snippet": self.snippet, "tags": list(self.tags), "version": self.version,
                "value": self.value}


def normalize_value(value: Any, content_type: ContentType | None) -> tuple[str, ContentType]:
    """Text stays text; anything else (or ``content_type="json"``) is stored as JSON."""
    if content_type is None:
        content_type = "text" if isinstance(value, str) else "json"
    if content_type == "json":
        if isinstance(value, str):
            try:
                json.loads(value)
            except ValueError:
                raise InvalidInput("value is not valid JSON") from None
            text = value
        else:
            try:
                text = json.dumps(value, sort_keys=True, separators=(",", ":"))
            except (TypeError, ValueError) as exc:
                raise InvalidInput(f"value is not JSON-serialisable: {exc}") from None
    elif isinstance(value, str):
        text = value
    else:
        raise InvalidInput("a text value must be a string")
    if len(text.encode()) > MAX_VALUE_BYTES:
        raise InvalidInput(f"memory value larger than {MAX_VALUE_BYTES} bytes")
    return text, content_type


def request_msg_id(token: str, request_id: str) -> str:
    """The Msg-Id of a memory put made under a client request id (pure)."""
    digest = hashlib.sha256(request_id.encode()).hexdigest()[:32]
    return f"memreq-{token}-{digest}"


def request_event_id(swarm: str, token: str, request_id: str) -> str:
    """The id of the ``MemoryStored`` event of that put: the same on every retry (pure)."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{swarm}\x00{token}\x00{request_id}"))


def build_memory_put(bucket: str, token: str, record: MemoryRecord, *,
                     expected_revision: int | None) -> Outgoing:
    """Subject, headers and payload of one memory put (pure).

    A record with a ``request_id`` carries a Msg-Id derived from it, so the server
    drops a retry (or a first try that was buffered through an outage and lands
    later) within the duplicate window.
    """
    headers: dict[str, str] = {}
    if record.request_id is not None:
        headers[MSG_ID] = request_msg_id(token, record.request_id)
    if expected_revision is not None:
        headers[EXPECTED_LAST_SUBJECT_SEQ] = str(expected_revision)
    if record.ttl_s is not None:
        headers[TTL] = ttl_header(record.ttl_s)
        # Roll older revisions up: once the expiry marker itself is gone, nothing
        # older may come back as the "current" value.
        headers["Nats-Rollup"] = "sub"
    return Outgoing(names.kv_subject(bucket, token), headers, _record_encoder.encode(record))


def build_memory_delete(bucket: str, token: str, *, expected_revision: int | None) -> Outgoing:
    headers = {"KV-Operation": "DEL"}
    if expected_revision is not None:
        headers[EXPECTED_LAST_SUBJECT_SEQ] = str(expected_revision)
    return Outgoing(names.kv_subject(bucket, token), headers, b"")


def entry_from_kv(kv: KvEntry) -> MemoryEntry | None:
    """A live entry from a raw KV message, or ``None`` (deleted, expired, undecodable)."""
    if not kv.live:
        return None
    try:
        rec = _record_decoder.decode(kv.value)
    except msgspec.DecodeError:
        return None
    expires = rec.updated_ms + int(rec.ttl_s * 1000) if rec.ttl_s and rec.updated_ms else None
    return MemoryEntry(
        namespace=rec.namespace, key=rec.key, value=rec.value, content_type=rec.content_type,
        tags=rec.tags, version=kv.revision, author=rec.author, updated_ms=rec.updated_ms,
        ttl_s=rec.ttl_s, expires_ms=expires, metadata=dict(rec.metadata),
    )


_TERM_SPLIT = re.compile(r"[^\w]+", re.UNICODE)


def query_terms(text: str) -> list[str]:
    """The terms of a query as the SQL tokenizer sees them (lowercase, letters/digits)."""
    return [t for t in _TERM_SPLIT.split(text.lower().replace("_", " ")) if t]


def snippet(text: str, terms: Sequence[str], width: int = 120) -> str:
    """About ``width`` characters around the first query term, terms in ``[...]``."""
    flat = " ".join(text.split())
    lower = flat.lower()
    positions = [m.start() for t in terms
                 for m in [re.search(rf"(?<![^\W_]){re.escape(t)}(?![^\W_])", lower)] if m]
    start = max(0, min(positions) - width // 3) if positions else 0
    end = min(len(flat), start + width)
    piece = flat[start:end]
    for term in sorted(set(terms), key=len, reverse=True):
        piece = re.sub(rf"(?<![^\W_])({re.escape(term)})(?![^\W_])", r"[\1]", piece,
                       flags=re.IGNORECASE)
    return ("…" if start > 0 else "") + piece + ("…" if end < len(flat) else "")


# ----------------------------------------------------------------- BM25 in SQL

# Tokens: maximal runs of letters and digits of lower(key, value, tags), kept
# as one list per document (no row per token: only the query's few terms are
# counted). One document per live entry; idf is Lucene's
# ln(1 + (N - df + .5) / (df + .5)), which stays positive for terms in more
# than half of the documents.
BM25_SQL = r"""
WITH docs AS (
    SELECT namespace, key, value, tags, version,
           list_filter(regexp_split_to_array(
               lower(key || ' ' || coalesce(value, '') || ' '
                     || coalesce(array_to_string(tags, ' '), '')),
               '[^\p{L}\p{N}]+'), lambda x: x <> '') AS toks
    FROM {table}
    WHERE NOT coalesce(deleted, false)
      AND (expires_at IS NULL OR expires_at > $now)
      AND ($namespace IS NULL OR namespace = $namespace)
      AND ($tag IS NULL OR list_contains(tags, $tag))
),
corpus AS (
    SELECT count(*) AS n, coalesce(avg(len(toks)), 0) AS avgdl FROM docs
),
q AS (
    SELECT DISTINCT term
    FROM unnest(regexp_split_to_array(lower($query), '[^\p{L}\p{N}]+')) AS t(term)
    WHERE term <> ''
),
tf AS (
    SELECT d.namespace, d.key, q.term, len(d.toks) AS dl,
           len(list_filter(d.toks, lambda x: x = q.term)) AS tf
    FROM docs d CROSS JOIN q
    WHERE list_contains(d.toks, q.term)
),
df AS (
    SELECT term, count(*) AS df FROM tf GROUP BY term
),
scored AS (
    SELECT tf.namespace, tf.key,
           sum(ln(1 + (c.n - df.df + 0.5) / (df.df + 0.5))
               * tf.tf * ($k1 + 1)
               / (tf.tf + $k1 * (1 - $b + $b * tf.dl / greatest(c.avgdl, 1e-9)))) AS score
    FROM tf
    JOIN df ON df.term = tf.term
    CROSS JOIN corpus c
    GROUP BY tf.namespace, tf.key
)
SELECT s.namespace, s.key, s.score, d.value, d.tags, d.version
FROM scored s JOIN docs d ON d.namespace = s.namespace AND d.key = s.key
ORDER BY s.score DESC, s.namespace, s.key
LIMIT $limit
"""


def _literal(value: str | None) -> str:
    """A DuckDB string literal (standard SQL: quotes doubled, no backslash escapes)."""
    return "NULL" if value is None else "'" + value.replace("'", "''") + "'"


def render_bm25(query: str, *, namespace: str | None = None, tag: str | None = None,
                limit: int = 10, now: datetime | None = None, table: str = "memory") -> str:
    """The BM25 query with its values inlined as literals (pure).

    Literals rather than parameters, so the same text runs locally and through
    the projector's query service (which takes no parameters).

    Raises:
        InvalidInput: ``limit`` < 1 or a table name that is not an identifier.
    """
    if limit < 1:
        raise InvalidInput("search limit must be at least 1")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", table):
        raise InvalidInput(f"not a table name: {table!r}")
    when = now or (_EPOCH + timedelta(milliseconds=wall_ms()))
    values = {
        "{table}": table, "$query": _literal(query), "$namespace": _literal(namespace),
        "$tag": _literal(tag), "$limit": str(int(limit)), "$k1": repr(K1), "$b": repr(B),
        "$now": f"TIMESTAMP '{when.isoformat(sep=' ')}'",
    }
    return re.sub(r"\{table\}|\$(?:query|namespace|tag|limit|k1|b|now)\b",
                  lambda m: values[m.group(0)], BM25_SQL)


def hits_from_rows(rows: Iterable[Sequence[Any]], query: str) -> list[SearchHit]:
    """Search hits from ``(namespace, key, score, value, tags, version)`` rows."""
    terms = query_terms(query)
    return [SearchHit(namespace=ns, key=key, score=float(score),
                      snippet=snippet(f"{value or ''}", terms), tags=tuple(tags or ()),
                      version=int(version or 0), value=value or "")
            for ns, key, score, value, tags, version in rows]


def bm25_search(
    conn: duckdb.DuckDBPyConnection,
    query: str,
    *,
    namespace: str | None = None,
    tag: str | None = None,
    limit: int = 10,
    now: datetime | None = None,
    table: str = "memory",
) -> list[SearchHit]:
    """Rank the live rows of ``table`` (the projection's ``memory`` shape) by BM25.

    ``table`` needs columns namespace, key, value, tags (VARCHAR[]), version,
    deleted, expires_at (naive UTC). Blocking: call it from a worker thread.

    Raises:
        InvalidInput: ``limit`` < 1 or a table name that is not an identifier.
    """
    sql = render_bm25(query, namespace=namespace, tag=tag, limit=limit, now=now, table=table)
    if not query_terms(query):
        return []
    return hits_from_rows(conn.execute(sql).fetchall(), query)


def search_entries(entries: Iterable[MemoryEntry], query: str, *, namespace: str | None = None,
                   tag: str | None = None, limit: int = 10) -> list[SearchHit]:
    """Load entries into an in-memory DuckDB and run :func:`bm25_search` (blocking)."""
    import duckdb

    conn = duckdb.connect(":memory:")
    try:
        conn.execute("CREATE TABLE memory (namespace VARCHAR, key VARCHAR, value VARCHAR, "
                     "tags VARCHAR[], version BIGINT, deleted BOOLEAN, expires_at TIMESTAMP)")
        items = list(entries)
        if items:
            # One statement with list parameters: executemany is ~1000x slower.
            conn.execute(
                "INSERT INTO memory SELECT unnest($ns), unnest($k), unnest($v), unnest($t), "
                "unnest($ver), false, unnest($exp)",
                {"ns": [e.namespace for e in items], "k": [e.key for e in items],
                 "v": [e.value for e in items], "t": [list(e.tags) for e in items],
                 "ver": [e.version for e in items],
                 "exp": [_EPOCH + timedelta(milliseconds=e.expires_ms) if e.expires_ms
                         else None for e in items]})
        return bm25_search(conn, query, namespace=namespace, tag=tag, limit=limit)
    finally:
        conn.close()


# ---------------------------------------------------------------------- adapter


class MemoryService:
    """``swarm.memory``: put/get/delete/list/history/search for one swarm."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.log = swarm.log
        self.bucket = swarm.log.bucket(names.MEMORY)
        self._limiter: Any = None

    async def _last(self, token: str) -> KvEntry | None:
        return await self.log.kv_last(self.bucket, token)

    async def put(
        self,
        namespace: str,
        key: str,
        value: Any,
        *,
        tags: Iterable[str] = (),
        ttl_s: float | None = None,
        expected_version: int | None = None,
        content_type: ContentType | None = None,
        metadata: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> MemoryEntry:
        """Store a value; returns the entry with its new version.

        Args:
            expected_version: compare-and-set. ``0``: only if no live entry
                exists; ``n``: only if the live entry is at version ``n``.
            request_id: the caller's intent. A retry with the same request id (after
                an ``Unavailable`` that may or may not have stored the write) returns
                the version the first try stored instead of writing again, as long as
                that version is still the entry's latest or the retry comes within the
                server's duplicate window (2 minutes).

        Raises:
            InvalidInput: empty namespace/key, bad JSON, TTL <= 0, value too large.
            MemoryConflict: ``expected_version`` did not match.
            Unavailable: NATS did not answer; with a ``request_id`` the error says the
                write may have been stored and to retry with the same request id.
        """
        token = key_token(namespace, key)
        text, ctype = normalize_value(value, content_type)
        if ttl_s is not None and ttl_s <= 0:
            raise InvalidInput("memory TTL must be > 0 seconds")
        if request_id is not None and not request_id.strip():
            raise InvalidInput("a request id cannot be empty")
        clean_tags = tuple(dict.fromkeys(t.strip() for t in tags if t.strip()))
        record = MemoryRecord(namespace=namespace, key=key, value=text, content_type=ctype,
                              tags=clean_tags, author=self.swarm.agent, ttl_s=ttl_s,
                              metadata=dict(metadata or {}),
                              updated_ms=wall_ms(), request_id=request_id)
        try:
            return await self._put(token, record, expected_version)
        except Unavailable as err:
            if request_id is None:
                raise
            raise Unavailable(
                f"{err}; the memory write of {namespace}/{key} may have been stored: "
                f"retry with the same request id {request_id}",
                request_id=request_id, maybe_stored=True) from err

    async def _put(self, token: str, record: MemoryRecord,
                   expected_version: int | None) -> MemoryEntry:
        namespace, key = record.namespace, record.key
        if record.request_id is not None:
            stored = await self._stored_by_request(token, record.request_id)
            if stored is not None:
                return stored
        expected_rev = await self._expected_revision(namespace, key, token, expected_version)
        out = build_memory_put(self.bucket, token, record, expected_revision=expected_rev)
        try:
            revision, duplicate = await publish(self.log.js, out, expected=expected_rev)
        except ConflictError:
            if record.request_id is not None:
                stored = await self._stored_by_request(token, record.request_id)
                if stored is not None:  # our first try landed; the retry lost to it
                    return stored
            last = await self._last(token)
            raise MemoryConflict(namespace, key, expected_version or 0,
                                 last.revision if last and last.live else None) from None
        kv = KvEntry(token, revision, out.payload, "PUT", {})
        if duplicate:  # the first try's value, not this retry's (its time differs)
            last = await self._last(token)
            if last is not None and last.revision == revision:
                kv = last
        entry = entry_from_kv(kv)
        assert entry is not None
        await self._record(token, entry, record.request_id)
        return entry

    async def _stored_by_request(self, token: str, request_id: str) -> MemoryEntry | None:
        """The entry if its latest version was written under ``request_id``; the event of
        that write is appended again (deduplicated) in case the first try stopped before
        it."""
        last = await self._last(token)
        if last is None or not last.live:
            return None
        try:
            stored = _record_decoder.decode(last.value)
        except msgspec.DecodeError:
            return None
        entry = entry_from_kv(last)
        if stored.request_id != request_id or entry is None:
            return None
        await self._record(token, entry, request_id)
        return entry

    async def _record(self, token: str, entry: MemoryEntry, request_id: str | None) -> None:
        """Append the ``MemoryStored`` event of a stored version (Msg-Id per version)."""
        event_id = (request_event_id(self.swarm.name, token, request_id)
                    if request_id is not None else None)
        await self.log.append(
            ev.MemoryStored(namespace=entry.namespace, key=entry.key, value=entry.value,
                            content_type=entry.content_type, tags=entry.tags,
                            version=entry.version, ttl_s=entry.ttl_s,
                            metadata=dict(entry.metadata)),
            token, msg_id=f"mem-{token}-{entry.version}", event_id=event_id,
            correlation_id=request_id)

    async def _expected_revision(self, namespace: str, key: str, token: str,
                                 expected_version: int | None) -> int | None:
        if expected_version is None:
            return None
        last = await self._last(token)
        live = last is not None and last.live
        if expected_version == 0:
            if live:
                assert last is not None
                raise MemoryConflict(namespace, key, 0, last.revision)
            # A tombstone or expiry marker is the subject's last message: expect it.
            return last.revision if last is not None else 0
        if not live or last is None or last.revision != expected_version:
            raise MemoryConflict(namespace, key, expected_version,
                                 last.revision if last and live else None)
        return expected_version

    async def get(self, namespace: str, key: str) -> MemoryEntry:
        """The live entry.

        Raises:
            NotFound: no such entry, or it was deleted or expired.
        """
        last = await self._last(key_token(namespace, key))
        entry = entry_from_kv(last) if last is not None else None
        if entry is None:
            raise NotFound("memory entry", f"{namespace}/{key}")
        return entry

    async def delete(self, namespace: str, key: str, *,
                     expected_version: int | None = None) -> int:
        """Delete an entry; returns the tombstone's revision.

        Raises:
            NotFound: no live entry.
            MemoryConflict: ``expected_version`` did not match.
        """
        token = key_token(namespace, key)
        last = await self._last(token)
        if last is None or not last.live:
            raise NotFound("memory entry", f"{namespace}/{key}")
        expected = last.revision if expected_version is None else expected_version
        if expected != last.revision:
            raise MemoryConflict(namespace, key, expected, last.revision)
        out = build_memory_delete(self.bucket, token, expected_revision=expected)
        try:
            revision, _ = await publish(self.log.js, out, expected=expected)
        except ConflictError:
            now = await self._last(token)
            if now is None or not now.live:
                raise NotFound("memory entry", f"{namespace}/{key}") from None
            raise MemoryConflict(namespace, key, expected, now.revision) from None
        await self.log.append(ev.MemoryDeleted(namespace=namespace, key=key, version=revision),
                              token, msg_id=f"mem-{token}-{revision}",
                              dedupe_by_msg_id=True)
        return revision

    async def list(self, namespace: str | None = None, tag: str | None = None
                   ) -> list[MemoryEntry]:
        """Every live entry, optionally of one namespace and/or carrying one tag."""
        out = []
        for kv in await self.log.kv_keys(self.bucket):
            entry = entry_from_kv(kv)
            if entry is None:
                continue
            if namespace is not None and entry.namespace != namespace:
                continue
            if tag is not None and tag not in entry.tags:
                continue
            out.append(entry)
        out.sort(key=lambda e: (e.namespace, e.key))
        return out

    async def history(self, namespace: str, key: str) -> builtins.list[HistoryItem]:
        """Every put and delete of an entry, oldest first (from the event stream).

        Raises:
            NotFound: the entry never existed.
        """
        token = key_token(namespace, key)
        items = await self.log.entity_events("memory", token)
        out = [item for stored in items if (item := _history_item(stored)) is not None
               and _same_entry(stored, namespace, key)]
        if not out:
            raise NotFound("memory entry", f"{namespace}/{key}")
        return out

    async def search(self, query: str, *, namespace: str | None = None, tag: str | None = None,
                     limit: int = 10, source: SearchSource = "auto"
                     ) -> builtins.list[SearchHit]:
        """BM25-ranked entries matching ``query`` over key, value and tags, with snippets.

        Args:
            source: ``"projection"`` asks the swarm's projector (read-your-writes:
                it waits until the projection reached the stream's current end);
                ``"kv"`` runs the same SQL on an in-memory DuckDB loaded from the
                live entries, in a dedicated worker thread; ``"auto"`` tries the
                projection and falls back to ``"kv"`` when no projector answers.

        Raises:
            InvalidInput: ``limit`` < 1.
            Unavailable: ``source="projection"`` and no projector answered.
            LimitExceeded: ``source="projection"`` and the projection lags too far.
        """
        sql = render_bm25(query, namespace=namespace, tag=tag, limit=limit)
        if not query_terms(query):
            return []
        if source in ("auto", "projection"):
            try:
                seq = await self.log.stream_last_seq()
                result = await self.swarm.query(sql, limit=limit, wait_for_seq=seq,
                                                timeout_s=PROJECTION_WAIT_S,
                                                fallback=source == "auto")
                return hits_from_rows(result.rows, query)
            except (Unavailable, LimitExceeded):  # no projector, or it lags behind
                if source == "projection":
                    raise
        import anyio

        entries = await self.list(namespace=namespace, tag=tag)
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)

        def run() -> builtins.list[SearchHit]:
            return search_entries(entries, query, namespace=namespace, tag=tag, limit=limit)

        hits: builtins.list[SearchHit] = await anyio.to_thread.run_sync(
            run, limiter=self._limiter)
        return hits


def _same_entry(stored: StoredEvent, namespace: str, key: str) -> bool:
    data = stored.event.data
    return getattr(data, "namespace", None) == namespace and getattr(data, "key", None) == key


def _history_item(stored: StoredEvent) -> HistoryItem | None:
    event = stored.event
    match event.data:
        case ev.MemoryStored() as d:
            return HistoryItem(seq=stored.seq, operation="put", version=d.version, value=d.value,
                               tags=d.tags, actor=event.actor, hlc=event.hlc, ttl_s=d.ttl_s)
        case ev.MemoryDeleted() as d:
            return HistoryItem(seq=stored.seq, operation="delete", version=d.version, value=None,
                               tags=(), actor=event.actor, hlc=event.hlc)
    return None


__all__ = [
    "BM25_SQL",
    "HistoryItem",
    "MemoryConflict",
    "MemoryEntry",
    "MemoryRecord",
    "MemoryService",
    "SearchHit",
    "bm25_search",
    "build_memory_delete",
    "build_memory_put",
    "entry_from_kv",
    "hits_from_rows",
    "key_token",
    "query_terms",
    "render_bm25",
    "request_event_id",
    "request_msg_id",
    "search_entries",
    "snippet",
    "token_parts",
]
