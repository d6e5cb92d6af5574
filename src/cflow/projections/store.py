"""The DuckDB adapter of a projection: schema, batch apply with checkpoint, reads.

Every method is blocking and must run on the projector's one DuckDB thread
(``anyio.to_thread.run_sync`` with a ``CapacityLimiter(1)``); only
:meth:`ProjectionStore.cursor` may be used from another thread, for the query
service, because a DuckDB cursor is its own connection.

A batch and the checkpoint commit in one transaction: the rows go in through
DuckDB appenders, never row by row; a keyed table first loses the rows of the
keys the batch rewrites (one ``DELETE``: a few keys by key equalities, more
through a join with the key lists), and
``checkpoint.last_seq`` (a view: the largest ``seq`` of ``events`` and
``quarantine``, where every applied event leaves a row) moves with those rows.
A kill -9 leaves either the whole batch and its checkpoint or neither.

The database is opened with ``enable_external_access = false``: nothing that
runs on it (a query from the service included) can read or write other files.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from cflow.errors import CflowError, Damaged, InvalidState, Unavailable
from cflow.projections import fold, schema

if TYPE_CHECKING:
    from cflow.projections.fold import Item

log = logging.getLogger(__name__)



# Up to this many keys a batch reads or deletes with a plain WHERE (an OR of key
# equalities), past it through a join with the unnested key lists. Measured
# 2026-12-04 on 2k and 210k tasks: one key read 1.2-1.4 ms against 2.0-2.3, deleted
# 0.4-0.5 against 0.9-1.1; 100k attempts (a two-column key): one key deleted 0.57
# against 1.25, 8 keys 1.8 against 3.7; the join is ahead from 16-32 keys on.
FEW_KEYS = 8
CACHE_MAX_ROWS = 200_000  # per table; beyond it the cache is dropped and misses are read
# A replay keeps at most about this many keyed rows in memory; then it writes them
# (and its checkpoint) with the batch, as upserts, and its row cache obeys CACHE_MAX_ROWS.
REPLAY_FLUSH_ROWS = 200_000
# A live store also freezes what survives each batch (see _apply). Once a minute it
# looks whether the frozen objects have grown by a quarter (plus a slack) since its
# last full collection (CPython's own rule for full collections) and if so runs one
# over everything, so cyclic garbage frozen meanwhile is still reclaimed.
FULL_COLLECTION_GROWTH = 1.25
FULL_COLLECTION_SLACK = 50_000
FULL_COLLECTION_MIN_INTERVAL_S = 60.0
# DuckDB threads per statement (``SET threads``, for the whole database: the writer
# and the query service's cursors). With 1 a statement runs on the thread that
# issues it and wakes no DuckDB worker: a one-event batch cost 3.9 ms instead of
# 4.6 and a point query 1.4 instead of 1.5 (2026-12-04, quiet 2-core machine;
# the wake-ups are per statement, not per row). Every view of a 300k-event
# projection took as long either way there (0.9-1.2 s for all of them), so it is
# also the default for a rebuild; ``cfctl projector --threads`` raises it.
DEFAULT_THREADS = 1
# A live store rewrites its checkpoint row (for ``updated_at``) at most this often;
# the position itself commits with every batch's rows (schema.CHECKPOINT_VIEW).
# The row's UPDATE in every batch cost 0.6 ms of a one-event batch's 4.4.
CHECKPOINT_ROW_INTERVAL_S = 1.0

# Snapshot attribute holding each keyed table's rows.
_SNAPSHOT_FIELD = {"tasks": "tasks", "task_attempts": "attempts", "agents": "agents",
                   "memory": "memory", "messages": "messages",
                   "reservations": "reservations", "control": "control"}


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a batch is folded and written.

    A batch allocates tens of thousands of short-lived rows while the row cache
    holds hundreds of thousands of long-lived ones, so the collector's periodic
    passes over the cache cost more than the fold itself (measured: about 25%
    of the apply path, 40% of a rebuild). Reference counting still frees the
    batch's garbage at once; cycles wait for the next collection, which runs
    as usual once the batch is written. Nestable across threads (two stores).
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


def _key_of(table: str) -> Any:
    key = schema.KEYS[table]
    if len(key) == 1:
        return lambda row: row[key[0]]
    return lambda row: tuple(row[c] for c in key)


def _given_keys(table: str) -> str:
    types = dict(schema.TABLES[table])
    return ", ".join(f"unnest(${i + 1}::{types[c].split()[0]}[]) AS k{i}"
                     for i, c in enumerate(schema.KEYS[table]))


def _key_lists(table: str, keys: Iterable[Any]) -> list[list[Any]]:
    """Keys as parallel lists, one per key column (the parameters of the statements)."""
    if len(schema.KEYS[table]) == 1:
        return [list(keys)]
    return [list(col) for col in zip(*keys, strict=True)] or [[] for _ in schema.KEYS[table]]


def _select_keys(table: str) -> str:
    cols = ", ".join(f't."{c}"' for c in schema.COLUMNS[table])
    match = " AND ".join(f't."{c}" = g.k{i}' for i, c in enumerate(schema.KEYS[table]))
    return f"SELECT {cols} FROM {table} t JOIN (SELECT {_given_keys(table)}) g ON {match}"


def _delete_keys(table: str) -> str:
    """Delete the rows whose keys are given as parallel lists ($1, $2, ...)."""
    match = " AND ".join(f'{table}."{c}" = g.k{i}' for i, c in enumerate(schema.KEYS[table]))
    return f"DELETE FROM {table} USING (SELECT {_given_keys(table)}) g WHERE {match}"


def _few_keys(verb: str, table: str, n: int) -> str:
    """``SELECT`` the rows of ``n`` keys, or ``DELETE`` them, with a plain ``WHERE``
    (an OR of key equalities); the keys' values are the parameters, key by key."""
    one = " AND ".join(f'"{c}" = ?' for c in schema.KEYS[table])
    where = " OR ".join([f"({one})"] * n)
    if verb == "SELECT":
        return f"SELECT {schema.select_list(table)} FROM {table} WHERE {where}"
    return f"DELETE FROM {table} WHERE {where}"


