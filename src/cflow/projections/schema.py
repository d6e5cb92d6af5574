"""The DuckDB schema of a projection: tables, their column order, analytics views (pure).

Table and column names are a public contract: any DuckDB client (or the query
service) may read them. Times are ``TIMESTAMP`` in UTC (no time zone attached),
taken from the event's HLC wall time, never from the projector's clock, so a
rebuild produces the same values. Only ``quarantine.seen_at`` and
``checkpoint.updated_at`` are the projector's wall clock.

Tables:

* ``events``: the raw log, one row per decoded event, for audit.
* ``tasks`` (+ ``task_deps``, ``task_attempts``, ``task_notes``): the state of
  every task as :func:`cflow.tasks.apply` folds it; one ``task_attempts`` row
  per claim (epoch), closed by its completion, failure, release, expiry or
  cancellation.
* ``agents``, ``memory``, ``messages``, ``reservations``, ``control``.
* ``quarantine``: messages that did not decode, were too large, or whose fold
  was refused; the projector records them and goes on.
* ``checkpoint``: the last stream sequence applied, committed with the rows.
  A view (see :data:`CHECKPOINT_VIEW`): every applied event leaves a row in
  ``events`` or ``quarantine`` in its batch's transaction, so the position is
  their largest ``seq``. The row behind it (``projection_checkpoint``) is what a
  rebuild moves with its keyed rows (it writes them later than its events); a
  live projector rewrites it now and then, for ``updated_at``.
"""

from __future__ import annotations

PROJECTION = "main"
# Bumped whenever a table changes shape; a file of another version is refused
# (``cfctl projections rebuild`` makes a fresh one: projections are disposable).
SCHEMA_VERSION = 1
META_DDL = "CREATE TABLE IF NOT EXISTS projection_meta (key VARCHAR PRIMARY KEY, value VARCHAR)"

