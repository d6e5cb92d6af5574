"""Import from claude-flow SQLite files built here with the documented column sets."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cflow.errors import InvalidInput, NotFound
from cflow.importer import TaskRow, epoch_seconds, read_source, task_order, token_for
from cflow.leases import task_id_for_key
from cflow.swarm import Swarm

NOW = time.time()


def build_claude_flow(root: Path) -> None:
    (root / ".swarm").mkdir(parents=True)
    (root / ".hive-mind").mkdir()
    mem = sqlite3.connect(root / ".swarm" / "memory.db")
    mem.execute("""CREATE TABLE memory_entries (
        id INTEGER PRIMARY KEY, key TEXT NOT NULL, value TEXT NOT NULL,
        namespace TEXT DEFAULT 'default', metadata TEXT, created_at INTEGER,
        updated_at INTEGER, accessed_at INTEGER, access_count INTEGER DEFAULT 0,
        ttl INTEGER, expires_at INTEGER, UNIQUE(key, namespace))""")
    t = int(NOW)
    mem.executemany(
        "INSERT INTO memory_entries (id, key, value, namespace, metadata, created_at, "
        "updated_at, accessed_at, access_count, ttl, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        [
            (1, "api/design", "REST with cursor pagination", "default",
             json.dumps({"tags": ["api", "design"]}), t - 100, t - 50, t - 10, 3, None, None),
            (2, "config", json.dumps({"retries": 3}), "project", None, t - 100, t - 100,
             None, 0, None, None),
            (3, "stale", "gone already", "default", None, t - 1000, t - 1000, None, 0, 60,
             t - 900),
            (4, "soon", "expires later", "default", "not json", t, t, None, 0, 3600, t + 3600),
        ])
    mem.commit()
    mem.close()
    hive = sqlite3.connect(root / ".hive-mind" / "hive.db")
    hive.executescript("""
        CREATE TABLE swarms (id TEXT PRIMARY KEY, name TEXT, objective TEXT, status TEXT,
            created_at DATETIME DEFAULT CURRENT_TIMESTAMP);
        CREATE TABLE agents (id TEXT PRIMARY KEY, swarm_id TEXT, name TEXT NOT NULL,
            type TEXT, status TEXT DEFAULT 'idle', capabilities TEXT,
            created_at DATETIME DEFAULT CURRENT_TIMESTAMP);
        CREATE TABLE tasks (id TEXT PRIMARY KEY, swarm_id TEXT, description TEXT,
            priority TEXT DEFAULT 'medium', status TEXT DEFAULT 'pending', result TEXT,
            error TEXT, dependencies TEXT, required_capabilities TEXT,
            created_at DATETIME DEFAULT CURRENT_TIMESTAMP, completed_at DATETIME);
        CREATE TABLE memory (key TEXT, namespace TEXT, value TEXT, ttl INTEGER,
            expires_at DATETIME, metadata TEXT, PRIMARY KEY (key, namespace));
    """)
    hive.execute("INSERT INTO swarms (id, name) VALUES ('swarm-1', 'build the app')")
    hive.executemany(
        "INSERT INTO agents (id, swarm_id, name, type, status, capabilities) VALUES (?,?,?,?,?,?)",
        [("agent-1", "swarm-1", "Queen Coordinator", "coordinator", "active",
          json.dumps(["planning"])),
         ("agent-2", "swarm-1", "coder-1", "coder", "idle", json.dumps(["python", "tests"]))])
    hive.executemany(
        "INSERT INTO tasks (id, swarm_id, description, priority, status, result, error, "
        "dependencies, required_capabilities, completed_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
        [
            ("t-design", "swarm-1", "Design the API\nwith details", "high", "completed",
             "spec.md written", None, "[]", "[]", "2025-01-01 10:00:00"),
            ("t-impl", "swarm-1", "Implement the API", "critical", "completed", "done", None,
             json.dumps(["t-design"]), json.dumps(["python"]), "2025-01-02 10:00:00"),
            ("t-tests", "swarm-1", "Write tests", "medium", "in_progress", None, None,
             json.dumps(["t-impl", "t-missing"]), json.dumps(["tests"]), None),
            ("t-docs", "swarm-1", "Write docs", "low", "failed", None, "writer crashed",
             json.dumps(["t-design"]), "[]", None),
            ("t-later", "swarm-1", "Maybe later", "low", "cancelled", None, None, "[]", "[]",
             None),
            ("t-blocked", "swarm-1", "After docs", "medium", "pending", None, None,
             json.dumps(["t-docs"]), "[]", None),
            ("t-hotfix", "swarm-1", "Hotfix", "high", "completed", "patched", None,
             json.dumps(["t-tests"]), "[]", None),
        ])
    hive.executemany(
        "INSERT INTO memory (key, namespace, value, ttl, expires_at, metadata) "
        "VALUES (?,?,?,?,?,?)",
        [("decision", "consensus", "use postgres", None, None, None),
         ("old", "consensus", "expired", 10, "2000-01-01 00:00:00", None)])
    hive.commit()
    hive.close()


# ------------------------------------------------------------------------- pure


def test_epoch_seconds_forms() -> None:
    assert epoch_seconds(1_700_000_000) == 1_700_000_000
    assert epoch_seconds(1_700_000_000_000) == 1_700_000_000
    assert epoch_seconds("2000-01-01 00:00:00") == 946_684_800
    assert epoch_seconds("") is None
    assert epoch_seconds("soon") is None


def test_token_for_agent_names() -> None:
    assert token_for("Queen Coordinator", "x") == "Queen-Coordinator"
    assert token_for("   ", "agent-9") == "agent-9"


def _t(i: str, *deps: str) -> TaskRow:
    return TaskRow(source_id=i, swarm_id=None, description=i, priority=0, status="pending",
                   result=None, error=None, dependencies=deps, capabilities=(),
                   created_at=None, completed_at=None)


def test_task_order_topological_drops_unknown_and_cycles() -> None:
    ordered, keep = task_order([_t("c", "b"), _t("b", "a", "zz"), _t("a"), _t("x", "y"),
                                _t("y", "x")])
    ids = [t.source_id for t in ordered]
    assert ids.index("a") < ids.index("b") < ids.index("c")
    assert keep["b"] == ("a",)
    assert len(keep["x"] + keep["y"]) == 1  # one edge of the cycle dropped
    assert len(ordered) == 5


def test_read_source_rows_and_expiry(tmp_path: Path) -> None:
    build_claude_flow(tmp_path)
    src = read_source(tmp_path, now_s=NOW)
    assert sorted((m.namespace, m.key) for m in src.memory) == [
        ("default", "api/design"), ("default", "soon"), ("hive/consensus", "decision"),
        ("project", "config")]
    assert src.expired == 2
    design = next(m for m in src.memory if m.key == "api/design")
    assert design.tags == ("api", "design")
    assert design.metadata["claude_flow_access_count"] == 3
    assert [a.name for a in src.agents] == ["Queen Coordinator", "coder-1"]
    assert {t.source_id: t.priority for t in src.tasks}["t-impl"] == 2


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        read_source(tmp_path)
    (tmp_path / ".swarm").mkdir()
    (tmp_path / ".swarm" / "memory.db").write_text("this is not sqlite")
    with pytest.raises(InvalidInput, match="not a readable SQLite database"):
        read_source(tmp_path)
    (tmp_path / ".swarm" / "memory.db").unlink()
    conn = sqlite3.connect(tmp_path / ".swarm" / "memory.db")
    conn.execute("CREATE TABLE something_else (x)")
    conn.close()
    with pytest.raises(InvalidInput, match="no memory_entries table"):
        read_source(tmp_path)


# ------------------------------------------------------------------ integration


def _cfctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).parent / "cfctl")
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=120,
                          check=False)


async def _snapshot(url: str, swarm_name: str) -> dict[str, object]:
    async with Swarm.connect(url, swarm=swarm_name, agent="checker") as s:
        tasks = {t.labels["claude_flow_id"]: (t.status, t.priority, t.result, t.error,
                                              len(t.depends_on))
                 for t in await s.tasks.list()}
        memory = {(e.namespace, e.key): (e.value, e.content_type, e.tags)
                  for e in await s.memory.list()}
        agents = []
        for name in ("Queen-Coordinator", "coder-1"):
            history = await s.log.entity_events("agent", name)
            agents.append([item.event.type for item in history])
        events = len(await s.log.read())
    return {"tasks": tasks, "memory": memory, "agents": agents, "events": events}


@pytest.mark.integration
async def test_import_twice_same_result(tmp_path: Path, cli_env: dict[str, str],
                                        nats_url: str, swarm_name: str) -> None:
    build_claude_flow(tmp_path / "proj")
    first = _cfctl(cli_env, "--json", "import", "claude-flow", str(tmp_path / "proj"))
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["imported"] == {"memory": 4, "agents": 2, "tasks": 7}
    assert report["skipped"] == {"memory expired": 2}
    snap1 = await _snapshot(nats_url, swarm_name)
    assert snap1["tasks"] == {
        "t-design": ("completed", 1, "spec.md written", None, 0),
        "t-impl": ("completed", 2, "done", None, 1),
        "t-tests": ("ready", 0, None, None, 1),  # in_progress: no live worker, ready again
        "t-docs": ("failed", -1, None, "writer crashed", 1),  # its dependency completed
        "t-later": ("cancelled", -1, None, None, 0),
        "t-blocked": ("blocked", 0, None, None, 1),
        # finished although its dependency did not: imported without it
        "t-hotfix": ("completed", 1, "patched", None, 0),
    }
    assert snap1["memory"] == {
        ("default", "api/design"): ("REST with cursor pagination", "text", ("api", "design")),
        ("default", "soon"): ("expires later", "text", ()),
        ("project", "config"): ('{"retries": 3}', "json", ()),
        ("hive/consensus", "decision"): ("use postgres", "text", ()),
    }
    assert snap1["agents"] == [["AgentRegistered", "AgentStatusChanged"]] * 2
    second = _cfctl(cli_env, "--json", "import", "claude-flow", str(tmp_path / "proj"))
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)
    assert again["imported"] == {"memory": 0, "agents": 0, "tasks": 0}
    assert again["skipped"] == {"memory expired": 2, "memory already present": 4,
                                "agent already present": 2, "task already present": 7}
    assert await _snapshot(nats_url, swarm_name) == snap1
    # the task ids come from the source ids
    async with Swarm.connect(nats_url, swarm=swarm_name, agent="checker") as s:
        impl = await s.tasks.get(task_id_for_key(swarm_name, "claude-flow:task:t-impl"))
        assert impl.title == "Implement the API"
        assert impl.owner == "import"


@pytest.mark.integration
def test_import_errors_are_one_line(tmp_path: Path, cli_env: dict[str, str]) -> None:
    missing = _cfctl(cli_env, "import", "claude-flow", str(tmp_path / "nothing"))
    assert missing.returncode == 5
    assert missing.stderr.count("\n") == 1 and missing.stderr.startswith("error:")
    (tmp_path / ".hive-mind").mkdir()
    (tmp_path / ".hive-mind" / "hive.db").write_bytes(b"\x00garbage" * 100)
    bad = _cfctl(cli_env, "import", "claude-flow", str(tmp_path))
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "not a readable SQLite database" in bad.stderr
