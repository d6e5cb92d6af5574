"""The read-only query service: the guard, limits, read-your-writes, the queue group."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cflow import events as ev
from cflow.errors import InvalidInput, LimitExceeded, QueryRejected, Unavailable
from cflow.projections.projector import Projector
from cflow.projections.query import (
    QueryClient,
    QueryService,
    TimeLimits,
    check_read_only,
    run_statement,
)
from cflow.streams import EventLog, connect


@pytest.mark.parametrize("sql", [
    "SELECT 1",
    "select * from tasks where status = 'ready'",
    "WITH x AS (SELECT 1 AS a) SELECT a FROM x",
    "FROM tasks",
    "SELECT 1;",
    "VALUES (1), (2)",
    "SELECT 'read_csv(' AS text, 'it''s glob(x)' AS other",
])
def test_guard_allows_reads(sql: str) -> None:
    assert check_read_only(sql)


@pytest.mark.parametrize(("sql", "why"), [
    ("INSERT INTO tasks (task_id) VALUES ('x')", "INSERT"),
    ("UPDATE tasks SET status = 'ready'", "UPDATE"),
    ("DELETE FROM tasks", "DELETE"),
    ("CREATE TABLE t (a INT)", "CREATE"),
    ("DROP TABLE tasks", "DROP"),
    ("ATTACH '/tmp/x.db' AS x", "ATTACH"),
    ("COPY tasks TO '/tmp/x.csv'", "COPY"),
    ("PRAGMA database_list", "PRAGMA"),
    ("SET threads = 1", "SET"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("EXPORT DATABASE '/tmp/x'", "EXPORT"),
    ("CALL pragma_version()", "CALL"),
    ("SELECT 1; DROP TABLE tasks", "exactly one statement"),
    ("SELECT * FROM read_csv('/etc/passwd')", "read_csv"),
    ("SELECT * FROM read_parquet('x.parquet')", "read_parquet"),
    ("SELECT * FROM read_json_auto('x.json')", "read_json_auto"),
    ("SELECT * FROM glob('/etc/*')", "glob"),
    ("SELECT * FROM \"read_csv\"('/etc/passwd')", "read_csv"),
    ("SELECT 'x', * FROM read_csv('/etc/passwd')", "read_csv"),
    ("SELECT * FROM read_text('/etc/hostname')", "read_text"),
    ("SELECT getenv('HOME')", "getenv"),
    ("", "empty"),
    ("SELEC 1", "cannot parse"),
])
def test_guard_refuses_everything_but_reads(sql: str, why: str) -> None:
    with pytest.raises(QueryRejected, match=why):
        check_read_only(sql)


@pytest.fixture
async def served(log: EventLog, tmp_path: Path) -> AsyncIterator[Projector]:
    projector = Projector(log, tmp_path / "q.duckdb")
    service = QueryService(log.nc, log.swarm, projector, server_id="p1")
    await service.start()
    task = asyncio.create_task(projector.run())
    try:
        yield projector
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await service.stop()
        await projector.close()


@pytest.mark.integration
async def test_read_your_writes_and_row_cap(log: EventLog, served: Projector) -> None:
    client = QueryClient(log.nc, log.swarm)
    last = 0
    for i in range(30):
        last = (await log.append(ev.TaskCreated(title=f"t{i}", priority=i), f"t{i}")).seq
    result = await client.query("SELECT task_id, priority, created_at FROM tasks "
                                "ORDER BY priority DESC", limit=5, wait_for_seq=last)
    assert result.checkpoint >= last
    assert result.truncated
    assert [r[:2] for r in result.rows] == [["t29", 29], ["t28", 28], ["t27", 27],
                                            ["t26", 26], ["t25", 25]]
    assert result.columns == ["task_id", "priority", "created_at"]
    assert result.types[1] == "INTEGER"
    assert isinstance(result.rows[0][2], str)  # timestamps travel as ISO text
    full = await client.query("SELECT count(*) AS n FROM tasks", wait_for_seq=last)
    assert full.dicts() == [{"n": 30}] and not full.truncated
    picked = await client.query("SELECT task_id FROM tasks WHERE priority = ? OR title = $2",
                                params=[3, "t4"])
    assert sorted(r[0] for r in picked.rows) == ["t3", "t4"]


@pytest.mark.integration
async def test_service_refuses_writes_and_file_access(log: EventLog, served: Projector,
                                                      tmp_path: Path) -> None:
    client = QueryClient(log.nc, log.swarm)
    secret = tmp_path / "secret.csv"
    secret.write_text("a,b\n1,2\n")
    with pytest.raises(QueryRejected, match="DELETE"):
        await client.query("DELETE FROM tasks")
    with pytest.raises(QueryRejected, match="read_csv"):
        await client.query(f"SELECT * FROM read_csv('{secret}')")
    # A file path as a table name slips past the function check; the database refuses it.
    with pytest.raises(QueryRejected, match="disabled by configuration"):
        await client.query(f"SELECT * FROM '{secret}'")
    with pytest.raises(InvalidInput, match="no_such_table"):
        await client.query("SELECT * FROM no_such_table")
    # The service is still there and the data untouched.
    assert (await client.query("SELECT count(*) FROM checkpoint")).rows == [[1]]


def test_a_checked_statement_runs_capped_and_a_write_is_refused_before() -> None:
    import duckdb

    con = duckdb.connect(":memory:")
    con.execute("CREATE TABLE t (x INTEGER)")
    con.execute("INSERT INTO t VALUES (1), (2), (3)")
    cursor = con.cursor()
    assert run_statement(cursor, check_read_only("SELECT x FROM t ORDER BY x"), limit=2,
                         timeout_s=5) == (["x"], ["INTEGER"], [(1,), (2,)], True)
    with pytest.raises(QueryRejected):
        check_read_only("DELETE FROM t")
    assert con.execute("SELECT count(*) FROM t").fetchone() == (3,)


def test_a_query_whose_first_interrupt_came_too_early_is_still_cut() -> None:
    """DuckDB drops an interrupt that arrives before its statement starts (a query
    thread late to start under load): the limit holds because the query is
    interrupted again until it is disarmed, and the cursor works afterwards."""
    import duckdb

    con = duckdb.connect(":memory:")
    con.execute("SET enable_progress_bar = false")
    cursor = con.cursor()
    interrupted = threading.Event()

    class Watched:  # the real cursor, telling the test when it was interrupted
        def interrupt(self) -> None:
            cursor.interrupt()
            interrupted.set()

    limits = TimeLimits()
    cursor.execute("BEGIN TRANSACTION READ ONLY")
    token = limits.arm(Watched(), 0.0)
    assert interrupted.wait(10)  # delivered while no statement ran: dropped by DuckDB
    try:
        with pytest.raises(duckdb.InterruptException):  # ~6 s when nothing cuts it
            cursor.execute("SELECT sum(range) FROM range(3000000000)").fetchall()
    finally:
        limits.disarm(token)
    cursor.execute("ROLLBACK")
    assert cursor.execute("SELECT 42").fetchall() == [(42,)]
    con.close()


@pytest.mark.integration
async def test_long_query_is_cut_at_its_time_limit(log: EventLog, served: Projector) -> None:
    client = QueryClient(log.nc, log.swarm)
    slow = ("SELECT count(*) FROM range(100000000) a, range(100000000) b "
            "WHERE a.range * 7 + b.range = 3")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(LimitExceeded, match=r"time limit of 0\.5 s"):
        await client.query(slow, timeout_s=0.5)
    assert loop.time() - started < 5
    assert (await client.query("SELECT 42")).rows == [[42]]


@pytest.mark.integration
async def test_wait_for_a_sequence_never_reached(log: EventLog, served: Projector) -> None:
    with pytest.raises(LimitExceeded, match="did not reach 999999"):
        await QueryClient(log.nc, log.swarm).query("SELECT 1", wait_for_seq=999_999,
                                                   timeout_s=0.3)


@pytest.mark.integration
async def test_no_projector_is_unavailable(log: EventLog) -> None:
    with pytest.raises(Unavailable, match="no projector"):
        await QueryClient(log.nc, log.swarm).query("SELECT 1", timeout_s=0.5)


@pytest.mark.integration
async def test_a_read_your_writes_query_waits_out_a_moment_without_projector(
        log: EventLog, nats_url: str, tmp_path: Path) -> None:
    """A projector subscribing just after the request (reconnecting, or its interest
    still reaching the other servers of a cluster) answers a wait_for_seq query."""
    seq = (await log.append(ev.TaskCreated(title="x"), "x")).seq
    projector = Projector(log, tmp_path / "late.duckdb")
    await projector.open()
    service = QueryService(log.nc, log.swarm, projector, server_id="late")
    asker = await connect(nats_url)  # its own connection: its stats count this query only
    sent = asker.stats["out_msgs"]
    query = asyncio.create_task(QueryClient(asker, log.swarm).query(
        "SELECT count(*) FROM tasks", wait_for_seq=seq))
    run = None
    try:
        while asker.stats["out_msgs"] == sent:  # the first request is on its way
            await asyncio.sleep(0)
        await asker.flush()  # the server has handled it: nobody was subscribed yet
        await service.start()
        run = asyncio.create_task(projector.run())
        result = await query
        assert result.rows == [[1]] and result.server == "late"
    finally:
        for task in (query, run):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await service.stop()
        await projector.close()
        await asker.close()
    with pytest.raises(Unavailable, match="no projector"):
        await QueryClient(log.nc, log.swarm).query("SELECT 1", wait_for_seq=seq)


@pytest.mark.integration
async def test_two_projectors_in_one_queue_group_both_serve(log: EventLog,
                                                           tmp_path: Path) -> None:
    runs = []
    services = []
    try:
        for name in ("p1", "p2"):
            projector = Projector(log, tmp_path / f"{name}.duckdb")
            service = QueryService(log.nc, log.swarm, projector, server_id=name)
            await service.start()
            services.append((projector, service))
            runs.append(asyncio.create_task(projector.run()))
        seq = (await log.append(ev.TaskCreated(title="x"), "x")).seq
        client = QueryClient(log.nc, log.swarm)
        results = await asyncio.gather(*[
            client.query("SELECT count(*) FROM tasks", wait_for_seq=seq) for _ in range(40)])
        assert {r.server for r in results} == {"p1", "p2"}
        assert {r.rows[0][0] for r in results} == {1}
        assert all(s.served > 0 for _, s in services)
    finally:
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        for projector, service in services:
            await service.stop()
            await projector.close()


@pytest.mark.e2e
def test_cfctl_query_report_and_export(cli_env: dict[str, str], tmp_path: Path) -> None:
    db = tmp_path / "cli.duckdb"
    proc = subprocess.Popen([sys.executable, "-m", "cflow.projections", "--db", str(db)],
                            env=cli_env, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith(b"projector ready")
        cfctl = [sys.executable, "-c", "from cflow.cli import main; main()"]
        out = subprocess.run([*cfctl, "query", "SELECT 1 AS one, 'x' AS s", "--csv"],
                             env=cli_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["one,s", "1,x"]
        out = subprocess.run([*cfctl, "query", "SELECT 2 AS two", "--json"],
                             env=cli_env, capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == '[{"two": 2}]'
        out = subprocess.run([*cfctl, "query", "DROP TABLE tasks"],
                             env=cli_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        assert out.stderr.startswith("error: only reads are allowed")
        out = subprocess.run([*cfctl, "report", "failures"],
                             env=cli_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "top errors" in out.stdout
        out = subprocess.run([*cfctl, "report", "timeline", "no-such-task"],
                             env=cli_env, capture_output=True, text=True, timeout=60)
        assert (out.returncode, out.stderr) == (5, "error: task not found: no-such-task\n")
        task = subprocess.run([*cfctl, "task", "add", "timed"], env=cli_env,
                              capture_output=True, text=True, timeout=60).stdout.strip()
        out = subprocess.run([*cfctl, "--json", "task", "show", task], env=cli_env,
                             capture_output=True, text=True, timeout=60)
        last = max(e["seq"] for e in json.loads(out.stdout)["timeline"])
        out = subprocess.run([*cfctl, "query", "SELECT 1", "--wait-for", str(last)],
                             env=cli_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        out = subprocess.run([*cfctl, "report", "timeline", task[:13]],  # a unique prefix
                             env=cli_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"timeline of {task}" in out.stdout and "TaskCreated" in out.stdout
        out = subprocess.run([*cfctl, "report", "timeline", "x' OR 1=1 --"],
                             env=cli_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "task id" in out.stderr
        out = subprocess.run([*cfctl, "export", "--parquet", str(tmp_path / "pq")],
                             env={**cli_env, "XDG_DATA_HOME": str(tmp_path / "none")},
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "pq" / "tasks.parquet").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.e2e
def test_cfctl_report_timeline_reads_as_text_in_80_columns(cli_env: dict[str, str],
                                                             tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "cflow.projections",
                             "--db", str(tmp_path / "cli.duckdb")],
                            env=cli_env, stderr=subprocess.PIPE)

    def cfctl(*args: str) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([sys.executable, "-c", "from cflow.cli import main; main()",
                              *args], env=cli_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out

    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith(b"projector ready")
        task = cfctl("task", "add", "timeline " + "long title " * 20, "--body",
                     "a body " * 30).stdout.strip()
        epoch = cfctl("task", "claim", task, "--agent", "worker-1").stdout.split()[1]
        cfctl("task", "note", task, "halfway " * 20, "--agent", "worker-1")
        cfctl("task", "complete", task, "--epoch", epoch, "--agent", "worker-1")
        shown = json.loads(cfctl("--json", "task", "show", task).stdout)
        last = max(e["seq"] for e in shown["timeline"])
        cfctl("query", "SELECT 1", "--wait-for", str(last))

        lines = cfctl("report", "timeline", task).stdout.splitlines()
        assert lines[0] == f"timeline of {task}"
        assert all(len(line) <= 80 for line in lines), "\n".join(lines)
        text = "\n".join(lines)
        for word in ("False", "None", "null", "{"):
            assert word not in text, text
        for kind in ("TaskCreated", "TaskClaimed", "TaskNoted", "TaskCompleted"):
            assert kind in text
        assert "worker-1" in text and "title=timeline long title" in text and "…" in text

        report = json.loads(cfctl("--json", "report", "timeline", task).stdout)
        rows = report[f"timeline of {task}"]
        assert [r["type"] for r in rows] == ["TaskCreated", "TaskClaimed", "TaskNoted",
                                             "TaskCompleted"]
        assert all(list(r) == ["seq", "ts", "type", "actor", "hlc", "refused", "data"]
                   for r in rows)
        assert {r["refused"] for r in rows} == {False}
        assert [line.split()[2:4] for line in lines[2:]] == [[r["type"], r["actor"]]
                                                             for r in rows]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if proc.stderr is not None:
            proc.stderr.close()


def test_timeline_marks_a_refused_event_and_never_shows_false(
        capsys: pytest.CaptureFixture[str]) -> None:
    from cflow.cli.projection_cmds import _timeline
    from cflow.projections.query import QueryResult

    hlc = "01a23a8b04940000cd2c220f812c765a"
    _timeline(QueryResult(["hlc", "type", "actor", "refused", "data"], [], [
        [hlc, "TaskClaimed", "a1", False, '{"owner": "a1", "deadline_ms": null}'],
        [hlc, "TaskCompleted", "a2", True, '{"epoch": 1, "result": null}'],
    ], truncated=False, checkpoint=2), "timeline of t1")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2:] for line in lines[2:]] == [
        ["TaskClaimed", "a1", "owner=a1"], ["TaskCompleted", "a2", "refused", "epoch=1"]]