# Column order of each table is the order of the tuples the projector appends.
TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "events": (
        ("seq", "BIGINT PRIMARY KEY"),
        ("id", "VARCHAR"),
        ("type", "VARCHAR"),
        ("v", "INTEGER"),
        ("swarm", "VARCHAR"),
        ("entity_kind", "VARCHAR"),
        ("entity_id", "VARCHAR"),
        ("actor", "VARCHAR"),
        ("hlc", "VARCHAR"),
        ("ts", "TIMESTAMP"),
        ("causation_id", "VARCHAR"),
        ("correlation_id", "VARCHAR"),
        ("data", "JSON"),
    ),
    "tasks": (
        ("task_id", "VARCHAR"),
        ("title", "VARCHAR"),
        ("body", "VARCHAR"),
        ("status", "VARCHAR"),
        ("kind", "VARCHAR"),
        ("priority", "INTEGER"),
        ("capabilities", "VARCHAR[]"),
        ("labels", "JSON"),  # {"key": "value"}; labels->>'key'
        ("parent_id", "VARCHAR"),
        ("depends_on", "VARCHAR[]"),
        ("owner", "VARCHAR"),
        ("epoch", "BIGINT"),
        ("attempt", "INTEGER"),
        ("max_attempts", "INTEGER"),
        ("lease_ttl_s", "DOUBLE"),
        ("backoff_initial_s", "DOUBLE"),
        ("backoff_multiplier", "DOUBLE"),
        ("backoff_max_s", "DOUBLE"),
        ("start_to_close_s", "DOUBLE"),
        ("idempotency_key", "VARCHAR"),
        ("depth", "INTEGER"),
        ("created_by", "VARCHAR"),
        ("created_seq", "BIGINT"),
        ("created_at", "TIMESTAMP"),
        ("ready_at", "TIMESTAMP"),
        ("claimed_at", "TIMESTAMP"),
        ("deadline_at", "TIMESTAMP"),
        ("completed_at", "TIMESTAMP"),
        ("finished_at", "TIMESTAMP"),
        ("not_before", "TIMESTAMP"),
        ("result", "VARCHAR"),
        ("error", "VARCHAR"),
        ("reason", "VARCHAR"),
        ("cost_usd", "DOUBLE"),
        ("reclaims", "INTEGER"),
        ("failures", "INTEGER"),
        ("events", "INTEGER"),
        ("last_seq", "BIGINT"),
    ),
    "task_deps": (
        ("task_id", "VARCHAR"),
        ("depends_on", "VARCHAR"),
    ),
    "task_attempts": (
        ("task_id", "VARCHAR"),
        ("epoch", "BIGINT"),
        ("attempt", "INTEGER"),
        ("owner", "VARCHAR"),
        ("ready_at", "TIMESTAMP"),
        ("claimed_at", "TIMESTAMP"),
        ("ended_at", "TIMESTAMP"),
        ("outcome", "VARCHAR"),  # running, completed, failed, released, expired, cancelled
        ("error", "VARCHAR"),
        ("cost_usd", "DOUBLE"),
    ),
    "task_notes": (
        ("seq", "BIGINT"),
        ("task_id", "VARCHAR"),
        ("epoch", "BIGINT"),
        ("actor", "VARCHAR"),
        ("ts", "TIMESTAMP"),
        ("text", "VARCHAR"),
        ("paths", "VARCHAR[]"),
        ("artifact", "VARCHAR"),
    ),
    "agents": (
        ("agent_id", "VARCHAR"),
        ("name", "VARCHAR"),
        ("capabilities", "VARCHAR[]"),
        ("labels", "JSON"),  # {"key": "value"}; labels->>'key'
        ("host", "VARCHAR"),
        ("pid", "BIGINT"),
        ("runtime", "VARCHAR"),
        ("status", "VARCHAR"),
        ("registered", "BOOLEAN"),
        ("first_seen", "TIMESTAMP"),
        ("last_seen", "TIMESTAMP"),
        ("current_task", "VARCHAR"),
        ("tasks_claimed", "INTEGER"),
        ("tasks_completed", "INTEGER"),
        ("tasks_failed", "INTEGER"),
        ("cost_usd", "DOUBLE"),
    ),
    "memory": (
        ("namespace", "VARCHAR"),
        ("key", "VARCHAR"),
        ("value", "VARCHAR"),
        ("content_type", "VARCHAR"),
        ("tags", "VARCHAR[]"),
        ("version", "BIGINT"),
        ("updated_at", "TIMESTAMP"),
        ("expires_at", "TIMESTAMP"),
        ("updated_by", "VARCHAR"),
        ("deleted", "BOOLEAN"),
        ("metadata", "JSON"),
        ("last_seq", "BIGINT"),
    ),
    "messages": (
        ("id", "VARCHAR"),
        ("sender", "VARCHAR"),
        ("to", "VARCHAR"),
        ("topic", "VARCHAR"),
        ("text", "VARCHAR"),
        ("thread_id", "VARCHAR"),
        ("reply_to", "VARCHAR"),
        ("importance", "VARCHAR"),
        ("ack_required", "BOOLEAN"),
        ("sent_at", "TIMESTAMP"),
        ("acked_at", "TIMESTAMP"),
        ("acked_by", "VARCHAR"),
    ),
    "reservations": (
        ("reservation_id", "VARCHAR"),
        ("owner", "VARCHAR"),
        ("paths", "VARCHAR[]"),
        ("exclusive", "BOOLEAN"),
        ("task_id", "VARCHAR"),
        ("epoch", "BIGINT"),
        ("reserved_at", "TIMESTAMP"),
        ("expires_at", "TIMESTAMP"),
        ("released_at", "TIMESTAMP"),
        ("status", "VARCHAR"),  # held, released
    ),
    "control": (
        ("scope", "VARCHAR"),
        ("paused", "BOOLEAN"),
        ("stopped", "BOOLEAN"),
        ("reason", "VARCHAR"),
        ("limits", "JSON"),
        ("budget_exceeded", "VARCHAR"),
        ("breaker_open", "BOOLEAN"),
        ("breaker_failures", "INTEGER"),
        ("cool_down_s", "DOUBLE"),
        ("updated_at", "TIMESTAMP"),
        ("updated_by", "VARCHAR"),
    ),
    "quarantine": (
        ("seq", "BIGINT PRIMARY KEY"),
        ("subject", "VARCHAR"),
        ("raw", "BLOB"),
        ("error", "VARCHAR"),
        ("seen_at", "TIMESTAMP"),
    ),
    "checkpoint": (
        ("projection", "VARCHAR PRIMARY KEY"),
        ("last_seq", "BIGINT"),
        ("updated_at", "TIMESTAMP"),
    ),
}

