"""The DuckDB adapter of a projection: schema, batch apply with checkpoint, reads.

Every method is blocking and must run on the projector's one DuckDB thread
(``anyio.to_thread.run_sync`` with a ``CapacityLimiter(1)``); only
:meth:`ProjectionStore.cursor` may be used from another thread, for the query
service, because a DuckDB cursor is its own connection.

A batch and the checkpoint commit in one transaction: the rows go in through
DuckDB appenders, never row by row; a keyed table first loses the rows of the
keys the batch rewrites (one set-at-a-time ``DELETE ... USING``), and
``checkpoint.last_seq`` moves in the same commit. A kill -9 leaves
either the whole batch and its checkpoint or neither.

The database is opened with ``enable_external_access = false``: nothing that
runs on it (a query from the service included) can read or write other files.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from cflow.errors import CflowError, Unavailable
from cflow.projections import fold, schema

if TYPE_CHECKING:
    from cflow.projections.fold import Item

log = logging.getLogger(__name__)

_KEY_COLUMN = {
    "tasks": "task_id",
    "agents": "agent_id",
    "messages": "id",
    "reservations": "reservation_id",
    "control": "scope",
}


_KEY_POSITIONS = {table: [schema.COLUMNS[table].index(c) for c in key]
                  for table, key in schema.KEYS.items()}


def _delete_keys(table: str) -> str:
    """Delete the rows whose keys are given as parallel lists ($1, $2, ...)."""
    types = dict(schema.TABLES[table])
    key = schema.KEYS[table]
    given = ", ".join(f"unnest(${i + 1}::{types[c].split()[0]}[]) AS k{i}"
                      for i, c in enumerate(key))
    match = " AND ".join(f'{table}."{c}" = g.k{i}' for i, c in enumerate(key))
    return f"DELETE FROM {table} USING (SELECT {given}) g WHERE {match}"


def translate(exc: duckdb.Error, path: str) -> CflowError:
    """DuckDB errors are mapped by their class, never by their message."""
    if isinstance(exc, duckdb.IOException):
        return Unavailable(
            f"projection database {path} cannot be opened (in use by another projector?): "
            f"{str(exc).splitlines()[0]}", path=path)
    return CflowError(f"projection database {path}: {str(exc).splitlines()[0]}", path=path)


def connect(path: str | Path, *, external_access: bool = False) -> duckdb.DuckDBPyConnection:
    """Open (creating if needed) a projection database file.

    Raises:
        Unavailable: the file is locked by another process or cannot be opened.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        return duckdb.connect(str(p), config={"enable_external_access": external_access})
    except duckdb.Error as exc:
        raise translate(exc, str(p)) from exc


