"""Export the projection's tables as Parquet: from the file, or through the query service.

The projector holds its database file, so while it runs the export pages every
table through the read-only query service into a local in-memory DuckDB with
the same schema, and writes Parquet from there.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from cflow.errors import LimitExceeded, Unavailable
from cflow.projections import schema
from cflow.projections.store import open_failure

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

PAGE = 5_000


def _copy_all(con: duckdb.DuckDBPyConnection, out_dir: Path) -> dict[str, int]:
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for table in schema.TABLES:
        target = str(out_dir / f"{table}.parquet").replace("'", "''")
        con.execute(f"COPY (SELECT * FROM {table} ORDER BY ALL) TO '{target}' (FORMAT parquet)")
        row = con.execute(f"SELECT count(*) FROM {table}").fetchone()
        counts[table] = int(row[0]) if row else 0
    return counts


def export_file(db_path: Path, out_dir: Path) -> dict[str, int]:
    """Export straight from the database file (blocking).

    Raises:
        Unavailable: a projector holds the file.
        Damaged: DuckDB cannot read the file (``cfctl projections rebuild``).
    """
    try:
        con = duckdb.connect(str(db_path), read_only=True)
    except duckdb.Error as exc:
        raise open_failure(exc, db_path, db_path.exists()) from exc
    try:
        return _copy_all(con, out_dir)
    finally:
        con.close()


def _converter(kind: str) -> Any:
    if kind == "TIMESTAMP":
        return lambda v: None if v is None else datetime.fromisoformat(v)
    if kind == "BLOB":
        return lambda v: None if v is None else bytes.fromhex(v)
    return None


async def export_via_service(nc: NATS, swarm: str, out_dir: Path) -> dict[str, int]:
    """Page every table through the query service and write Parquet locally.

    Raises:
        Unavailable: no projector answers.
        LimitExceeded: a single row is larger than a NATS message.
    """
    import anyio.to_thread

    from cflow.projections.query import QueryClient

    client = QueryClient(nc, swarm)
    local = duckdb.connect(":memory:")
    try:
        checkpoint: int | None = None
        for table in schema.TABLES:
            local.execute(schema.create_table(table))
            converters = [(i, conv) for i, (_, kind) in enumerate(schema.TABLES[table])
                          if (conv := _converter(kind.split()[0])) is not None]
            appender = local.appender(table)
            offset, page = 0, PAGE
            while True:
                try:
                    result = await client.query(
                        f"SELECT {schema.select_list(table)} FROM {table} ORDER BY ALL "
                        f"LIMIT {page} OFFSET {offset}", limit=page, wait_for_seq=checkpoint,
                        timeout_s=60.0)
                except LimitExceeded:
                    if page == 1:
                        raise
                    page = max(1, page // 4)  # the reply was larger than NATS allows
                    continue
                if checkpoint is None:
                    checkpoint = result.checkpoint
                rows = []
                for values in result.rows:
                    for i, conv in converters:
                        values[i] = conv(values[i])
                    rows.append(tuple(values))
                if rows:
                    appender.append_rows(rows)
                    appender.flush()
                offset += len(rows)
                if len(rows) < page:
                    break
        return await anyio.to_thread.run_sync(_copy_all, local, out_dir)
    except duckdb.Error as exc:
        raise Unavailable(f"export failed: {str(exc).splitlines()[0]}") from exc
    finally:
        local.close()


__all__ = ["export_file", "export_via_service"]