# The key of every table the projector rewrites row by row. These tables have no
# PRIMARY KEY constraint on purpose: DuckDB's upsert costs several milliseconds
# per statement, so a batch deletes the keys it touches and appends their new
# rows (both set-at-a-time) instead. ``events`` and ``quarantine`` keep theirs:
# a sequence applied twice fails the batch instead of silently doubling.
# Each key has a plain index (ddl(); a file made before it gets it when opened):
# without one a point lookup or a batch's delete scans the whole table (on 84k
# tasks: a lookup 1.5 ms instead of 0.4, a 10-key delete 3.7-4.7 ms instead of
# 1.1); it costs bulk ingest about 6% (5,000-event batches, 56k tasks).
KEYS: dict[str, tuple[str, ...]] = {
    "tasks": ("task_id",),
    "task_attempts": ("task_id", "epoch"),
    "agents": ("agent_id",),
    "memory": ("namespace", "key"),
    "messages": ("id",),
    "reservations": ("reservation_id",),
    "control": ("scope",),
}

# Tables that only ever grow (plain appends) vs. tables written by upsert.
APPEND_ONLY = ("events", "task_deps", "task_notes", "quarantine")
UPSERTED = ("tasks", "task_attempts", "agents", "memory", "messages", "reservations",
            "control")

# Tables compared when checking a rebuild against an incremental build; the
# columns that carry the projector's own wall clock are left out.
WALL_CLOCK_COLUMNS = {"quarantine": ("seen_at",), "checkpoint": ("updated_at",)}

# ``checkpoint`` (in TABLES: the shape readers see) is a view over this table. A
# live projector rewrites the row only now and then (``store.CHECKPOINT_ROW_INTERVAL_S``;
# ``updated_at`` is when it last applied a batch, to within that), not in every
# batch. A replay moves the row with its keyed rows, and marks the file with
# REPLAY_META_KEY until it finishes: while marked, the view reads the row alone.
STORED_CHECKPOINT = "projection_checkpoint"
REPLAY_META_KEY = "replay_unfinished"
CHECKPOINT_VIEW = f"""
    SELECT c.projection,
           CASE WHEN EXISTS (SELECT 1 FROM projection_meta WHERE key = '{REPLAY_META_KEY}')
                THEN c.last_seq
                ELSE greatest(c.last_seq, (SELECT coalesce(max(seq), 0) FROM events),
                              (SELECT coalesce(max(seq), 0) FROM quarantine))
           END AS last_seq,
           c.updated_at
    FROM {STORED_CHECKPOINT} c
"""


COLUMNS: dict[str, tuple[str, ...]] = {
    table: tuple(name for name, _ in cols) for table, cols in TABLES.items()
}


def columns(table: str) -> tuple[str, ...]:
    return COLUMNS[table]


def _quote(name: str) -> str:
    return f'"{name}"'


def create_table(table: str, name: str | None = None) -> str:
    """``CREATE TABLE`` with ``table``'s columns (named ``name`` if given)."""
    cols = [f"{_quote(col)} {kind}" for col, kind in TABLES[table]]
    return f"CREATE TABLE IF NOT EXISTS {name or table} ({', '.join(cols)})"


def select_list(table: str) -> str:
    return ", ".join(_quote(c) for c in columns(table))


# ------------------------------------------------------------------ analytics
# Percentiles use quantile_cont (linear interpolation between the two nearest
# ranks). Durations are seconds. "Horizon" is the time of the last event
# projected, never the wall clock, so a view reads the same after a rebuild.