def _flat_keys(table: str, keys: Iterable[Any]) -> list[Any]:
    if len(schema.KEYS[table]) == 1:
        return list(keys)
    return [value for key in keys for value in key]


_NUMERIC = ("INTEGER", "BIGINT", "DOUBLE")


def _numeric_columns(table: str) -> tuple[str, ...]:
    return tuple(c for c, kind in schema.TABLES[table] if kind.split()[0] in _NUMERIC)


def _getter(cols: Sequence[str]) -> Any:
    """A row dict -> the tuple of ``cols`` (a tuple even for one column)."""
    if len(cols) == 1:
        return lambda row: (row[cols[0]],)
    return itemgetter(*cols)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def translate(exc: duckdb.Error, path: str) -> CflowError:
    """DuckDB errors are mapped by their class, never by their message."""
    if isinstance(exc, duckdb.IOException):
        return Unavailable(
            f"projection database {path} cannot be opened (in use by another projector?): "
            f"{str(exc).splitlines()[0]}", path=path)
    return CflowError(f"projection database {path}: {str(exc).splitlines()[0]}", path=path)


# DuckDB could not write the file (a full disk, an I/O error, a commit that failed,
# a database it gave up on): not the events' fault, so a batch refused with one of
# these is refused whole (Unavailable) and nothing is quarantined for it.
_NOT_WRITTEN = (duckdb.IOException, duckdb.TransactionException, duckdb.FatalException)
# Failures that say nothing of the file itself: this process has it open with another
# configuration, memory ran out, the statement was interrupted.
_NOT_THE_FILE = (duckdb.ConnectionException, duckdb.OutOfMemoryException,
                 duckdb.InterruptException)


