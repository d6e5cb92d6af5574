"""The design cflow replaces: one SQLite file, the claude-flow claim pattern.

Tasks table; a worker selects the best pending task (priority, then age), claims
it with a conditional ``UPDATE ... WHERE id=? AND status='pending'``, checks the
affected rows, and polls every second when there is no work. Two pairs of
settings:

* ``strict``: WAL, ``synchronous=FULL``, select + update inside ``BEGIN IMMEDIATE``;
* ``default``: WAL, ``synchronous=NORMAL``, select and update as two autocommit
  statements (a lost race shows up as 0 affected rows: a CAS conflict).

Workers are separate processes (``python -m bench.sqlite_baseline ...``) started
by :func:`claims_run` / :func:`pickup_run`; they talk JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

BUSY_TIMEOUT_S = 5.0  # Python's and better-sqlite3's default
POLL_S = 1.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'pending',
    created_at REAL NOT NULL,
    claimed_by TEXT,
    claimed_at REAL,
    completed_at REAL,
    result TEXT
);
CREATE INDEX IF NOT EXISTS tasks_pick ON tasks (status, priority DESC, created_at);
"""
SELECT_BEST = ("SELECT id FROM tasks WHERE status = 'pending' "
               "ORDER BY priority DESC, created_at LIMIT 1")
UPDATE_CLAIM = ("UPDATE tasks SET status = 'claimed', claimed_by = ?, claimed_at = ? "
                "WHERE id = ? AND status = 'pending'")
UPDATE_DONE = ("UPDATE tasks SET status = 'completed', completed_at = ?, result = ? "
               "WHERE id = ? AND claimed_by = ?")
CONFLICT = "<conflict>"


def open_db(path: Path, mode: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=" + ("FULL" if mode == "strict" else "NORMAL"))
    return conn


def init_db(path: Path, mode: str, pool: int) -> None:
    conn = open_db(path, mode)
    try:
        conn.executescript(SCHEMA)
        now = time.time()
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO tasks (id, title, priority, created_at) VALUES (?, ?, ?, ?)",
            ((uuid.uuid4().hex, f"task {i}", i % 5, now + i * 1e-6) for i in range(pool)),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def is_busy(exc: sqlite3.OperationalError) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED


def claim_once(conn: sqlite3.Connection, mode: str, agent: str) -> str | None:
    """One claim attempt: a task id, ``CONFLICT`` (lost the race), or None (no work)."""
    if mode == "strict":
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(SELECT_BEST).fetchone()
            if row is None:
                conn.execute("COMMIT")
                return None
            cur = conn.execute(UPDATE_CLAIM, (agent, time.time(), row[0]))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return str(row[0]) if cur.rowcount == 1 else CONFLICT
    row = conn.execute(SELECT_BEST).fetchone()
    if row is None:
        return None
    cur = conn.execute(UPDATE_CLAIM, (agent, time.time(), row[0]))
    return str(row[0]) if cur.rowcount == 1 else CONFLICT


def complete(conn: sqlite3.Connection, task_id: str, agent: str) -> None:
    while True:
        try:
            conn.execute(UPDATE_DONE, (time.time(), "ok", task_id, agent))
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise


class Counts:
    def __init__(self) -> None:
        self.conflicts = 0
        self.locked = 0


def claim(conn: sqlite3.Connection, mode: str, agent: str, counts: Counts) -> str | None:
    """Claim the best task, retrying lost races and "database is locked" at once."""
    while True:
        try:
            got = claim_once(conn, mode, agent)
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
            counts.locked += 1
            continue
        if got == CONFLICT:
            counts.conflicts += 1
            continue
        return got


# ------------------------------------------------------------------ worker processes


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker_claims(db: Path, mode: str, agent: str, duration: float) -> None:
    conn = open_db(db, mode)
    counts = Counts()
    _emit({"ready": True})
    sys.stdin.readline()  # "go"
    lat: list[float] = []
    ids: list[str] = []
    start = time.time()
    deadline = time.perf_counter() + duration
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        got = claim(conn, mode, agent, counts)
        if got is None:
            break  # pool drained; the rate is computed over the time actually used
        lat.append(time.perf_counter() - t0)
        ids.append(got)
        complete(conn, got, agent)
    _emit({"start": start, "end": time.time(), "latencies": lat, "ids": ids,
           "conflicts": counts.conflicts, "locked": counts.locked})
    conn.close()


def worker_pickup(db: Path, mode: str, agent: str, n: int) -> None:
    conn = open_db(db, mode)
    counts = Counts()
    _emit({"ready": True})
    got_n = 0
    while got_n < n:
        got = claim(conn, mode, agent, counts)
        if got is None:
            time.sleep(POLL_S)  # the pattern under test: poll for new work every second
            continue
        _emit({"id": got, "t": time.time()})
        complete(conn, got, agent)
        got_n += 1
    conn.close()


# -------------------------------------------------------------------- orchestration


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bench.sqlite_baseline", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        for stream in (p.stdin, p.stdout):
            if stream is not None:
                stream.close()


def _readline(p: subprocess.Popen[str]) -> dict[str, Any]:
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"sqlite worker exited (rc={p.wait(5)})")
    result: dict[str, Any] = json.loads(line)
    return result