VIEWS: dict[str, str] = {
    "horizon": """
        SELECT coalesce(max(ts), TIMESTAMP '1970-01-01') AS last_event_at FROM events
    """,
    "ready_tasks": """
        SELECT * FROM tasks WHERE status = 'ready' AND kind = 'task'
        ORDER BY priority DESC, created_seq
    """,
    "throughput_hourly": """
        SELECT date_trunc('hour', ts) AS hour,
               count(*) FILTER (WHERE type = 'TaskCreated') AS created,
               count(*) FILTER (WHERE type = 'TaskClaimed') AS claimed,
               count(*) FILTER (WHERE type = 'TaskCompleted') AS completed,
               count(*) FILTER (WHERE type = 'TaskFailed' AND (data->>'final')::BOOLEAN)
                   AS failed,
               count(*) FILTER (WHERE type = 'TaskLeaseExpired') AS expired
        FROM events WHERE entity_kind = 'task'
          AND seq NOT IN (SELECT seq FROM quarantine)  -- refused by the fold
        GROUP BY ALL ORDER BY hour
    """,
    "throughput_agent": """
        SELECT owner AS agent_id,
               count(*) AS attempts,
               count(*) FILTER (WHERE outcome = 'completed') AS completed,
               count(*) FILTER (WHERE outcome = 'failed') AS failed,
               count(*) FILTER (WHERE outcome = 'expired') AS expired,
               count(*) FILTER (WHERE outcome = 'released') AS released
        FROM task_attempts GROUP BY owner ORDER BY completed DESC, agent_id
    """,
    "throughput_agent_hourly": """
        SELECT date_trunc('hour', ended_at) AS hour, owner AS agent_id,
               count(*) FILTER (WHERE outcome = 'completed') AS completed,
               count(*) FILTER (WHERE outcome = 'failed') AS failed
        FROM task_attempts WHERE ended_at IS NOT NULL
        GROUP BY ALL ORDER BY hour, agent_id
    """,
    "task_dimensions": """
        SELECT task_id, 'all' AS dimension, '*' AS value FROM tasks
        UNION ALL
        SELECT task_id, 'capability', unnest(capabilities) FROM tasks
        UNION ALL
        SELECT task_id, 'label', k || '=' || (labels->>k)
        FROM (SELECT task_id, labels, unnest(json_keys(labels)) AS k FROM tasks)
    """,
    "latency_samples": """
        SELECT task_id, 'cycle' AS metric,
               epoch_ms(completed_at) / 1000.0 - epoch_ms(created_at) / 1000.0 AS seconds
        FROM tasks WHERE status = 'completed' AND completed_at IS NOT NULL
        UNION ALL
        SELECT task_id, 'wait',
               epoch_ms(claimed_at) / 1000.0 - epoch_ms(ready_at) / 1000.0
        FROM task_attempts WHERE ready_at IS NOT NULL
    """,
    "latency_stats": """
        SELECT d.dimension, d.value, s.metric, count(*) AS n,
               quantile_cont(s.seconds, 0.5) AS p50_s,
               quantile_cont(s.seconds, 0.95) AS p95_s,
               avg(s.seconds) AS avg_s, max(s.seconds) AS max_s
        FROM latency_samples s JOIN task_dimensions d USING (task_id)
        GROUP BY ALL ORDER BY d.dimension, d.value, s.metric
    """,
    "cycle_time": """
        SELECT dimension, value, n, p50_s, p95_s, avg_s, max_s
        FROM latency_stats WHERE metric = 'cycle'
    """,
    "wait_time": """
        SELECT dimension, value, n, p50_s, p95_s, avg_s, max_s
        FROM latency_stats WHERE metric = 'wait'
    """,
    "attempt_stats": """
        SELECT (SELECT count(*) FROM tasks WHERE kind = 'task') AS tasks,
               count(*) AS attempts,
               count(*) / nullif(count(DISTINCT task_id), 0) AS attempts_per_claimed_task,
               count(*) FILTER (WHERE outcome = 'expired') AS reclaims,
               count(*) FILTER (WHERE outcome = 'expired') / nullif(count(*), 0)
                   AS reclaim_rate,
               count(*) FILTER (WHERE outcome = 'released') AS releases,
               (SELECT max(attempt) FROM tasks) AS max_attempt
        FROM task_attempts
    """,
    "failure_stats": """
        SELECT count(*) FILTER (WHERE outcome = 'failed') AS failed_attempts,
               count(*) FILTER (WHERE outcome <> 'running') AS ended_attempts,
               count(*) FILTER (WHERE outcome = 'failed')
                   / nullif(count(*) FILTER (WHERE outcome <> 'running'), 0)
                   AS attempt_failure_rate,
               (SELECT count(*) FROM tasks WHERE status = 'failed') AS failed_tasks,
               (SELECT count(*) FROM tasks WHERE status IN ('completed', 'failed', 'cancelled'))
                   AS finished_tasks,
               (SELECT count(*) FROM tasks WHERE status = 'failed')
                   / nullif((SELECT count(*) FROM tasks
                             WHERE status IN ('completed', 'failed', 'cancelled')), 0)
                   AS task_failure_rate
        FROM task_attempts
    """,
    "top_errors": """
        SELECT error, count(*) AS occurrences, count(DISTINCT task_id) AS tasks,
               max(ended_at) AS last_seen
        FROM task_attempts WHERE outcome = 'failed'
        GROUP BY error ORDER BY occurrences DESC, error
    """,
    "agent_utilisation": """
        WITH spans AS (
            SELECT owner, claimed_at,
                   coalesce(ended_at, (SELECT last_event_at FROM horizon)) AS ends,
                   outcome, cost_usd
            FROM task_attempts
        )
        SELECT owner AS agent_id, count(*) AS attempts,
               count(*) FILTER (WHERE outcome = 'completed') AS completed,
               count(*) FILTER (WHERE outcome = 'failed') AS failed,
               count(*) FILTER (WHERE outcome = 'running') AS running,
               sum(epoch_ms(ends) - epoch_ms(claimed_at)) / 1000.0 AS busy_s,
               (epoch_ms(max(ends)) - epoch_ms(min(claimed_at))) / 1000.0 AS window_s,
               sum(epoch_ms(ends) - epoch_ms(claimed_at))
                   / nullif(epoch_ms(max(ends)) - epoch_ms(min(claimed_at)), 0)
                   AS utilisation,
               sum(cost_usd) AS cost_usd
        FROM spans GROUP BY owner ORDER BY agent_id
    """,
    # Longest chain of unfinished tasks through their unfinished dependencies:
    # level = longest distance from a root (UNION keeps the row set polynomial),
    # then walk back from the deepest task through a dependency one level up.
    "critical_path": """
        WITH RECURSIVE
        remaining AS (
            SELECT task_id, title, status FROM tasks
            WHERE status NOT IN ('completed', 'cancelled', 'failed')
        ),
        edges AS (
            SELECT d.task_id, d.depends_on FROM task_deps d
            JOIN remaining a ON a.task_id = d.task_id
            JOIN remaining b ON b.task_id = d.depends_on
        ),
        levels(task_id, level) AS (
            SELECT task_id, 1 FROM remaining r
            WHERE NOT EXISTS (SELECT 1 FROM edges e WHERE e.task_id = r.task_id)
            UNION
            SELECT e.task_id, l.level + 1 FROM levels l JOIN edges e ON e.depends_on = l.task_id
            WHERE l.level < (SELECT count(*) FROM remaining)
        ),
        best AS (SELECT task_id, max(level) AS level FROM levels GROUP BY task_id),
        walk(task_id, level) AS (
            SELECT * FROM (SELECT task_id, level FROM best
                           ORDER BY level DESC, task_id LIMIT 1)
            UNION ALL
            SELECT (SELECT min(e.depends_on) FROM edges e JOIN best b
                        ON b.task_id = e.depends_on
                    WHERE e.task_id = w.task_id AND b.level = w.level - 1),
                   w.level - 1
            FROM walk w WHERE w.level > 1
        )
        SELECT w.level AS position, w.task_id, r.title, r.status,
               (SELECT max(level) FROM best) AS length
        FROM walk w JOIN remaining r USING (task_id)
        ORDER BY position
    """,
    "task_timeline": """
        SELECT CASE WHEN entity_kind = 'task' THEN entity_id
                    ELSE data->>'task_id' END AS task_id,
               seq, ts, hlc, type, actor, data,
               seq IN (SELECT seq FROM quarantine) AS refused  -- by the task state machine
        FROM events
        WHERE entity_kind = 'task' OR type = 'TaskNoted'
           OR (type = 'AgentStatusChanged' AND data->>'task_id' IS NOT NULL)
        ORDER BY seq
    """,
}