def held_elsewhere(path: Path) -> bool:
    """Whether another process has ``path`` open (DuckDB holds an fcntl lock on its file).

    Only for a file this process does not hold: closing the probe drops every
    fcntl lock this process has on the file (POSIX).
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def readable(path: Path) -> bool:
    """Whether DuckDB reads ``path``: opened read-only (nothing is written, so a full
    disk does not matter) and, where the file has one, its checkpoint read."""
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error:
        return False
    try:
        con.execute("SELECT * FROM checkpoint").fetchall()
    except duckdb.CatalogException:
        return True  # none yet (a file whose first open did not finish)
    except duckdb.Error:
        return False
    finally:
        con.close()
    return True


def open_failure(exc: duckdb.Error, path: Path, existed: bool) -> CflowError:
    """Why a projection file DuckDB failed to open is refused: another process holds
    it or it cannot be written now (``Unavailable``: a full disk), or DuckDB cannot
    read it (``Damaged``: a projection is set aside and rebuilt from its stream).
    Told apart by the file's lock and a read-only open, not by DuckDB's message."""
    if not existed or isinstance(exc, _NOT_THE_FILE):
        return translate(exc, str(path))
    if held_elsewhere(path):
        return Unavailable(f"projection database {path} is in use by another process: "
                           f"{_first_line(exc)}", path=str(path))
    if readable(path):
        return Unavailable(f"projection database {path} cannot be written: "
                           f"{_first_line(exc)}", path=str(path))
    return Damaged(f"projection database {path} cannot be read: {_first_line(exc)}",
                   path=str(path))


def connect(path: str | Path, *, external_access: bool = False) -> duckdb.DuckDBPyConnection:
    """Open (creating if needed) a projection database file.

    Raises:
        Unavailable: the file is locked by another process or cannot be opened.
        Damaged: the file exists and DuckDB cannot read it.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    existed = p.exists()
    try:
        return duckdb.connect(str(p), config={"enable_external_access": external_access})
    except duckdb.Error as exc:
        raise open_failure(exc, p, existed) from exc