def claims_run(tmp: Path, mode: str, n_procs: int, duration: float, pool: int
               ) -> dict[str, Any]:
    """``n_procs`` processes claim + complete from one file for ``duration`` seconds."""
    db = tmp / f"claims-{mode}-{n_procs}-{uuid.uuid4().hex[:6]}.db"
    init_db(db, mode, pool)
    procs = [_spawn(["claims", str(db), mode, f"w{i}", str(duration)]) for i in range(n_procs)]
    try:
        for p in procs:
            _readline(p)
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [_readline(p) for p in procs]
    finally:
        _stop(procs)
    lat = [x for r in results for x in r["latencies"]]
    ids = Counter(i for r in results for i in r["ids"])
    elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
    conn = open_db(db, mode)
    try:
        drained = conn.execute("SELECT count(*) FROM tasks WHERE status='pending'").fetchone()[0]
    finally:
        conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    return {
        "rate": len(lat) / elapsed if elapsed > 0 else 0.0,
        "latencies": lat,
        "double_claims": sum(c - 1 for c in ids.values() if c > 1),
        "conflicts": sum(r["conflicts"] for r in results),
        "locked": sum(r["locked"] for r in results),
        "pool_left": drained,
    }


def pickup_run(tmp: Path, mode: str, pollers: int, samples_each: int) -> list[float]:
    """Created -> claimed by an idle poller, seconds. Each poller has its own file and
    its own creator thread, so the samples are independent and collected in parallel."""
    dbs = [tmp / f"pickup-{mode}-{i}-{uuid.uuid4().hex[:6]}.db" for i in range(pollers)]
    for db in dbs:
        init_db(db, mode, 0)
    procs = [_spawn(["pickup", str(db), mode, f"p{i}", str(samples_each)])
             for i, db in enumerate(dbs)]
    out: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def create_and_wait(db: Path, p: subprocess.Popen[str], seed: int) -> None:
        rng = random.Random(seed)
        conn = open_db(db, mode)
        try:
            _readline(p)
            for i in range(samples_each):
                time.sleep(rng.uniform(0.1, 1.1))  # a random phase against the poll interval
                t0 = time.time()
                tid = uuid.uuid4().hex
                conn.execute("INSERT INTO tasks (id, title, priority, created_at) "
                             "VALUES (?, ?, 0, ?)", (tid, f"pickup {i}", t0))
                got = _readline(p)
                with lock:
                    out.append(float(got["t"]) - t0)
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=create_and_wait, args=(db, p, i))
               for i, (db, p) in enumerate(zip(dbs, procs, strict=True))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        _stop(procs)
        for db in dbs:
            for suffix in ("", "-wal", "-shm"):
                Path(str(db) + suffix).unlink(missing_ok=True)
    if errors:
        raise errors[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("op", choices=["claims", "pickup"])
    parser.add_argument("db", type=Path)
    parser.add_argument("mode", choices=["strict", "default"])
    parser.add_argument("agent")
    parser.add_argument("arg")
    ns = parser.parse_args()
    if ns.op == "claims":
        worker_claims(ns.db, ns.mode, ns.agent, float(ns.arg))
    else:
        worker_pickup(ns.db, ns.mode, ns.agent, int(ns.arg))


if __name__ == "__main__":
    main()