class ProjectionStore:
    """One projection database, opened for writing by this process only."""

    def __init__(self, path: str | Path, *, projection: str = schema.PROJECTION,
                 max_event_bytes: int = fold.DEFAULT_MAX_EVENT_BYTES) -> None:
        self.path = str(path)
        self.projection = projection
        self.max_event_bytes = max_event_bytes
        self.con = connect(path)
        try:
            self.con.execute("BEGIN")
            for statement in schema.ddl():
                self.con.execute(statement)
            self.con.execute(
                "INSERT INTO checkpoint SELECT ?, 0, NULL WHERE NOT EXISTS "
                "(SELECT 1 FROM checkpoint WHERE projection = ?)", [projection, projection])
            self.con.execute("COMMIT")
            self._appenders = {t: self.con.appender(t) for t in schema.APPEND_ONLY}
            self._upserters = {t: self.con.appender(t) for t in schema.UPSERTED}
            self._deletes = {t: _delete_keys(t) for t in schema.UPSERTED}
            self.last_seq = self.read_checkpoint()
        except duckdb.Error as exc:
            self.con.close()
            raise translate(exc, self.path) from exc

    def read_checkpoint(self) -> int:
        row = self.con.execute("SELECT last_seq FROM checkpoint WHERE projection = ?",
                               [self.projection]).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.con.close()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A separate connection to the same database, for readers on other threads."""
        return self.con.cursor()

    # -- loading the rows a batch touches

    def _load(self, table: str, keys: set[str]) -> list[dict[str, Any]]:
        if not keys:
            return []
        cols = schema.columns(table)
        rows = self.con.execute(
            f"SELECT {schema.select_list(table)} FROM {table} "
            f"WHERE {_KEY_COLUMN[table]} IN (SELECT unnest($1::VARCHAR[]))", [sorted(keys)]
        ).fetchall()
        return [dict(zip(cols, row, strict=True)) for row in rows]

    def snapshot(self, items: Sequence[Item]) -> fold.Snapshot:
        keys = fold.keys_of(items)
        snap = fold.Snapshot()
        for row in self._load("tasks", keys.tasks):
            snap.tasks[row["task_id"]] = row
        if snap.tasks:
            cols = schema.columns("task_attempts")
            for values in self.con.execute(
                f"SELECT {schema.select_list('task_attempts')} FROM task_attempts "
                "WHERE ended_at IS NULL AND task_id IN (SELECT unnest($1::VARCHAR[]))",
                [sorted(snap.tasks)],
            ).fetchall():
                row = dict(zip(cols, values, strict=True))
                snap.attempts[(row["task_id"], row["epoch"])] = row
        agents = keys.agents | fold.agents_of(snap.tasks)
        snap.agents = {r["agent_id"]: r for r in self._load("agents", agents)}
        snap.messages = {r["id"]: r for r in self._load("messages", keys.messages)}
        snap.reservations = {r["reservation_id"]: r
                             for r in self._load("reservations", keys.reservations)}
        snap.control = {r["scope"]: r for r in self._load("control", keys.control)}
        if keys.memory:
            cols = schema.columns("memory")
            spaces, names = zip(*sorted(keys.memory), strict=True)
            for values in self.con.execute(
                f"SELECT {', '.join('m.' + c for c in cols)} FROM memory m JOIN "
                "(SELECT unnest($1::VARCHAR[]) AS ns, unnest($2::VARCHAR[]) AS k) q "
                "ON m.namespace = q.ns AND m.key = q.k", [list(spaces), list(names)],
            ).fetchall():
                row = dict(zip(cols, values, strict=True))
                snap.memory[(row["namespace"], row["key"])] = row
        return snap

    # -- applying

    def apply(self, items: Sequence[Item], seen_at: datetime) -> fold.Changes:
        """Apply one batch (stream order) and move the checkpoint, in one transaction.

        Items at or below the checkpoint are skipped, so a batch is never applied
        twice. If DuckDB refuses the batch, it is rolled back and retried one
        event per transaction; an event DuckDB refuses on its own is quarantined.

        Raises:
            CflowError: DuckDB refused even a quarantine row (disk full, ...).
        """
        fresh = [item for item in items if item.seq > self.last_seq]
        if not fresh:
            return fold.Changes(last_seq=self.last_seq)
        try:
            return self._apply(fresh, seen_at)
        except duckdb.Error as exc:
            log.warning("batch %d..%d refused by DuckDB (%s); applying one by one",
                        fresh[0].seq, fresh[-1].seq, str(exc).splitlines()[0])
        total = fold.Changes(last_seq=self.last_seq)
        for item in fresh:
            try:
                done = self._apply([item], seen_at)
            except duckdb.Error as exc:
                done = self._quarantine_only(item, seen_at, f"DuckDB refused it: {exc}")
            total.last_seq = done.last_seq
            total.count += done.count
            total.quarantined += done.quarantined
        return total

    def _apply(self, items: Sequence[Item], seen_at: datetime) -> fold.Changes:
        con = self.con
        con.execute("BEGIN")
        try:
            changes = fold.fold_batch(items, self.snapshot(items), seen_at=seen_at,
                                      max_event_bytes=self.max_event_bytes)
            self._write(changes, seen_at)
            con.execute("COMMIT")
        except BaseException:
            self._abort()
            raise
        self.last_seq = changes.last_seq
        return changes

    def _write(self, changes: fold.Changes, seen_at: datetime) -> None:
        for table, rows in changes.appends.items():
            if rows:
                appender = self._appenders[table]
                appender.append_rows(rows)
                appender.flush()
        for table, rows in changes.upserts.items():
            if rows:
                key_columns = [list(col) for col in zip(*self._key_values(table, rows),
                                                        strict=True)]
                self.con.execute(self._deletes[table], key_columns)
                upserter = self._upserters[table]
                upserter.append_rows(rows)
                upserter.flush()
        self.con.execute("UPDATE checkpoint SET last_seq = ?, updated_at = ? WHERE projection = ?",
                         [changes.last_seq, seen_at, self.projection])

    @staticmethod
    def _key_values(table: str, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        return [tuple(row[i] for i in _KEY_POSITIONS[table]) for row in rows]

    def _abort(self) -> None:
        for appender in (*self._appenders.values(), *self._upserters.values()):
            appender.clear()
        # The failed statement may already have ended the transaction.
        with contextlib.suppress(duckdb.Error):
            self.con.execute("ROLLBACK")

    def _quarantine_only(self, item: Item, seen_at: datetime, error: str) -> fold.Changes:
        raw: bytes = getattr(item, "raw", b"")
        event = getattr(item, "event", None)
        if event is not None:
            from cflow.events import encode

            raw = encode(event)
        changes = fold.Changes(last_seq=item.seq, count=1, quarantined=1)
        changes.appends["quarantine"].append((item.seq, item.subject, raw, error[:2000], seen_at))
        try:
            self.con.execute("BEGIN")
            self._write(changes, seen_at)
            self.con.execute("COMMIT")
        except duckdb.Error as exc:
            self._abort()
            raise translate(exc, self.path) from exc
        self.last_seq = item.seq
        return changes

    # -- reading (projector thread)

    def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.con.execute(sql, list(params)).fetchall()


def table_rows(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple[Any, ...]]:
    """Every row of ``table`` minus wall-clock columns, in a deterministic order."""
    skip = schema.WALL_CLOCK_COLUMNS.get(table, ())
    cols = [f'"{c}"' for c in schema.columns(table) if c not in skip]
    return con.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY ALL").fetchall()


__all__ = ["ProjectionStore", "connect", "table_rows", "translate"]