class ProjectionStore:
    """One projection database, opened for writing by this process only."""

    def __init__(self, path: str | Path, *, projection: str = schema.PROJECTION,
                 max_event_bytes: int = fold.DEFAULT_MAX_EVENT_BYTES,
                 replay: bool = False, threads: int = DEFAULT_THREADS) -> None:
        self.path = str(path)
        self.projection = projection
        self.max_event_bytes = max_event_bytes
        # Replay (a rebuild into a fresh, private file): keyed rows stay in memory
        # (up to REPLAY_FLUSH_ROWS) and are written with the checkpoint at a flush or
        # by finish(); only a finished file is ever used.
        self.replay = replay
        self._unwritten: dict[str, dict[Any, dict[str, Any]]] = {
            t: {} for t in schema.UPSERTED}
        self._flushing = False  # this batch writes the unwritten rows too
        self._flushed = False  # some keyed rows are in the file already
        # A cancelled caller may leave a batch running on the DuckDB thread; close()
        # must wait for it rather than hit DuckDB's "connection is busy".
        self._busy = threading.Lock()
        self._collect_above = 0  # frozen objects past which a live batch collects all
        self._collect_after = 0.0  # ... from this time.monotonic() on
        self._row_due = 0.0  # a live batch writes the checkpoint row from this monotonic time
        existed = Path(path).exists()
        self.con = connect(path)
        try:
            self.con.execute(f"SET threads = {int(threads)}")
            self.con.execute("BEGIN")
            self._check_version()
            for statement in schema.ddl():
                self.con.execute(statement)
            self.con.execute(
                f"INSERT INTO {schema.STORED_CHECKPOINT} SELECT ?, 0, NULL WHERE NOT EXISTS "
                f"(SELECT 1 FROM {schema.STORED_CHECKPOINT} WHERE projection = ?)",
                [projection, projection])
            if replay:
                self.con.execute("INSERT OR REPLACE INTO projection_meta VALUES (?, 'true')",
                                 [schema.REPLAY_META_KEY])
            self.con.execute("COMMIT")
            self._appenders = {t: self.con.appender(t) for t in schema.APPEND_ONLY}
            self._upserters = {t: self.con.appender(t) for t in schema.UPSERTED}
            self._staged = self._stages() if replay else {}
            self._checkers = {t: (self.con.appender(t, columns=list(cols)), _getter(cols))
                              for t in schema.UPSERTED if (cols := _numeric_columns(t))}
            self._by_join = {("DELETE", t): _delete_keys(t) for t in schema.UPSERTED} | {
                ("SELECT", t): _select_keys(t) for t in schema.UPSERTED}
            self._keys = {t: _key_of(t) for t in schema.UPSERTED}
            self.last_seq = self.read_checkpoint()
            self._warm_cache()
            if not replay:
                self._freeze_baseline()
        except CflowError:
            self.con.close()
            raise
        except duckdb.Error as exc:  # a damaged file may open and fail at its first read
            self.con.close()
            raise open_failure(exc, Path(self.path), existed) from exc

    def _freeze_baseline(self) -> None:
        """Freeze what this process holds now (the rows just cached among it) and
        measure the growth rule of :meth:`_apply` from here, a minute on. Without
        it the first batch found every object frozen before it as growth and paid
        a full collection of the whole process: 0.43 s with 1.5M objects frozen,
        the lag p99 of a 3 s benchmark run at 1k events/s."""
        gc.freeze()
        self._collect_above = (int(gc.get_freeze_count() * FULL_COLLECTION_GROWTH)
                               + FULL_COLLECTION_SLACK)
        self._collect_after = time.monotonic() + FULL_COLLECTION_MIN_INTERVAL_S

    def _stages(self) -> dict[str, duckdb.Appender]:
        """Replay: an appender per table with ``JSON`` columns into a temporary copy
        where they are ``VARCHAR``; :meth:`_append` moves the rows on with one
        ``INSERT ... SELECT``. DuckDB takes the same text either way (the cast keeps
        it byte for byte), but the appender's conversion of a Python string to
        ``JSON`` cost 2-3 us a value against 0.5 us to ``VARCHAR``."""
        stages = {}
        for table, cols in schema.TABLES.items():
            if table in self._appenders or table in self._upserters:
                kinds = [kind.split()[0] for _, kind in cols]
                if "JSON" in kinds:
                    columns = ", ".join(f'"{name}" {"VARCHAR" if kind == "JSON" else kind}'
                                        for (name, _), kind in zip(cols, kinds, strict=True))
                    self.con.execute(f"CREATE TEMP TABLE replay_{table} ({columns})")
                    stages[table] = self.con.appender(f"replay_{table}")
        return stages

    def _append(self, table: str, rows: list[tuple[Any, ...]]) -> None:
        """Append ``rows`` to ``table`` (through its stage in a replay)."""
        staged = self._staged.get(table) if self.replay else None
        if staged is None:
            appender = self._appenders.get(table) or self._upserters[table]
            appender.append_rows(rows)
            appender.flush()
            return
        staged.append_rows(rows)
        staged.flush()
        self.con.execute(f"INSERT INTO {table} SELECT * FROM replay_{table}")
        self.con.execute(f"DELETE FROM replay_{table}")

    def _check_version(self) -> None:
        """Refuse a file of another schema version; a file made when ``checkpoint``
        was a table gets it renamed to the table behind the view (its row holds
        the position; no rebuild needed)."""
        tables = {name for (name,) in self.con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "AND table_name IN ('checkpoint', ?)", [schema.STORED_CHECKPOINT]).fetchall()}
        if "checkpoint" in tables:
            self.con.execute(f"ALTER TABLE checkpoint RENAME TO {schema.STORED_CHECKPOINT}")
        self.con.execute(schema.META_DDL)
        if not tables:
            self.con.execute("INSERT INTO projection_meta VALUES ('schema_version', ?)",
                             [str(schema.SCHEMA_VERSION)])
            return
        found = self.con.execute(
            "SELECT value FROM projection_meta WHERE key = 'schema_version'").fetchone()
        version = found[0] if found else "none"
        if version != str(schema.SCHEMA_VERSION):
            self.con.execute("ROLLBACK")
            raise InvalidState(
                f"projection database {self.path} has schema version {version}, this cflow "
                f"writes {schema.SCHEMA_VERSION}: run `cfctl projections rebuild`",
                path=self.path, version=version)

    def read_checkpoint(self) -> int:
        row = self.con.execute("SELECT last_seq FROM checkpoint WHERE projection = ?",
                               [self.projection]).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        with self._busy:
            self.con.close()
            gc.unfreeze()

    def usable(self) -> bool:
        """Whether DuckDB still serves this file (a fatal error, such as a checkpoint
        that could not be written, invalidates the database until it is opened again)."""
        try:
            self.con.execute("SELECT 1").fetchall()
        except duckdb.Error:
            return False
        return True

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A separate connection to the same database, for readers on other threads."""
        return self.con.cursor()

    # -- the rows a batch touches: a write-through cache over the keyed tables
    #
    # This process is the only writer, so a row cached after a commit stays true.
    # A table whose every row is cached is "complete": a key missing from it does
    # not exist, and no query is needed. Running attempts are always complete.

    def _warm_cache(self) -> None:
        self._cache: dict[str, dict[Any, dict[str, Any]]] = {}
        self._complete: dict[str, bool] = {}
        for table in schema.UPSERTED:
            where = " WHERE ended_at IS NULL" if table == "task_attempts" else ""
            found = self.con.execute(f"SELECT count(*) FROM {table}{where}").fetchone()
            if found is not None and found[0] > CACHE_MAX_ROWS and not self.replay:
                self._cache[table], self._complete[table] = {}, False
                continue
            rows = self.con.execute(
                f"SELECT {schema.select_list(table)} FROM {table}{where}").fetchall()
            self._cache[table] = self._as_dicts(table, rows)
            self._complete[table] = True

    def _as_dicts(self, table: str, rows: list[tuple[Any, ...]]) -> dict[Any, dict[str, Any]]:
        cols, key = schema.COLUMNS[table], self._keys[table]
        out = {}
        for values in rows:
            row = dict(zip(cols, values, strict=True))
            out[key(row)] = row
        return out

    def _rows(self, snap: fold.Snapshot, table: str,
              keys: Iterable[Any]) -> dict[Any, dict[str, Any]]:
        """The rows of ``keys`` that exist (from the cache, else read); the keys go
        into ``snap.looked_up`` (see :meth:`_write`)."""
        cache = self._cache[table]
        asked = snap.looked_up.setdefault(table, set())
        hits, misses = {}, []
        for k in keys:
            asked.add(k)
            row = cache.get(k)
            if row is not None:
                hits[k] = row
            elif not self._complete[table]:
                misses.append(k)
        if misses:
            found = self._as_dicts(table, self._keyed("SELECT", table, sorted(misses)).fetchall())
            cache.update(found)
            hits.update(found)
        return hits

    def _keyed(self, verb: str, table: str, keys: Sequence[Any]) -> duckdb.DuckDBPyConnection:
        """``SELECT`` the rows of ``keys`` or ``DELETE`` them (``verb``), with the
        statement that is cheaper for their number (FEW_KEYS)."""
        if len(keys) > FEW_KEYS:
            return self.con.execute(self._by_join[verb, table], _key_lists(table, keys))
        return self.con.execute(_few_keys(verb, table, len(keys)), _flat_keys(table, keys))

    def snapshot(self, items: Sequence[Item]) -> fold.Snapshot:
        keys = fold.keys_of(items)
        snap = fold.Snapshot()
        snap.tasks = self._rows(snap, "tasks", keys.tasks)
        running = self._cache["task_attempts"]
        for task_id, row in snap.tasks.items():
            attempt = running.get((task_id, row["epoch"]))
            if attempt is not None:
                snap.attempts[(task_id, row["epoch"])] = attempt
        snap.agents = self._rows(snap, "agents", keys.agents | fold.agents_of(snap.tasks))
        snap.memory = self._rows(snap, "memory", keys.memory)
        snap.messages = self._rows(snap, "messages", keys.messages)
        snap.reservations = self._rows(snap, "reservations", keys.reservations)
        snap.control = self._rows(snap, "control", keys.control)
        return snap

    def _remember(self, changes: fold.Changes) -> None:
        """After a commit: the rows written are the rows in the database."""
        flushed, self._flushing = self._flushing, False
        if flushed:
            self._unwritten = {t: {} for t in schema.UPSERTED}
            self._flushed = True
        for table, rows in changes.rows.items():
            if self.replay and not flushed:
                self._unwritten[table].update(rows)
            cache = self._cache[table]
            if table == "task_attempts":
                for k, row in rows.items():
                    if row["outcome"] == "running":
                        cache[k] = row
                    else:
                        cache.pop(k, None)
                continue
            cache.update(rows)
            # A replay's cache holds its unwritten rows: dropped only once they are written.
            if len(cache) > CACHE_MAX_ROWS and (flushed or not self.replay):
                cache.clear()
                self._complete[table] = False

    # -- applying

    def apply(self, items: Sequence[Item], seen_at: datetime) -> fold.Changes:
        with self._busy, gc_paused():
            return self._apply_batch(items, seen_at)

    def _apply_batch(self, items: Sequence[Item], seen_at: datetime) -> fold.Changes:
        """Apply one batch (stream order) and move the checkpoint, in one transaction.

        Items at or below the checkpoint are skipped, so a batch is never applied
        twice. If DuckDB refuses the batch, it is rolled back and retried one
        event per transaction; an event DuckDB refuses on its own is quarantined.
        A batch DuckDB could not *write* (``_NOT_WRITTEN``: the disk, the file) is
        rolled back and refused whole: no event is quarantined for the disk's sake.

        Raises:
            Unavailable: DuckDB could not write the file (a full disk, an I/O error).
            CflowError: DuckDB refused even a quarantine row.
        """
        fresh = [item for item in items if item.seq > self.last_seq]
        if not fresh:
            return fold.Changes(last_seq=self.last_seq)
        # Whatever a batch raised (DuckDB refusing a value, a conversion the
        # appender cannot make, a bug), the events are retried one by one and only
        # the ones that fail alone are quarantined: the projector does not stop.
        try:
            return self._apply(fresh, seen_at)
        except _NOT_WRITTEN as exc:
            raise self._not_written(exc) from exc
        except Exception as exc:
            log.warning("batch %d..%d refused (%s); applying one by one",
                        fresh[0].seq, fresh[-1].seq, _first_line(exc))
        total = fold.Changes(last_seq=self.last_seq)
        for item in fresh:
            try:
                done = self._apply([item], seen_at)
            except _NOT_WRITTEN as exc:
                raise self._not_written(exc) from exc
            except Exception as exc:
                done = self._quarantine_only(
                    item, seen_at, f"DuckDB refused it: {type(exc).__name__}: {_first_line(exc)}")
            total.last_seq = done.last_seq
            total.count += done.count
            total.quarantined += done.quarantined
        return total

    def _not_written(self, exc: duckdb.Error) -> Unavailable:
        return Unavailable(f"projection database {self.path} cannot be written: "
                           f"{_first_line(exc)}", path=self.path)

    def _apply(self, items: Sequence[Item], seen_at: datetime) -> fold.Changes:
        con = self.con
        con.execute("BEGIN")
        try:
            snap = self.snapshot(items)
            changes = fold.fold_batch(items, snap, seen_at=seen_at,
                                      max_event_bytes=self.max_event_bytes,
                                      rows_only=self.replay)
            self._write(changes, seen_at, snap)
            con.execute("COMMIT")
        except BaseException:
            self._abort()
            raise
        self.last_seq = changes.last_seq
        self._remember(changes)
        # The rows just cached (and a replay's, kept for finish()) live long: keep the
        # collector's passes off them (see gc_paused). Without this, at 10k events/s
        # the collections after each batch cost 10-30% of the projector's CPU.
        gc.freeze()
        # gc.get_freeze_count() walks every frozen object (5-6 ms at 110k, more than
        # the rest of a small batch), so the growth is looked at once a minute, not
        # after every batch.
        if not self.replay and time.monotonic() >= self._collect_after:
            if gc.get_freeze_count() > self._collect_above:
                gc.unfreeze()
                gc.collect()
                gc.freeze()
                self._collect_above = (int(gc.get_freeze_count() * FULL_COLLECTION_GROWTH)
                                       + FULL_COLLECTION_SLACK)
            self._collect_after = time.monotonic() + FULL_COLLECTION_MIN_INTERVAL_S
        return changes

    def _write(self, changes: fold.Changes, seen_at: datetime,
               snap: fold.Snapshot | None = None) -> None:
        for table, rows in changes.appends.items():
            if rows:
                self._append(table, rows)
        if self.replay:
            self._check_rows(changes)
            pending = sum(len(rows) for rows in self._unwritten.values())
            if pending + sum(len(rows) for rows in changes.rows.values()) > REPLAY_FLUSH_ROWS:
                self._flush_unwritten(changes, seen_at)
        for table, rows in changes.upserts.items():
            if rows and not self.replay:
                # Only keys that exist need deleting: those the snapshot found. A
                # key it did not find does not exist if the cache is complete or the
                # snapshot looked it up (read it from the table); any other key is
                # deleted, to be safe. So a new key costs no DELETE, also in a table
                # too large for the cache (a new task among 200k: one statement less).
                written = changes.rows[table]
                if snap is not None:
                    existing = getattr(snap, _SNAPSHOT_FIELD[table])
                    if self._complete[table]:
                        stale = [k for k in written if k in existing]
                    else:
                        asked = snap.looked_up.get(table, set())
                        stale = [k for k in written if k in existing or k not in asked]
                else:
                    stale = list(written)
                if stale:
                    self._keyed("DELETE", table, stale)
                upserter = self._upserters[table]
                upserter.append_rows(rows)
                upserter.flush()
        # The position moves with the rows themselves (the checkpoint view reads the
        # largest seq of events and quarantine); the row behind it is rewritten only
        # once a CHECKPOINT_ROW_INTERVAL_S, for its updated_at. A replay's row moves
        # with its keyed rows (a flush, finish()).
        if not self.replay and time.monotonic() >= self._row_due:
            self._move_checkpoint(changes.last_seq, seen_at)
            self._row_due = time.monotonic() + CHECKPOINT_ROW_INTERVAL_S

    def _move_checkpoint(self, last_seq: int, seen_at: datetime) -> None:
        self.con.execute(f"UPDATE {schema.STORED_CHECKPOINT} SET last_seq = ?, updated_at = ? "
                         "WHERE projection = ?", [last_seq, seen_at, self.projection])

    def _flush_unwritten(self, changes: fold.Changes, seen_at: datetime) -> None:
        """Replay: write the unwritten keyed rows and this batch's, and the checkpoint,
        in the batch's transaction (memory stays bounded; the file stays consistent)."""
        for table in schema.UPSERTED:
            rows = self._unwritten[table].copy()
            rows.update(changes.rows[table])
            self._upsert(table, rows)
        self._move_checkpoint(changes.last_seq, seen_at)
        self._flushing = True

    def _upsert(self, table: str, rows: dict[Any, dict[str, Any]]) -> None:
        """Replay: write keyed rows, deleting their older versions if any were written."""
        if not rows:
            return
        if self._flushed:
            self._keyed("DELETE", table, list(rows))
        self._append(table, [fold.row_tuple(table, r) for r in rows.values()])

    def _check_rows(self, changes: fold.Changes) -> None:
        """Replay: convert the batch's numbers as DuckDB will when the rows are written.

        The numeric columns of each keyed row go through an appender that is
        cleared, never flushed (DuckDB converts a value when it is appended), so a
        value DuckDB refuses (an integer out of range) fails this batch, which is
        then retried one event at a time and the event quarantined, as the live
        projector does. Only numbers: every other value is a string, list or
        mapping msgspec decoded (valid UTF-8, no lone surrogate) or a time the
        fold computed, which DuckDB takes; converting whole rows cost 30% of a
        replay.
        """
        for table, (checker, values) in self._checkers.items():
            rows = changes.rows[table]
            if rows:
                try:
                    checker.append_rows([values(r) for r in rows.values()])
                finally:
                    checker.clear()

    def finish(self) -> int:
        """Replay only: append every keyed row kept in memory and move the
        checkpoint, in one transaction.

        Returns the number of keyed rows written. Until this ran, a replayed file
        holds its append-only tables and, with the checkpoint of the last flush (0
        if none), the keyed rows up to it: a kill leaves no checkpoint ahead of the
        keyed rows, yet only a finished file may be used.
        """
        if not self.replay:
            return 0
        written = 0
        with self._busy, gc_paused():
            self.con.execute("BEGIN")
            try:
                for table, rows in self._unwritten.items():
                    self._upsert(table, rows)
                    written += len(rows)
                self._move_checkpoint(self.last_seq, datetime.now(UTC).replace(tzinfo=None))
                self.con.execute("DELETE FROM projection_meta WHERE key = ?",
                                 [schema.REPLAY_META_KEY])
                self.con.execute("COMMIT")
            except BaseException:
                self._abort()
                raise
            self._unwritten = {t: {} for t in schema.UPSERTED}
            self.replay = False
            gc.unfreeze()
        return written

    def _abort(self) -> None:
        self._flushing = False
        checkers = (checker for checker, _ in self._checkers.values())
        for appender in (*self._appenders.values(), *self._upserters.values(),
                         *self._staged.values(), *checkers):
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