def create_view(name: str) -> str:
    return f"CREATE OR REPLACE VIEW {name} AS {VIEWS[name].strip()}"


def create_key_index(table: str) -> str:
    """An index (not a constraint) on a keyed table's key."""
    cols = ", ".join(_quote(c) for c in KEYS[table])
    return f"CREATE INDEX IF NOT EXISTS {table}_key ON {table} ({cols})"


def ddl() -> list[str]:
    """Every statement that creates the schema, idempotently, in order."""
    out = [META_DDL]  # the checkpoint view reads it
    out += [create_table(t) for t in TABLES if t != "checkpoint"]
    out.append(create_table("checkpoint", STORED_CHECKPOINT))
    out.append(f"CREATE OR REPLACE VIEW checkpoint AS {CHECKPOINT_VIEW.strip()}")
    out += [create_key_index(t) for t in KEYS]
    out += [create_view(v) for v in VIEWS]
    return out


__all__ = [
    "APPEND_ONLY",
    "CHECKPOINT_VIEW",
    "COLUMNS",
    "KEYS",
    "META_DDL",
    "PROJECTION",
    "REPLAY_META_KEY",
    "SCHEMA_VERSION",
    "STORED_CHECKPOINT",
    "TABLES",
    "UPSERTED",
    "VIEWS",
    "WALL_CLOCK_COLUMNS",
    "columns",
    "create_table",
    "create_view",
    "ddl",
    "select_list",
]
